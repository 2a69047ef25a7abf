//! Layer normalisation over the last axis, forward and backward.
//!
//! Bounds: [`kiln_core::bounds::LayerNormRow`] and
//! [`kiln_core::bounds::LayerNormBackwardRow`]. Rows come with moderate
//! values, with a large common offset (which a one-pass variance fails),
//! and — at the `blocked` and `large` tiers — long. The backward pass is
//! judged at the statistics it is given: the exact ones rounded to f32.

use kiln_core::bounds::{self, LayerNormBackwardRow, LayerNormRow};
use kiln_core::{Backend, DType, HostData, Layout, Shape, View};
use proptest::prelude::*;

use super::fetch_all;
use super::reduce::row_shapes;
use crate::bound::round_to;
use crate::values::{contiguous, operand, shape, Domain, Operand};
use crate::{compare, run_cases, Bound, Config, Report, Sizer, Tier};

#[derive(Clone, Debug)]
struct Case {
    x: Operand,
    gamma: Operand,
    beta: Operand,
    dy: Operand,
    eps: f32,
}

impl Case {
    fn rows_cols(&self) -> (usize, usize) {
        let dims = self.x.dims();
        let cols = *dims.last().expect("rank ≥ 1");
        (dims[..dims.len() - 1].iter().product(), cols)
    }
}

fn strategy(z: &Sizer, dtype: DType) -> BoxedStrategy<Case> {
    let dims = match z.tier {
        Tier::Edge => shape(3, 17),
        _ => row_shapes(z),
    };
    let offset = prop_oneof![3 => Just(0.0), 1 => Just(1000.0), 1 => Just(-3.0e4)];
    let eps = prop::sample::select(vec![1e-5f32, 1e-3, 0.25]);
    (dims, offset, eps)
        .prop_flat_map(move |(mut dims, offset, eps)| {
            // The normalised axis is never empty (that is an error).
            let last = dims.len() - 1;
            dims[last] = dims[last].max(1);
            let cols = dims[last];
            let scale = if offset == 0.0 { 4.0 } else { 1.0 };
            (
                operand(dtype, dims.clone(), Domain::Moderate(scale), true),
                contiguous(dtype, vec![cols], Domain::Moderate(2.0)),
                contiguous(dtype, vec![cols], Domain::Moderate(2.0)),
                operand(dtype, dims, Domain::Moderate(2.0), true),
            )
                .prop_map(move |(mut x, gamma, beta, dy)| {
                    for v in &mut x.storage {
                        *v = round_to(dtype, *v + offset);
                    }
                    Case {
                        x,
                        gamma,
                        beta,
                        dy,
                        eps,
                    }
                })
        })
        .boxed()
}

pub(crate) fn layer_norm<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    run_cases(
        "layer_norm",
        dtype,
        cfg,
        move |z| strategy(z, dtype),
        |c| {
            let (rows, cols) = c.rows_cols();
            let (sx, sg, sb) = (c.x.upload(b)?, c.gamma.upload(b)?, c.beta.upload(b)?);
            let out = b.layer_norm(
                View::new(&sx, &c.x.layout),
                View::new(&sg, &c.gamma.layout),
                View::new(&sb, &c.beta.layout),
                c.eps,
            )?;
            let got_y = fetch_all(b, &out.y, c.x.dims())?;
            let got_mean = fetch_all(b, &out.mean, &[rows])?;
            let got_rstd = fetch_all(b, &out.rstd, &[rows])?;
            let (x, g, be) = (c.x.logical(), c.gamma.logical(), c.beta.logical());
            let (mut want_y, mut want_mean, mut want_rstd) = (vec![], vec![], vec![]);
            for row in x.chunks(cols) {
                let r = LayerNormRow::new(row, f64::from(c.eps));
                want_mean.push((r.mean, Bound::Abs(r.mean_err)));
                want_rstd.push((r.rstd, Bound::Abs(r.rstd_err)));
                for i in 0..cols {
                    let (y, e) = r.y(i, g[i], be[i]);
                    want_y.push((y, Bound::Abs(e)));
                }
            }
            let w = compare("layer_norm y", dtype, c.x.dims(), &got_y, &want_y)?;
            let m = compare(
                "layer_norm mean",
                DType::F32,
                &[rows],
                &got_mean,
                &want_mean,
            )?;
            let s = compare(
                "layer_norm rstd",
                DType::F32,
                &[rows],
                &got_rstd,
                &want_rstd,
            )?;
            Ok(w.max(m).max(s))
        },
    )
}

