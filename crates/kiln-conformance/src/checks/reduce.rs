//! Reductions over axes, and argmax.

use kiln_core::{bounds, Backend, DType, ReduceOp, View};
use proptest::prelude::*;

use super::fetch_all;
use crate::values::{operand, shape, Domain};
use crate::{compare, run_cases, Bound, Config, Report, Sizer, Tier};

/// Shapes of the blocked and large tiers for row ops: `[row]`,
/// `[rows, row]` or `[2, rows, row]`, the row long.
pub(crate) fn row_shapes(z: &Sizer) -> BoxedStrategy<Vec<usize>> {
    let z = z.clone();
    (z.row(0), 0usize..3)
        .prop_flat_map(move |(row, rank)| {
            z.rows(row, 0).prop_map(move |r| match rank {
                0 => vec![row],
                1 => vec![r, row],
                _ => vec![2, r.div_ceil(2), row],
            })
        })
        .boxed()
}

/// Whether an operand's rows (its last axis) are longer than 64.
fn long_row(x: &crate::values::Operand) -> bool {
    x.dims().last().is_some_and(|&d| d > 64)
}

pub(crate) fn reduce<B: Backend>(b: &B, op: ReduceOp, dtype: DType, cfg: &Config) -> Report {
    let s = move |z: &Sizer| {
        let dims = match z.tier {
            Tier::Edge => shape(4, 17),
            _ => row_shapes(z),
        };
        dims.prop_flat_map(move |d| {
            let rank = d.len();
            (
                operand(dtype, d, Domain::General, true),
                prop::collection::vec(any::<bool>(), rank),
                // Long rows are mostly reduced along their length.
                prop::bool::weighted(0.75),
            )
                .prop_map(move |(x, mut mask, along)| {
                    if long_row(&x) && along {
                        mask[rank - 1] = true;
                    }
                    (x, mask)
                })
        })
        .boxed()
    };
    let name = format!("reduce_{}", op.name());
    run_cases(&name, dtype, cfg, s, |(x, mask)| {
        let axes: Vec<usize> = (0..mask.len()).filter(|&i| mask[i]).collect();
        let dims = x.dims().to_vec();
        let mut out_dims = dims.clone();
        for &a in &axes {
            out_dims[a] = 1;
        }
        let st = x.upload(b)?;
        let out = b.reduce(op, View::new(&st, &x.layout), &axes)?;
        let got = fetch_all(b, &out, &out_dims)?;
        // Fold the logical values into their output positions.
        let logical = x.logical();
        let outputs: usize = out_dims.iter().product();
        let mut groups: Vec<Vec<f64>> = vec![Vec::new(); outputs];
        let strides = kiln_core::Shape::new(&out_dims)?.contiguous_strides();
        let mut idx = vec![0usize; dims.len()];
        for v in logical {
            let o: usize = idx
                .iter()
                .zip(&strides)
                .enumerate()
                .map(|(d, (&i, &s))| if mask[d] { 0 } else { i * s })
                .sum();
            groups[o].push(v);
            for d in (0..dims.len()).rev() {
                idx[d] += 1;
                if idx[d] < dims[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        let want: Vec<_> = groups
            .iter()
            .map(|g| {
                let n = g.len();
                let sum: f64 = g.iter().sum();
                let mass: f64 = g.iter().map(|v| v.abs()).sum();
                let bound = bounds::reduce(op, n, mass);
                let extreme = |pick: fn(f64, f64) -> f64, start: f64| {
                    g.iter().fold(start, |m, &v| {
                        if m.is_nan() || v.is_nan() {
                            f64::NAN
                        } else {
                            pick(m, v)
                        }
                    })
                };
                let exact = match op {
                    ReduceOp::Sum => sum,
                    ReduceOp::Mean => sum / n as f64,
                    ReduceOp::Max => extreme(f64::max, f64::NEG_INFINITY),
                    ReduceOp::Min => extreme(f64::min, f64::INFINITY),
                };
                (exact, bound)
            })
            .collect();
        compare(&name, dtype, &out_dims, &got, &want)
    })
}

pub(crate) fn argmax<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    // Ties are common in small-range values; NaN counts as the maximum.
    let s = move |z: &Sizer| {
        let dims = match z.tier {
            Tier::Edge => (shape(2, 9), 1usize..40)
                .prop_map(|(mut d, c)| {
                    d.push(c);
                    d
                })
                .boxed(),
            _ => row_shapes(z),
        };
        dims.prop_flat_map(move |d| {
            prop_oneof![
                operand(dtype, d.clone(), Domain::General, true),
                operand(dtype, d, Domain::Moderate(2.0), true).prop_map(|mut o| {
                    o.storage.iter_mut().for_each(|v| *v = v.round());
                    o
                }),
            ]
        })
        .boxed()
    };
    run_cases("argmax", dtype, cfg, s, |x| {
        let dims = x.dims().to_vec();
        let c = *dims.last().expect("rank ≥ 1");
        let st = x.upload(b)?;
        let out = b.argmax(View::new(&st, &x.layout))?;
        let out_dims = &dims[..dims.len() - 1];
        let got = fetch_all(b, &out, out_dims)?;
        let want: Vec<_> = x
            .logical()
            .chunks(c)
            .map(|row| {
                let mut best = 0;
                for (j, &v) in row.iter().enumerate() {
                    let m = row[best];
                    if !m.is_nan() && (v.is_nan() || v > m) {
                        best = j;
                    }
                }
                (best as f64, Bound::Exact)
            })
            .collect();
        compare("argmax", DType::U32, out_dims, &got, &want)
    })
}
