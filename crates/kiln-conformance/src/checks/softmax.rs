//! Softmax, log-softmax and fused softmax cross-entropy along the last axis.
//!
//! Bounds follow the computation `m = max x`, `eⱼ = exp(xⱼ − m)`, `S = Σ eⱼ`:
//! `xⱼ − m` is off by u·|xⱼ − m| (which `exp` turns into a relative error),
//! each `exp` by 2 ulps, and the sum by γₙ; so `S` carries the relative
//! error `δ_S = Σ eⱼ·(u|xⱼ − m| + 4u)/S + γₙ`, and
//! softmax: `|Δyᵢ| ≤ yᵢ·(u|xᵢ − m| + 4u + δ_S + 2u)`,
//! log-softmax: `|Δyᵢ| ≤ u|xᵢ − m| + δ_S + 4u·|ln S| + u·|yᵢ|`.

use kiln_core::{Backend, DType, HostData, View};
use proptest::prelude::*;

use super::fetch_all;
use super::reduce::row_shapes;
use crate::bound::{gamma, ETA_F32};
use crate::values::{contiguous, operand, shape, Domain, Operand};
use crate::{compare, run_cases, Bound, CaseError, Config, Report, Sizer, Tier};

const U: f64 = 1.0 / 16_777_216.0;

struct Row {
    max: f64,
    sum: f64,
    delta: f64,
}

fn row_stats(row: &[f64]) -> Row {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| {
        if m.is_nan() || v.is_nan() {
            f64::NAN
        } else {
            m.max(v)
        }
    });
    let sum: f64 = row.iter().map(|&v| (v - max).exp()).sum();
    // Terms that underflow to 0 carry no relative error (and would give 0·∞).
    let weighted: f64 = row
        .iter()
        .map(|&v| {
            let e = (v - max).exp();
            if e == 0.0 {
                0.0
            } else {
                e * (U * (v - max).abs() + 4.0 * U)
            }
        })
        .sum();
    Row {
        max,
        sum,
        delta: weighted / sum + gamma(row.len(), U),
    }
}

fn softmax_want(row: &[f64], log: bool) -> Vec<(f64, Bound)> {
    let r = row_stats(row);
    row.iter()
        .map(|&v| {
            let d = (v - r.max).abs();
            if log {
                let y = v - r.max - r.sum.ln();
                (
                    y,
                    Bound::Abs(U * d + r.delta + 4.0 * U * r.sum.ln().abs() + U * y.abs()),
                )
            } else {
                let y = (v - r.max).exp() / r.sum;
                // exp and the division may underflow: add their η.
                (
                    y,
                    Bound::Abs(y * (U * d + 6.0 * U + r.delta) + (row.len() + 4) as f64 * ETA_F32),
                )
            }
        })
        .collect()
}

fn logits() -> BoxedStrategy<Domain> {
    prop_oneof![3 => Just(Domain::Moderate(8.0)), 1 => Just(Domain::Moderate(80.0)), 1 => Just(Domain::Finite)].boxed()
}

pub(crate) fn softmax<B: Backend>(b: &B, dtype: DType, cfg: &Config, log: bool) -> Report {
    let s = move |z: &Sizer| {
        let dims = match z.tier {
            Tier::Edge => shape(3, 17),
            _ => row_shapes(z),
        };
        (dims, logits())
            .prop_flat_map(move |(d, dom)| operand(dtype, d, dom, true))
            .boxed()
    };
    let name = if log { "log_softmax" } else { "softmax" };
    run_cases(name, dtype, cfg, s, |x| {
        let dims = x.dims().to_vec();
        let c = *dims.last().expect("rank ≥ 1");
        let st = x.upload(b)?;
        let out = b.softmax(View::new(&st, &x.layout), log)?;
        let got = fetch_all(b, &out, &dims)?;
        let want: Vec<_> = if c == 0 {
            Vec::new()
        } else {
            x.logical()
                .chunks(c)
                .flat_map(|r| softmax_want(r, log))
                .collect()
        };
        compare(name, dtype, &dims, &got, &want)
    })
}

#[derive(Debug, Clone)]
struct CeCase {
    logits: Operand,
    labels: Vec<u32>,
}

pub(crate) fn cross_entropy<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    let s = move |z: &Sizer| {
        let nc = match z.tier {
            Tier::Edge => (0usize..20, 1usize..40).boxed(),
            _ => {
                let z = z.clone();
                z.row(0)
                    .prop_flat_map(move |c| (z.rows(c, 0), Just(c)))
                    .boxed()
            }
        };
        (nc, logits())
            .prop_flat_map(move |((n, c), dom)| {
                let x = prop_oneof![
                    operand(dtype, vec![n, c], dom, true),
                    contiguous(dtype, vec![n, c], dom)
                ];
                (x, prop::collection::vec(0..c as u32, n))
                    .prop_map(|(logits, labels)| CeCase { logits, labels })
            })
            .boxed()
    };
    run_cases("softmax_cross_entropy", dtype, cfg, s, |case| {
        let dims = case.logits.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        let st = case.logits.upload(b)?;
        let lab = b.upload(&HostData::U32(case.labels.clone()))?;
        let lab_layout = kiln_core::Layout::contiguous(kiln_core::Shape::new(&[n])?);
        let (loss, grad) = b.softmax_cross_entropy(
            View::new(&st, &case.logits.layout),
            View::new(&lab, &lab_layout),
        )?;
        let got_loss = fetch_all(b, &loss, &[n])?;
        let got_grad = fetch_all(b, &grad, &[n, c])?;
        let x = case.logits.logical();
        let (mut want_loss, mut want_grad) = (Vec::new(), Vec::new());
        for (i, row) in x.chunks(c).enumerate() {
            let r = row_stats(row);
            let l = case.labels[i] as usize;
            let lse = r.sum.ln();
            let loss = r.max + lse - row[l];
            let e = U * (2.0 * r.max.abs() + 4.0 * lse.abs() + 2.0 * row[l].abs() + loss.abs())
                + r.delta;
            want_loss.push((loss, Bound::Abs(e)));
            for (j, (p, bound)) in softmax_want(row, false).into_iter().enumerate() {
                let Bound::Abs(pe) = bound else {
                    unreachable!("softmax bounds are absolute")
                };
                let g = p - if j == l { 1.0 } else { 0.0 };
                want_grad.push((g, Bound::Abs(pe + U * g.abs())));
            }
        }
        let w1 = compare(
            "softmax_cross_entropy loss",
            dtype,
            &[n],
            &got_loss,
            &want_loss,
        )?;
        let w2 = compare(
            "softmax_cross_entropy gradient",
            dtype,
            &[n, c],
            &got_grad,
            &want_grad,
        )?;
        // A label out of range is an error, not garbage.
        if n > 0 {
            let mut bad = case.labels.clone();
            bad[n - 1] = c as u32;
            let bad = b.upload(&HostData::U32(bad))?;
            // The error may come from the call or, on a device that checks
            // labels where they are, from the next synchronisation.
            if b.softmax_cross_entropy(
                View::new(&st, &case.logits.layout),
                View::new(&bad, &lab_layout),
            )
            .and_then(|_| b.synchronize())
            .is_ok()
            {
                return Err(CaseError::Fail(format!(
                    "label {c} with {c} classes was accepted"
                )));
            }
        }
        Ok(w1.max(w2))
    })
}