pub(crate) fn layer_norm_backward<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    run_cases(
        "layer_norm_backward",
        dtype,
        cfg,
        move |z| strategy(z, dtype),
        |c| {
            let (rows, cols) = c.rows_cols();
            let (x, g, dy) = (c.x.logical(), c.gamma.logical(), c.dy.logical());
            // The statistics the backward pass is given: exact, then f32.
            let stats: Vec<(f64, f64)> = x
                .chunks(cols)
                .map(|row| {
                    let r = LayerNormRow::new(row, f64::from(c.eps));
                    (f64::from(r.mean as f32), f64::from(r.rstd as f32))
                })
                .collect();
            let mean = b.upload(&HostData::F32(stats.iter().map(|s| s.0 as f32).collect()))?;
            let rstd = b.upload(&HostData::F32(stats.iter().map(|s| s.1 as f32).collect()))?;
            let lrows = Layout::contiguous(Shape::new(&[rows])?);
            let (sx, sg, sd) = (c.x.upload(b)?, c.gamma.upload(b)?, c.dy.upload(b)?);
            let grads = b.layer_norm_backward(
                View::new(&sx, &c.x.layout),
                View::new(&sg, &c.gamma.layout),
                View::new(&mean, &lrows),
                View::new(&rstd, &lrows),
                View::new(&sd, &c.dy.layout),
            )?;
            let got_dx = fetch_all(b, &grads.dx, c.x.dims())?;
            let got_dg = fetch_all(b, &grads.dgamma, &[cols])?;
            let got_db = fetch_all(b, &grads.dbeta, &[cols])?;
            let mut want_dx = Vec::with_capacity(x.len());
            // Per column: Σ terms, Σ|terms|, Σ rounding-carried errors.
            let mut dg = vec![(0f64, 0f64, 0f64); cols];
            let mut db = vec![(0f64, 0f64); cols];
            for (&(m, s), (xr, dyr)) in stats.iter().zip(x.chunks(cols).zip(dy.chunks(cols))) {
                let row = LayerNormBackwardRow::new(xr, &g, dyr, m, s);
                want_dx.extend(row.dx.iter().map(|&(v, e)| (v, Bound::Abs(e))));
                for (j, &(t, mass, carried)) in row.dgamma_terms.iter().enumerate() {
                    dg[j].0 += t;
                    dg[j].1 += mass;
                    dg[j].2 += carried;
                    db[j].0 += dyr[j];
                    db[j].1 += dyr[j].abs();
                }
            }
            let n = rows.max(1);
            let want_dg: Vec<_> = dg
                .iter()
                .map(|&(sum, mass, carried)| {
                    let e = bounds::dot(n, mass) + carried + bounds::U * mass;
                    (sum, Bound::summed(e, mass, n))
                })
                .collect();
            let want_db: Vec<_> = db
                .iter()
                .map(|&(sum, mass)| (sum, Bound::summed(bounds::dot(n, mass), mass, n)))
                .collect();
            let w = compare(
                "layer_norm_backward dx",
                dtype,
                c.x.dims(),
                &got_dx,
                &want_dx,
            )?;
            let wg = compare("layer_norm_backward dγ", dtype, &[cols], &got_dg, &want_dg)?;
            let wb = compare("layer_norm_backward dβ", dtype, &[cols], &got_db, &want_db)?;
            Ok(w.max(wg).max(wb))
        },
    )
}
