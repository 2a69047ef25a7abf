//! Layer normalisation on the CPU: one fused pass per row (two-pass
//! statistics in f32), the same loops for every kernel set — compiled with
//! each SIMD set's features by [`wide`](crate::vector::wide) — so results
//! are bitwise the reference's whatever the set or the thread count.
//!
//! Every sum runs in [`LANES`] interleaved partial sums combined in a fixed
//! order: an order the compiler can vectorise without reassociating.
//! Rows are split among threads for `y` and `dx`; `dγ` and `dβ` sum over
//! rows in row order, split among threads by column.

use kiln_core::norm::{LayerNormGrads, LayerNormOut};
use kiln_core::plan::LayerNormPlan;
use kiln_core::{HostData, Result, View};

use crate::fresh::Slot;
use crate::vector::convert;
use crate::vector::wide;
use crate::workers::Workers;
use crate::KernelSet;

/// Partial sums per row sum.
pub(crate) const LANES: usize = 16;

/// Columns of `dγ`, `dβ` per task of the backward pass.
const COLUMN_BLOCK: usize = 64;

/// Rows handed to one task at a time.
const ROWS_PER_TASK: usize = 16;

/// `Σ f(i)` over `0..n` in [`LANES`] partial sums, combined pairwise.
#[inline(always)]
pub(crate) fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let full = n - n % LANES;
    for base in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(base + l);
        }
    }
    for (l, i) in (full..n).enumerate() {
        acc[l] += f(i);
    }
    combine(acc)
}

/// [`lane_sum`] of whole vectors: the same partial sums and the same
/// result, without the per-element indexing that keeps the compiler from
/// adding a vector at a time.
#[inline(always)]
pub(crate) fn lane_sum_whole(x: &[[f32; LANES]]) -> f32 {
    let mut acc = [0f32; LANES];
    for chunk in x {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    combine(acc)
}

/// The [`LANES`] partial sums added pairwise: [`lane_sum`]'s last step.
#[inline(always)]
pub(crate) fn combine(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// One row: its mean and rstd, and `y`.
#[inline(always)]
fn forward_row_loop(x: &[f32], g: &[f32], b: &[f32], eps: f32, y: &mut [impl Slot]) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lane_sum(x.len(), |i| x[i]) / n;
    let var = lane_sum(x.len(), |i| {
        let d = x[i] - mean;
        d * d
    }) / n;
    let rstd = 1.0 / (var + eps).sqrt();
    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(g).zip(b) {
        y.put((x - mean) * rstd * g + b);
    }
    (mean, rstd)
}

/// One row of `dx`.
#[inline(always)]
fn backward_row_loop(x: &[f32], g: &[f32], dy: &[f32], mean: f32, rstd: f32, dx: &mut [impl Slot]) {
    // One length for every operand, so the loops below carry no bounds
    // checks and vectorise.
    let len = x.len();
    let (g, dy, dx) = (&g[..len], &dy[..len], &mut dx[..len]);
    let n = len as f32;
    let a = lane_sum(len, |i| dy[i] * g[i]) / n;
    let bm = lane_sum(len, |i| dy[i] * g[i] * ((x[i] - mean) * rstd)) / n;
    for i in 0..len {
        let xhat = (x[i] - mean) * rstd;
        dx[i].put(rstd * (dy[i] * g[i] - a - xhat * bm));
    }
}

/// Columns `first..first + dg.len()` of `dγ` and `dβ`, summed over rows in
/// row order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn column_sums_loop(
    x: &[f32],
    dy: &[f32],
    mean: &[f32],
    rstd: &[f32],
    cols: usize,
    first: usize,
    dg: &mut [f32],
    db: &mut [f32],
) {
    // The block's sums stay in local accumulators (registers), not in
    // `dg`/`db`: neighbouring blocks' slices share a cache line, and
    // storing into them every row made the threads fight over it.
    let width = dg.len();
    assert!(
        width <= COLUMN_BLOCK,
        "column_sums: a block of {width} columns"
    );
    let (mut sg, mut sb) = ([0f32; COLUMN_BLOCK], [0f32; COLUMN_BLOCK]);
    let (sg_w, sb_w) = (&mut sg[..width], &mut sb[..width]);
    for (r, (&m, &s)) in mean.iter().zip(rstd).enumerate() {
        let row = r * cols + first;
        let (xr, dyr) = (&x[row..row + width], &dy[row..row + width]);
        for j in 0..width {
            sg_w[j] += dyr[j] * ((xr[j] - m) * s);
            sb_w[j] += dyr[j];
        }
    }
    dg.copy_from_slice(sg_w);
    db.copy_from_slice(sb_w);
}

wide::per_set! {
    /// One row of the forward pass.
    fn forward_row(x: &[f32], g: &[f32], b: &[f32], eps: f32, y: &mut [impl Slot]) -> (f32, f32) = forward_row_loop;
}

wide::per_set! {
    /// One row of `dx`.
    fn backward_row(x: &[f32], g: &[f32], dy: &[f32], mean: f32, rstd: f32, dx: &mut [impl Slot]) -> () = backward_row_loop;
}

