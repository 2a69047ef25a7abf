//! Reference unary, affine and binary maps.

use kiln_core::{Activation, BinaryOp, Error, HostData, Result, UnaryOp, View};

use crate::storage::{read_f32, store_f32};

/// `op(x)` for one f32, through the platform's libm for transcendentals.
#[inline]
pub(crate) fn unary_f32(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Square => x * x,
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Relu => {
            if x.is_nan() || x > 0.0 {
                x
            } else {
                0.0
            }
        }
        // e⁻ˣ overflows for x < −88 where the result is still a (subnormal)
        // number: for negative x use eˣ/(1 + eˣ) instead.
        UnaryOp::Sigmoid => {
            if x >= 0.0 {
                1.0 / (1.0 + (-x).exp())
            } else {
                let e = x.exp();
                e / (1.0 + e)
            }
        }
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Gelu => {
            let (sig, _) = gelu_parts_f32(x);
            // σ underflows to 0 only for negative x, where x·0 would be NaN
            // for x = −∞.
            if sig == 0.0 {
                -0.0
            } else {
                x * sig
            }
        }
    }
}

/// GELU's `σ(s)` and `s = K·x·(1 + C·x²)` in f32 (see [`UnaryOp::Gelu`]).
#[inline]
pub(crate) fn gelu_parts_f32(x: f32) -> (f32, f32) {
    let s = GELU_K2_F32 * x * (1.0 + GELU_C_F32 * x * x);
    (unary_f32(UnaryOp::Sigmoid, s), s)
}

/// GELU's constants in f32.
pub(crate) const GELU_K2_F32: f32 = kiln_core::backend::GELU_K2 as f32;
/// See [`GELU_K2_F32`].
pub(crate) const GELU_C_F32: f32 = kiln_core::backend::GELU_C as f32;

/// GELU's derivative at `x` times `dy`, given `σ(s)` (the slope term is
/// left out where `σ(1 − σ)` is 0, so that huge |x| give no ∞·0).
#[inline]
pub(crate) fn gelu_backward_f32(x: f32, sig: f32, dy: f32) -> f32 {
    let t = sig * (1.0 - sig);
    let slope = if t == 0.0 {
        0.0
    } else {
        x * t * GELU_K2_F32 * (1.0 + 3.0 * GELU_C_F32 * x * x)
    };
    dy * (sig + slope)
}

/// An epilogue activation for one f32.
#[inline]
pub(crate) fn activate(act: Activation, x: f32) -> f32 {
    act.as_unary().map_or(x, |op| unary_f32(op, x))
}

/// The gradient of `op` at `x` (with `y = op(x)`) times `dy`, for one f32.
#[inline]
pub(crate) fn backward_f32(op: UnaryOp, x: f32, y: f32, dy: f32) -> f32 {
    match op {
        UnaryOp::Neg => -dy,
        UnaryOp::Abs => {
            if x > 0.0 {
                dy
            } else if x < 0.0 {
                -dy
            } else {
                0.0 * dy
            }
        }
        UnaryOp::Exp => dy * y,
        UnaryOp::Log => dy / x,
        UnaryOp::Sqrt => dy * 0.5 / y,
        UnaryOp::Square => dy * 2.0 * x,
        UnaryOp::Recip => -dy * y * y,
        UnaryOp::Relu => {
            if y > 0.0 {
                dy
            } else {
                0.0 * dy
            }
        }
        UnaryOp::Sigmoid => dy * y * (1.0 - y),
        UnaryOp::Tanh => dy * (1.0 - y * y),
        UnaryOp::Gelu => gelu_backward_f32(x, gelu_parts_f32(x).0, dy),
    }
}

fn same_shape(op: &'static str, views: &[View<'_, HostData>]) -> Result<()> {
    let first = views[0];
    for v in &views[1..] {
        if v.layout.shape() != first.layout.shape() {
            return Err(Error::shape(
                op,
                format!(
                    "operands have shapes {} and {}",
                    first.layout.shape(),
                    v.layout.shape()
                ),
            ));
        }
        if v.storage.dtype() != first.storage.dtype() {
            return Err(Error::DType {
                op,
                expected: first.storage.dtype(),
                got: v.storage.dtype(),
            });
        }
    }
    Ok(())
}

pub(crate) fn unary(op: UnaryOp, x: View<'_, HostData>) -> Result<HostData> {
    let xs = read_f32(op.name(), x)?;
    store_f32(
        op.name(),
        x.storage.dtype(),
        xs.iter().map(|&v| unary_f32(op, v)).collect(),
    )
}

pub(crate) fn unary_backward(
    op: UnaryOp,
    x: View<'_, HostData>,
    y: View<'_, HostData>,
    dy: View<'_, HostData>,
) -> Result<HostData> {
    same_shape("unary_backward", &[x, y, dy])?;
    let ys = read_f32("unary_backward", y)?;
    let dys = read_f32("unary_backward", dy)?;
    let out = if op.backward_reads_only_output() {
        ys.iter()
            .zip(dys.iter())
            .map(|(&y, &d)| backward_f32(op, 0.0, y, d))
            .collect()
    } else {
        let xs = read_f32("unary_backward", x)?;
        xs.iter()
            .zip(ys.iter().zip(dys.iter()))
            .map(|(&x, (&y, &d))| backward_f32(op, x, y, d))
            .collect()
    };
    store_f32("unary_backward", x.storage.dtype(), out)
}

pub(crate) fn affine(x: View<'_, HostData>, mul: f32, add: f32) -> Result<HostData> {
    let xs = read_f32("affine", x)?;
    store_f32(
        "affine",
        x.storage.dtype(),
        xs.iter().map(|&v| v.mul_add(mul, add)).collect(),
    )
}

/// `op(a, b)` for one pair of f32.
#[inline]
pub(crate) fn binary_f32(op: BinaryOp, a: f32, b: f32) -> f32 {
    let flag = |c: bool| if c { 1.0 } else { 0.0 };
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Maximum => {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else {
                a.max(b)
            }
        }
        BinaryOp::Minimum => {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else {
                a.min(b)
            }
        }
        BinaryOp::Eq => flag(a == b),
        BinaryOp::Gt => flag(a > b),
        BinaryOp::Ge => flag(a >= b),
    }
}

pub(crate) fn binary(
    op: BinaryOp,
    a: View<'_, HostData>,
    b: View<'_, HostData>,
) -> Result<HostData> {
    same_shape(op.name(), &[a, b])?;
    let (av, bv) = (read_f32(op.name(), a)?, read_f32(op.name(), b)?);
    store_f32(
        op.name(),
        a.storage.dtype(),
        av.iter()
            .zip(bv.iter())
            .map(|(&x, &y)| binary_f32(op, x, y))
            .collect(),
    )
}
