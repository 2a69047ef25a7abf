//! Elementwise ops: unary maps and their derivatives, affine, binary ops.

use kiln_core::{bounds, Backend, BinaryOp, DType, UnaryOp, View};
use proptest::prelude::*;

use super::fetch_all;
use crate::bound::round_to;
use crate::values::{operand, value, Domain};
use crate::{compare, run_cases, Config, Report, Sizer};

pub(crate) fn unary<B: Backend>(b: &B, op: UnaryOp, dtype: DType, cfg: &Config) -> Report {
    let s = move |z: &Sizer| {
        z.elementwise(4, 17)
            .prop_flat_map(move |d| operand(dtype, d, Domain::General, true))
            .boxed()
    };
    let name = format!("unary_{}", op.name());
    run_cases(&name, dtype, cfg, s, |x| {
        let st = x.upload(b)?;
        let out = b.unary(op, View::new(&st, &x.layout))?;
        let got = fetch_all(b, &out, x.dims())?;
        let bound = |v: f64| bounds::unary(op, dtype, v);
        let want: Vec<_> = x
            .logical()
            .into_iter()
            .map(|v| (op.eval_f64(v), bound(v)))
            .collect();
        compare(op.name(), dtype, x.dims(), &got, &want)
    })
}

pub(crate) fn unary_backward<B: Backend>(b: &B, op: UnaryOp, dtype: DType, cfg: &Config) -> Report {
    let xdomain = if matches!(op, UnaryOp::Log | UnaryOp::Sqrt) {
        Domain::Positive
    } else {
        Domain::Moderate(4.0)
    };
    let s = move |z: &Sizer| {
        z.elementwise(3, 17)
            .prop_flat_map(move |d| {
                (
                    operand(dtype, d.clone(), xdomain, true),
                    operand(dtype, d, Domain::Moderate(4.0), true),
                )
            })
            .boxed()
    };
    let name = format!("unary_backward_{}", op.name());
    run_cases(&name, dtype, cfg, s, |(x, dy)| {
        let xs = x.logical();
        // y as the forward pass would give it, stored contiguously.
        let ys: Vec<f64> = xs
            .iter()
            .map(|&v| round_to(dtype, op.eval_f64(v)))
            .collect();
        let y = crate::values::Operand::contiguous(dtype, x.dims(), ys.clone());
        let (sx, sy, sd) = (x.upload(b)?, y.upload(b)?, dy.upload(b)?);
        let out = b.unary_backward(
            op,
            View::new(&sx, &x.layout),
            View::new(&sy, &y.layout),
            View::new(&sd, &dy.layout),
        )?;
        let got = fetch_all(b, &out, x.dims())?;
        let want: Vec<_> = xs
            .iter()
            .zip(&ys)
            .zip(dy.logical())
            .map(|((&xv, &yv), dv)| {
                (
                    op.backward_f64(xv, yv, dv),
                    bounds::unary_backward(op, xv, yv, dv),
                )
            })
            .collect();
        compare(&name, dtype, x.dims(), &got, &want)
    })
}

/// The f32 neighbour of `r` in the direction of `target`.
fn next_toward(r: f32, target: f64) -> f32 {
    if f64::from(r) == target || r.is_nan() {
        return r;
    }
    let up = target > f64::from(r);
    let bits = r.to_bits();
    let next = if r == 0.0 {
        if up {
            1
        } else {
            0x8000_0001
        }
    } else if (r > 0.0) == up {
        bits + 1
    } else {
        bits - 1
    };
    f32::from_bits(next)
}

/// `x·m + a` rounded once to f32: the exact sum is `s + e` (TwoSum), and
/// when `s` is an exact midpoint of two floats the sign of `e` decides.
pub fn fma_rounded_f32(x: f64, m: f64, a: f64) -> f64 {
    let p = x * m; // exact: 24 + 24 bits fit in f64's 53
    let s = p + a;
    if !s.is_finite() {
        return s;
    }
    let bb = s - p;
    let e = (p - (s - bb)) + (a - bb);
    let r = s as f32;
    if e == 0.0 || !r.is_finite() {
        return f64::from(r);
    }
    let n = next_toward(r, s);
    if n != r && (f64::from(r) + f64::from(n)) / 2.0 == s {
        // A tie in s; the exact value lies on e's side of it.
        let toward_r = (f64::from(r) - s).signum() == e.signum();
        return f64::from(if toward_r { r } else { n });
    }
    f64::from(r)
}

pub(crate) fn affine<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    let s = move |z: &Sizer| {
        (
            z.elementwise(3, 17),
            value(Domain::Finite, DType::F32),
            value(Domain::Finite, DType::F32),
        )
            .prop_flat_map(move |(d, m, a)| {
                (operand(dtype, d, Domain::General, true), Just(m), Just(a))
            })
            .boxed()
    };
    run_cases("affine", dtype, cfg, s, |(x, mul, add)| {
        let st = x.upload(b)?;
        let out = b.affine(View::new(&st, &x.layout), mul as f32, add as f32)?;
        let got = fetch_all(b, &out, x.dims())?;
        let want: Vec<_> = x
            .logical()
            .into_iter()
            .map(|v| {
                let exact = if dtype == DType::F32 {
                    fma_rounded_f32(v, mul, add)
                } else {
                    // One f32 fma, then rounded to the storage type.
                    v * mul + add
                };
                (exact, bounds::affine(dtype))
            })
            .collect();
        compare("affine", dtype, x.dims(), &got, &want)
    })
}

pub(crate) fn binary<B: Backend>(b: &B, op: BinaryOp, dtype: DType, cfg: &Config) -> Report {
    let s = move |z: &Sizer| {
        z.elementwise(4, 13)
            .prop_flat_map(move |d| {
                (
                    operand(dtype, d.clone(), Domain::General, true),
                    operand(dtype, d, Domain::General, true),
                )
            })
            .boxed()
    };
    let name = format!("binary_{}", op.name());
    run_cases(&name, dtype, cfg, s, |(x, y)| {
        let (sx, sy) = (x.upload(b)?, y.upload(b)?);
        let out = b.binary(op, View::new(&sx, &x.layout), View::new(&sy, &y.layout))?;
        let got = fetch_all(b, &out, x.dims())?;
        let bound = bounds::binary(op);
        let want: Vec<_> = x
            .logical()
            .into_iter()
            .zip(y.logical())
            .map(|(a, c)| (op.eval_f64(a, c), bound))
            .collect();
        compare(&name, dtype, x.dims(), &got, &want)
    })
}
