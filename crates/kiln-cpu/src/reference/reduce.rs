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
            // Without branches: a classifier's rows are short (10 logits),
            // and a branch per comparison mispredicted about once a row
            // (128 × 10 logits on a Zen 4, with the result's allocation and
            // copy: 3.0 → 2.0 µs).
            let (mut best, mut top) = (0, row[0]);
            for (j, &v) in row.iter().enumerate().skip(1) {
                let better = !top.is_nan() & (v.is_nan() | (v > top));
                best = if better { j } else { best };
                top = if better { v } else { top };
            }
            best as u32
        })
        .collect();
    Ok(HostData::U32(out))
}

#[cfg(test)]
mod tests {
    use kiln_core::{HostData, Layout, Shape, View};

    fn argmax_rows(values: Vec<f32>, layout: Layout) -> Vec<u32> {
        let data = HostData::F32(values);
        match super::argmax(View::new(&data, &layout)).expect("argmax") {
            HostData::U32(v) => v,
            other => panic!("argmax gave {other:?}"),
        }
    }

    /// The first of tied maxima; the first NaN over any number; one
    /// element; rows read through strides (a transposed view).
    #[test]
    fn first_maximum_and_nan_rules() {
        let nan = f32::NAN;
        let rows = vec![
            1.0,
            3.0,
            3.0,
            2.0, // tie: the first 3
            nan,
            9.0,
            nan,
            1.0, // NaN first
            1.0,
            2.0,
            nan,
            nan, // the first NaN after numbers
            -5.0,
            -7.0,
            -6.0,
            -8.0, // all negative
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            -1.0,
            f32::INFINITY,
        ];
        let layout = Layout::contiguous(Shape::new(&[5, 4]).unwrap());
        assert_eq!(argmax_rows(rows.clone(), layout), [1, 0, 2, 0, 3]);
        // The same values read as the 4 × 5 matrix's transpose's rows.
        let t = Layout::new(Shape::new(&[4, 5]).unwrap(), vec![1, 4], 0).unwrap();
        assert_eq!(argmax_rows(rows, t), [1, 1, 1, 2]);
        let one = Layout::contiguous(Shape::new(&[3, 1]).unwrap());
        assert_eq!(argmax_rows(vec![nan, 0.0, -1.0], one), [0, 0, 0]);
    }
}
