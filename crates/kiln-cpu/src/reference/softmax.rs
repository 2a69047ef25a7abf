//! Reference softmax, log-softmax and fused softmax cross-entropy.

use kiln_core::{Error, HostData, Result, View};

use crate::storage::{read_f32, read_u32, store_f32};

/// `(max, Σ exp(x − max))` of one row, summed in order.
pub(crate) fn row_stats(row: &[f32]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| {
        if v.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(v)
        }
    });
    let sum = row.iter().fold(0.0f32, |s, &v| s + (v - max).exp());
    (max, sum)
}

pub(crate) fn softmax(x: View<'_, HostData>, log: bool) -> Result<HostData> {
    let Some(&c) = x.layout.dims().last() else {
        return Err(Error::shape("softmax", "a scalar has no last axis"));
    };
    let values = read_f32("softmax", x)?;
    let mut out = vec![0f32; values.len()];
    if c > 0 {
        for (row, o) in values.chunks(c).zip(out.chunks_mut(c)) {
            let (max, sum) = row_stats(row);
            if log {
                let lse = sum.ln();
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = v - max - lse;
                }
            } else {
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (v - max).exp() / sum;
                }
            }
        }
    }
    store_f32("softmax", x.storage.dtype(), out)
}

/// The causal-masked softmax ([`kiln_core::Backend::softmax_causal`]):
/// each row's softmax over the keys it sees, zeros after.
pub(crate) fn softmax_causal(x: View<'_, HostData>) -> Result<HostData> {
    let plan = kiln_core::CausalSoftmaxPlan::new(x)?;
    let s = plan.keys;
    let values = read_f32("softmax_causal", x)?;
    let mut out = vec![0f32; values.len()];
    // No keys means no queries either (keys ≥ queries): nothing to do.
    for (r, (row, o)) in values
        .chunks(s.max(1))
        .zip(out.chunks_mut(s.max(1)))
        .enumerate()
    {
        let seen = plan.visible(r);
        let (max, sum) = row_stats(&row[..seen]);
        for (o, &v) in o[..seen].iter_mut().zip(row) {
            *o = (v - max).exp() / sum;
        }
    }
    store_f32("softmax_causal", plan.dtype, out)
}

/// The labels of a softmax cross-entropy, checked: `[n]` u32 for `[n, c]`
/// logits, each below `c`.
pub(crate) fn checked_labels<'a>(
    logits: View<'_, HostData>,
    labels: View<'a, HostData>,
) -> Result<std::borrow::Cow<'a, [u32]>> {
    let plan = kiln_core::SoftmaxCePlan::new(logits, labels)?;
    let y = read_u32("softmax_cross_entropy", labels)?;
    if let Some((i, &l)) = y
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= plan.classes)
    {
        return Err(plan.bad_label(i, Some(l)));
    }
    Ok(y)
}

pub(crate) fn softmax_cross_entropy(
    logits: View<'_, HostData>,
    labels: View<'_, HostData>,
) -> Result<(HostData, HostData)> {
    // Checks the shapes (through the shared plan) and the labels.
    let y = checked_labels(logits, labels)?;
    let (n, c) = (logits.layout.dims()[0], logits.layout.dims()[1]);
    let x = read_f32("softmax_cross_entropy", logits)?;
    let mut loss = vec![0f32; n];
    let mut grad = vec![0f32; n * c];
    for i in 0..n {
        let row = &x[i * c..(i + 1) * c];
        let (max, sum) = row_stats(row);
        let label = y[i] as usize;
        loss[i] = (max + sum.ln()) - row[label];
        for (j, g) in grad[i * c..(i + 1) * c].iter_mut().enumerate() {
            *g = (row[j] - max).exp() / sum - if j == label { 1.0 } else { 0.0 };
        }
    }
    let dtype = logits.storage.dtype();
    Ok((
        store_f32("softmax_cross_entropy", dtype, loss)?,
        store_f32("softmax_cross_entropy", dtype, grad)?,
    ))
}
