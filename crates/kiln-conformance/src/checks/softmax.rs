//! Softmax, log-softmax and fused softmax cross-entropy along the last axis.
//!
//! Bounds: [`kiln_core::bounds::SoftmaxRow`].

use kiln_core::bounds::SoftmaxRow;
use kiln_core::{Backend, DType, HostData, View};
use proptest::prelude::*;

use super::fetch_all;
use super::reduce::row_shapes;
use crate::values::{contiguous, operand, shape, Domain, Operand};
use crate::{compare, run_cases, Bound, CaseError, Config, Report, Sizer, Tier};

fn softmax_want(row: &[f64], log: bool) -> Vec<(f64, Bound)> {
    let r = SoftmaxRow::new(row);
    (0..row.len())
        .map(|i| {
            let (y, e) = if log { r.log_prob(i) } else { r.prob(i) };
            (y, Bound::Abs(e))
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
            let r = SoftmaxRow::new(row);
            let l = case.labels[i] as usize;
            let (loss, e) = r.loss(l);
            want_loss.push((loss, Bound::Abs(e)));
            for j in 0..c {
                let (g, e) = r.grad(j, l);
                want_grad.push((g, Bound::Abs(e)));
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

/// The causal-masked softmax over `[…, T, S]` scores: each row's softmax
/// over the keys it sees (the bound of [`SoftmaxRow`] on that prefix), the
/// masked probabilities exactly 0. Rows at the `blocked` tier reach 4k keys.
pub(crate) fn softmax_causal<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    let s = move |z: &Sizer| {
        let dims = match z.tier {
            Tier::Edge => (shape(2, 3), 0usize..9, 0usize..6).boxed(),
            Tier::Blocked => (Just(vec![1]).boxed(), 1usize..40, 0usize..4000).boxed(),
            Tier::Large => (Just(vec![2]).boxed(), 500usize..520, 0usize..300).boxed(),
        };
        (dims, logits())
            .prop_flat_map(move |((mut lead, t, extra), dom)| {
                lead.truncate(1);
                lead.extend([t, t + extra]);
                operand(dtype, lead, dom, true)
            })
            .boxed()
    };
    run_cases("softmax_causal", dtype, cfg, s, |x| {
        let dims = x.dims().to_vec();
        let (t, keys) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let st = x.upload(b)?;
        let out = b.softmax_causal(View::new(&st, &x.layout))?;
        let got = fetch_all(b, &out, &dims)?;
        let mut want = Vec::with_capacity(got.len());
        if keys > 0 {
            for (r, row) in x.logical().chunks(keys).enumerate() {
                let seen = r % t.max(1) + keys - t + 1;
                let stats = SoftmaxRow::new(&row[..seen]);
                want.extend((0..seen).map(|j| {
                    let (y, e) = stats.prob(j);
                    (y, Bound::Abs(e))
                }));
                want.extend((seen..keys).map(|_| (0.0, Bound::Exact)));
            }
        }
        compare("softmax_causal", dtype, &dims, &got, &want)
    })
}