wide::per_set! {
    /// A block of `dγ`, `dβ` columns.
    fn column_sums(x: &[f32], dy: &[f32], mean: &[f32], rstd: &[f32], cols: usize, first: usize, dg: &mut [f32], db: &mut [f32]) -> () = column_sums_loop;
}

/// Runs `f` over `jobs` on `pool`, or on this thread without one.
fn each<T: Send>(pool: Option<&Workers>, jobs: Vec<T>, f: impl Fn(T) + Sync) {
    match pool {
        Some(p) => p.for_each(jobs, f),
        None => jobs.into_iter().for_each(f),
    }
}

/// [`kiln_core::Backend::layer_norm`] for kernel set `set`.
pub(crate) fn layer_norm(
    set: KernelSet,
    pool: Option<&Workers>,
    x: View<'_, HostData>,
    gamma: View<'_, HostData>,
    beta: View<'_, HostData>,
    eps: f32,
) -> Result<LayerNormOut<HostData>> {
    let plan = LayerNormPlan::new(x, gamma, beta, eps)?;
    let op = "layer_norm";
    let read = |v| convert::read_f32(set, pool, op, v);
    let (xs, gs, bs) = (read(x)?, read(gamma)?, read(beta)?);
    let (rows, cols) = (plan.rows, plan.cols);
    // Fresh outputs: every row's `y` is written whole below (no zeroing
    // pass first).
    let mut y = Vec::with_capacity(rows * cols);
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    let jobs: Vec<_> = y.spare_capacity_mut()[..rows * cols]
        .chunks_mut(ROWS_PER_TASK * cols)
        .zip(mean.chunks_mut(ROWS_PER_TASK))
        .zip(rstd.chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .collect();
    each(pool, jobs, |(t, ((y, m), s))| {
        let first = t * ROWS_PER_TASK;
        for (r, ((y, m), s)) in y.chunks_mut(cols).zip(m).zip(s).enumerate() {
            let at = (first + r) * cols;
            (*m, *s) = forward_row(set, &xs[at..at + cols], &gs, &bs, eps, y);
        }
    });
    // SAFETY: the jobs cover all `rows · cols` slots, each row's loop
    // writes every element of its row (a task's panic is resumed by `each`
    // before this line).
    unsafe { y.set_len(rows * cols) };
    Ok(LayerNormOut {
        y: convert::store_f32_on(set, pool, op, plan.dtype, y)?,
        mean: HostData::F32(mean),
        rstd: HostData::F32(rstd),
    })
}

/// [`kiln_core::Backend::layer_norm_backward`] for kernel set `set`.
pub(crate) fn layer_norm_backward(
    set: KernelSet,
    pool: Option<&Workers>,
    x: View<'_, HostData>,
    gamma: View<'_, HostData>,
    mean: View<'_, HostData>,
    rstd: View<'_, HostData>,
    dy: View<'_, HostData>,
) -> Result<LayerNormGrads<HostData>> {
    let plan = LayerNormPlan::backward(x, gamma, mean, rstd, dy)?;
    let op = "layer_norm_backward";
    let read = |v| convert::read_f32(set, pool, op, v);
    let (xs, gs, dys) = (read(x)?, read(gamma)?, read(dy)?);
    let (ms, rs) = (read(mean)?, read(rstd)?);
    let (rows, cols) = (plan.rows, plan.cols);
    let mut dx = Vec::with_capacity(rows * cols);
    let jobs: Vec<_> = dx.spare_capacity_mut()[..rows * cols]
        .chunks_mut(ROWS_PER_TASK * cols)
        .enumerate()
        .collect();
    each(pool, jobs, |(t, dx)| {
        let first = t * ROWS_PER_TASK;
        for (r, dx) in dx.chunks_mut(cols).enumerate() {
            let (row, at) = (first + r, (first + r) * cols);
            let (xr, dyr) = (&xs[at..at + cols], &dys[at..at + cols]);
            backward_row(set, xr, &gs, dyr, ms[row], rs[row], dx);
        }
    });
    // SAFETY: as for `y` in the forward pass: every row of `dx` was written.
    unsafe { dx.set_len(rows * cols) };
    // Column blocks of dγ, dβ: each sums its columns over every row in order.
    let (mut dg, mut db) = (vec![0f32; cols], vec![0f32; cols]);
    let jobs: Vec<_> = dg
        .chunks_mut(COLUMN_BLOCK)
        .zip(db.chunks_mut(COLUMN_BLOCK))
        .enumerate()
        .collect();
    each(pool, jobs, |(t, (dg, db))| {
        column_sums(set, &xs, &dys, &ms, &rs, cols, t * COLUMN_BLOCK, dg, db);
    });
    Ok(LayerNormGrads {
        dx: convert::store_f32_on(set, pool, op, plan.dtype, dx)?,
        dgamma: convert::store_f32_on(set, pool, op, plan.dtype, dg)?,
        dbeta: convert::store_f32_on(set, pool, op, plan.dtype, db)?,
    })
}
