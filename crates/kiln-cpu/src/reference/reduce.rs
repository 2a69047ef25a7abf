//! Reference reductions and argmax.

use kiln_core::{Error, HostData, ReduceOp, Result, View};

use crate::storage::{read_f32, store_f32};

/// Reduces `x` over `axes`: the reduced axes are moved innermost, so each
/// output element folds one contiguous run, in row-major order.
pub(crate) fn reduce(op: ReduceOp, x: View<'_, HostData>, axes: &[usize]) -> Result<HostData> {
    let kiln_core::ReducePlan {
        permuted,
        rows: outputs,
        run,
    } = kiln_core::ReducePlan::new(op, x.layout, axes)?;
    let values = read_f32(op.name(), View::new(x.storage, &permuted))?;
    let out: Vec<f32> = (0..outputs)
        .map(|o| {
            let r = &values[o * run..(o + 1) * run];
            match op {
                ReduceOp::Sum => r.iter().fold(0.0, |s, &v| s + v),
                ReduceOp::Mean => r.iter().fold(0.0, |s, &v| s + v) / run as f32,
                ReduceOp::Max => r.iter().fold(f32::NEG_INFINITY, |m, &v| {
                    if v.is_nan() || m.is_nan() {
                        f32::NAN
                    } else {
                        m.max(v)
                    }
                }),
                ReduceOp::Min => r.iter().fold(f32::INFINITY, |m, &v| {
                    if v.is_nan() || m.is_nan() {
                        f32::NAN
                    } else {
                        m.min(v)
                    }
                }),
            }
        })
        .collect();
    store_f32(op.name(), x.storage.dtype(), out)
}

/// Index of the first maximum of each last-axis row (NaN counts as maximal).
pub(crate) fn argmax(x: View<'_, HostData>) -> Result<HostData> {
    let dims = x.layout.dims();
    let Some(&c) = dims.last() else {
        return Err(Error::shape("argmax", "a scalar has no last axis"));
    };
    if c == 0 || c > u32::MAX as usize {
        return Err(Error::shape(
            "argmax",
            format!("last axis has extent {c}; need 1..=2³²−1"),
        ));
    }
    let values = read_f32("argmax", x)?;
    let out = values
        .chunks(c)
        .map(|row| {
            let mut best = 0;
            for (j, &v) in row.iter().enumerate() {
                let b = row[best];
                if !b.is_nan() && (v.is_nan() || v > b) {
                    best = j;
                }
            }
            best as u32
        })
        .collect();
    Ok(HostData::U32(out))
}
