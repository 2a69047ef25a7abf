//! Causal attention on the CPU, fused: whole examples per task, each
//! problem (a head of one example) in turn, its queries in passes of
//! [`QUERY_BLOCK`] rows — their scores over the keys each sees, their
//! softmax, then the weighted sums of the
//! values — so no more than `QUERY_BLOCK × S` probabilities exist at a time
//! (never the `[batch, T, S]` tensor), and the keys a query does not see
//! cost nothing (about half the multiply-adds of the composed ops' full
//! products).
//!
//! A problem of fewer queries than a register block's rows (decoding: one
//! query per head) takes each score as one dot product of a query row and
//! a key row instead of transposing the keys — its scores round
//! differently from a longer problem's, within the same bound, so a cached
//! decoding step and a pass over the whole context agree to rounding, not
//! bit for bit. A register block's lone last row (a decoding step's query,
//! the last row of 65 queries) runs its weighted sums without the block's
//! copies, in the block's order. f32 operands whose rows each hold their
//! elements side by side are read in place, however far apart the rows
//! and examples lie: heads side by side in a fused projection's thirds
//! ([`AttentionOptions::with_heads`], problem `e·heads + h` reading columns
//! `h·D..` of example `e`'s rows), a key/value cache narrowed to the
//! positions filled. A task takes whole examples, all their heads, and
//! writes each problem's results straight into its rows of the
//! `[n, T, heads·D]` outputs, `heads·D` apart ([`RowsMut`]) — so a model's
//! heads need no copies to split or merge (config A's attention block,
//! forward and backward, 16 % quicker than with them on one thread and
//! level on two: `benches/attention`, `block`).
//!
//! Dropout on the probabilities ([`kiln_core::AttentionDropout`]) draws
//! each pass's factors into a buffer beside its probabilities and
//! multiplies them in before the weighted sums.
//!
//! The backward pass recomputes each pass's probabilities (and factors)
//! from `q` and `k` and accumulates `dq`, `dk` and `dv` in place. Every
//! sum runs in an order fixed by the problem's shape — a chain of fused
//! multiply-adds over keys, then queries, ascending; the dot products'
//! partial chains combined pairwise — so results do not depend on the
//! thread count. The
//! loops are compiled per kernel set by [`wide::per_set`]; the bounds are
//! [`kiln_core::bounds::attention`] and
//! [`attention_backward`](kiln_core::bounds::attention_backward).

use std::mem::MaybeUninit;

use kiln_core::plan::AttentionPlan;
use kiln_core::{AttentionGrads, AttentionOptions, HostData, Result, UnaryOp, View};

use crate::fresh;
use crate::norm::{combine, lane_sum, lane_sum_whole};
use crate::scratch;
use crate::vector::convert;
use crate::vector::ops::{transcendental, MapKernel};
use crate::vector::random;
use crate::vector::wide;
use crate::workers::Workers;
use crate::KernelSet;

/// Columns of a register block's vector: one AVX-512 vector (two AVX2 or
/// four NEON ones). Blocks are one such vector wide, or two on
/// [`WIDE_SETS`].
const LANES: usize = 16;
/// Rows of a register block: `ROWS × LANES` accumulators per vector of
/// columns, each step one load per vector shared by `ROWS` broadcast
/// multiply-adds.
const ROWS: usize = 4;

/// Queries per pass over a problem: its scores and probabilities are held
/// for these rows only (`QUERY_BLOCK × S` floats), whatever the context.
const QUERY_BLOCK: usize = 64;

/// Multiply-adds below which a forward task takes more than one problem.
const TASK_MIN_WORK: usize = 1 << 16;

/// The causal extents of one pass of a problem's loops: queries
/// `lo..hi` (row `i − lo` of the pass's score buffers), of which query `i`
/// sees keys `0..i + extra + 1`, and `sp` columns per score row (the keys
/// rounded up to [`LANES`]).
#[derive(Clone, Copy)]
pub(crate) struct Causal {
    lo: usize,
    hi: usize,
    keys: usize,
    extra: usize,
    sp: usize,
}

impl Causal {
    /// The passes over queries `lo..hi`, [`QUERY_BLOCK`] at a time.
    fn passes(self) -> impl Iterator<Item = Causal> {
        (self.lo..self.hi)
            .step_by(QUERY_BLOCK)
            .map(move |lo| Causal {
                lo,
                hi: (lo + QUERY_BLOCK).min(self.hi),
                ..self
            })
    }
    fn seen(self, i: usize) -> usize {
        i + self.extra + 1
    }
    /// The first query that sees key `j`.
    fn first(self, j: usize) -> usize {
        j.saturating_sub(self.extra)
    }
}

/// `LANES` floats of `x` from `at` (zeros past `len` of them).
#[inline(always)]
fn lanes(x: &[f32], at: usize, len: usize) -> [f32; LANES] {
    if len == LANES {
        // A fixed-size copy: one vector load.
        let whole: &[f32; LANES] = x[at..at + LANES].try_into().expect("LANES floats");
        return *whole;
    }
    let mut v = [0f32; LANES];
    v[..len].copy_from_slice(&x[at..at + len]);
    v
}

/// `acc[l] += a·v[l]` for a register block's row.
#[inline(always)]
fn fma_row(acc: &mut [f32; LANES], a: f32, v: &[f32; LANES]) {
    for (c, &x) in acc.iter_mut().zip(v) {
        *c = a.mul_add(x, *c);
    }
}

/// `out[i·sp + j] = scale·Σₚ x[i·xs + p]·t[p·sp + j]` for every query `i` and at
/// least the keys it sees (whole blocks of [`LANES`]; the rest of a row is
/// left as it was): the scores `q·kᵀ` from the transposed keys, or
/// `dy·vᵀ` from the transposed values.
///
/// `WIDE` blocks take two vectors of keys at a time, as far as they go
/// ([`WIDE_SETS`]).
#[inline(always)]
fn products_loop<const WIDE: bool>(
    x: &[f32],
    xs: usize,
    t: &[f32],
    d: usize,
    c: Causal,
    scale: f32,
    out: &mut [f32],
) {
    for i0 in (c.lo..c.hi).step_by(ROWS) {
        let r = ROWS.min(c.hi - i0);
        let at = block_rows(i0, r, xs);
        let width = c.seen(i0 + r - 1).next_multiple_of(LANES).min(c.sp);
        let mut narrow = 0;
        if WIDE {
            for j0 in (0..wide_part(width)).step_by(2 * LANES) {
                let (mut acc0, mut acc1) = ([[0f32; LANES]; ROWS], [[0f32; LANES]; ROWS]);
                for p in 0..d {
                    let row = p * c.sp + j0;
                    let (t0, t1) = (whole(t, row), whole(t, row + LANES));
                    let a = [x[at[0] + p], x[at[1] + p], x[at[2] + p], x[at[3] + p]];
                    block_fma(&mut acc0, a, t0);
                    block_fma(&mut acc1, a, t1);
                }
                for (k, (row0, row1)) in acc0.iter().zip(&acc1).enumerate().take(r) {
                    let dst = &mut out[(i0 - c.lo + k) * c.sp + j0..][..2 * LANES];
                    let (d0, d1) = dst.split_at_mut(LANES);
                    for (o, &v) in d0.iter_mut().zip(row0) {
                        *o = v * scale;
                    }
                    for (o, &v) in d1.iter_mut().zip(row1) {
                        *o = v * scale;
                    }
                }
            }
            narrow = wide_part(width);
        }
        for j0 in (narrow..width).step_by(LANES) {
            let mut acc = [[0f32; LANES]; ROWS];
            for p in 0..d {
                let tv = whole(t, p * c.sp + j0);
                block_fma(
                    &mut acc,
                    [x[at[0] + p], x[at[1] + p], x[at[2] + p], x[at[3] + p]],
                    tv,
                );
            }
            for (k, row) in acc.iter().enumerate().take(r) {
                let dst = &mut out[(i0 - c.lo + k) * c.sp + j0..][..LANES];
                for (o, &v) in dst.iter_mut().zip(row) {
                    *o = v * scale;
                }
            }
        }
    }
}

/// `out[(i − lo)·sp + j] = scale·Σₚ x[i·xs + p]·y[j·ys + p]` for every query
/// `i` of the pass and exactly the keys it sees, each score one dot product
/// of a query row and a key row in [`LANES`] partial sums combined pairwise:
/// for problems of fewer queries than a register block's rows (a decoding
/// step's one query per head), where transposing the keys for
/// [`products_loop`] costs more than the products and its blocks would
/// repeat the one row.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dots_loop(
    x: &[f32],
    xs: usize,
    y: &[f32],
    ys: usize,
    d: usize,
    c: Causal,
    scale: f32,
    out: &mut [f32],
) {
    for i in c.lo..c.hi {
        let (xv, xt) = x[i * xs..][..d].as_chunks::<LANES>();
        let row = &mut out[(i - c.lo) * c.sp..][..c.seen(i)];
        for (j, o) in row.iter_mut().enumerate() {
            let (yv, yt) = y[j * ys..][..d].as_chunks::<LANES>();
            let mut acc = [0f32; LANES];
            for (a, b) in xv.iter().zip(yv) {
                for (l, acc) in acc.iter_mut().enumerate() {
                    *acc = a[l].mul_add(b[l], *acc);
                }
            }
            for (acc, (&a, &b)) in acc.iter_mut().zip(xt.iter().zip(yt)) {
                *acc = a.mul_add(b, *acc);
            }
            *o = scale * lane_sum(LANES, |l| acc[l]);
        }
    }
}

/// The starts of a block's `ROWS` rows, `width` apart, from row `i0`,
/// rows past the `r` real ones repeating the last (their sums are
/// computed and dropped, so the block's loop has no branches).
#[inline(always)]
fn block_rows(i0: usize, r: usize, width: usize) -> [usize; ROWS] {
    std::array::from_fn(|k| (i0 + k.min(r - 1)) * width)
}

/// `LANES` floats of `x` from `at`.
#[inline(always)]
fn whole(x: &[f32], at: usize) -> &[f32; LANES] {
    x[at..at + LANES].try_into().expect("LANES floats")
}

/// The extent of `n` columns that whole blocks two vectors wide cover.
#[inline(always)]
fn wide_part(n: usize) -> usize {
    n - n % (2 * LANES)
}

/// A wide block's row, two vectors, into `out` from `at`.
#[inline(always)]
fn store_pair(out: &mut [f32], at: usize, v0: &[f32; LANES], v1: &[f32; LANES]) {
    let dst = &mut out[at..][..2 * LANES];
    dst[..LANES].copy_from_slice(v0);
    dst[LANES..].copy_from_slice(v1);
}

/// `ROWS` floats of `x` from `at`.
#[inline(always)]
fn whole_rows(x: &[f32], at: usize) -> &[f32; ROWS] {
    x[at..at + ROWS].try_into().expect("ROWS floats")
}

/// `acc[k] += a[k]·v` for the block's `ROWS` rows.
#[inline(always)]
fn block_fma(acc: &mut [[f32; LANES]; ROWS], a: [f32; ROWS], v: &[f32; LANES]) {
    for (row, a) in acc.iter_mut().zip(a) {
        fma_row(row, a, v);
    }
}

/// `out[i·os..][..d] = Σ_{j < seen(i)} w[i·sp + j]·y[j·ys..]`, keys
/// ascending: `P·v` or `dS·k`.
///
/// `WIDE` blocks take two vectors of columns at a time, as far as they go
/// ([`WIDE_SETS`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weighted_loop<const WIDE: bool>(
    w: &[f32],
    y: &[f32],
    ys: usize,
    d: usize,
    c: Causal,
    out: &mut [f32],
    os: usize,
) {
    for i0 in (c.lo..c.hi).step_by(ROWS) {
        let r = ROWS.min(c.hi - i0);
        // Keys every row of the block sees, then each row's own.
        let common = c.seen(i0);
        if r == 1 {
            // A lone row (a decoding step's query, a pass's last row): the
            // chain the block would give it, without the block's copies.
            let wi = &w[(i0 - c.lo) * c.sp..][..common];
            for c0 in (0..d).step_by(LANES) {
                let cw = LANES.min(d - c0);
                let mut acc = [0f32; LANES];
                for (j, &a) in wi.iter().enumerate() {
                    fma_row(&mut acc, a, &lanes(y, j * ys + c0, cw));
                }
                out[i0 * os + c0..][..cw].copy_from_slice(&acc[..cw]);
            }
            continue;
        }
        let at = block_rows(i0 - c.lo, r, c.sp);
        let mut narrow = 0;
        if WIDE {
            for c0 in (0..wide_part(d)).step_by(2 * LANES) {
                let (mut acc0, mut acc1) = ([[0f32; LANES]; ROWS], [[0f32; LANES]; ROWS]);
                for j in 0..common {
                    let a = [w[at[0] + j], w[at[1] + j], w[at[2] + j], w[at[3] + j]];
                    block_fma(&mut acc0, a, whole(y, j * ys + c0));
                    block_fma(&mut acc1, a, whole(y, j * ys + c0 + LANES));
                }
                for (k, (row0, row1)) in acc0.iter_mut().zip(&mut acc1).enumerate().take(r) {
                    for j in common..c.seen(i0 + k) {
                        let a = w[(i0 - c.lo + k) * c.sp + j];
                        fma_row(row0, a, whole(y, j * ys + c0));
                        fma_row(row1, a, whole(y, j * ys + c0 + LANES));
                    }
                    store_pair(out, (i0 + k) * os + c0, row0, row1);
                }
            }
            narrow = wide_part(d);
        }
        for c0 in (narrow..d).step_by(LANES) {
            let cw = LANES.min(d - c0);
            let mut acc = [[0f32; LANES]; ROWS];
            if cw == LANES {
                for j in 0..common {
                    let a = [w[at[0] + j], w[at[1] + j], w[at[2] + j], w[at[3] + j]];
                    block_fma(&mut acc, a, whole(y, j * ys + c0));
                }
            } else {
                for j in 0..common {
                    let a = [w[at[0] + j], w[at[1] + j], w[at[2] + j], w[at[3] + j]];
                    block_fma(&mut acc, a, &lanes(y, j * ys + c0, cw));
                }
            }
            for (k, row) in acc.iter_mut().enumerate().take(r) {
                for j in common..c.seen(i0 + k) {
                    fma_row(
                        row,
                        w[(i0 - c.lo + k) * c.sp + j],
                        &lanes(y, j * ys + c0, cw),
                    );
                }
                out[(i0 + k) * os + c0..][..cw].copy_from_slice(&row[..cw]);
            }
        }
    }
}

/// `out[j·os..][..d] += Σ_{i sees j} w[(i − lo)·sp + j]·x[i·xs..]` over the
/// pass's queries, ascending (a pass continues the chains of multiply-adds
/// the earlier ones left in `out`): `dSᵀ·q` or `Pᵀ·dy`.
///
/// `WIDE` blocks take two vectors of columns at a time, as far as they go
/// ([`WIDE_SETS`]).
#[inline(always)]
fn transposed_weighted_loop<const WIDE: bool>(
    w: &[f32],
    x: &[f32],
    xs: usize,
    d: usize,
    c: Causal,
    out: &mut [f32],
    os: usize,
) {
    if c.lo == c.hi {
        return;
    }
    for j0 in (0..c.keys.min(c.seen(c.hi - 1))).step_by(ROWS) {
        let r = ROWS.min(c.keys - j0);
        // Queries that see every key of the block, after each key's own.
        let common = c.first(j0 + r - 1).clamp(c.lo, c.hi);
        let at: [usize; ROWS] = std::array::from_fn(|k| j0 + k.min(r - 1));
        let mut narrow = 0;
        if WIDE {
            for c0 in (0..wide_part(d)).step_by(2 * LANES) {
                let (mut acc0, mut acc1) = ([[0f32; LANES]; ROWS], [[0f32; LANES]; ROWS]);
                for (k, (row0, row1)) in acc0.iter_mut().zip(&mut acc1).enumerate().take(r) {
                    let o = (j0 + k) * os + c0;
                    (*row0, *row1) = (*whole(out, o), *whole(out, o + LANES));
                    for i in c.first(j0 + k).max(c.lo)..common {
                        let a = w[(i - c.lo) * c.sp + j0 + k];
                        fma_row(row0, a, whole(x, i * xs + c0));
                        fma_row(row1, a, whole(x, i * xs + c0 + LANES));
                    }
                }
                for i in common..c.hi {
                    // All ROWS keys' weights, whole: a block's rows past
                    // the `r` real ones are computed and dropped (the row
                    // holds `sp` ≥ j0 + ROWS of them: both are multiples
                    // of ROWS).
                    let a = *whole_rows(w, (i - c.lo) * c.sp + j0);
                    block_fma(&mut acc0, a, whole(x, i * xs + c0));
                    block_fma(&mut acc1, a, whole(x, i * xs + c0 + LANES));
                }
                for (k, (row0, row1)) in acc0.iter().zip(&acc1).enumerate().take(r) {
                    store_pair(out, (j0 + k) * os + c0, row0, row1);
                }
            }
            narrow = wide_part(d);
        }
        for c0 in (narrow..d).step_by(LANES) {
            let cw = LANES.min(d - c0);
            let mut acc = [[0f32; LANES]; ROWS];
            for (k, row) in acc.iter_mut().enumerate().take(r) {
                *row = lanes(out, (j0 + k) * os + c0, cw);
                for i in c.first(j0 + k).max(c.lo)..common {
                    let a = w[(i - c.lo) * c.sp + j0 + k];
                    fma_row(row, a, &lanes(x, i * xs + c0, cw));
                }
            }
            for i in common..c.hi {
                let row = &w[(i - c.lo) * c.sp..];
                let a = [row[at[0]], row[at[1]], row[at[2]], row[at[3]]];
                if cw == LANES {
                    block_fma(&mut acc, a, whole(x, i * xs + c0));
                } else {
                    block_fma(&mut acc, a, &lanes(x, i * xs + c0, cw));
                }
            }
            for (k, row) in acc.iter().enumerate().take(r) {
                out[(j0 + k) * os + c0..][..cw].copy_from_slice(&row[..cw]);
            }
        }
    }
}

/// Each row of (scaled) scores turned into its probabilities over the
/// keys it sees, zeros after: the model of
/// [`SoftmaxRow`](kiln_core::bounds::SoftmaxRow) — the max, shifts, `exp`,
/// a fixed-order sum, a division.
///
/// A row is worked on in whole vectors: the lanes of its last vector past
/// the keys it sees are set to −∞ (the max ignores them) and, once the
/// exponentials are in (of whole vectors too), to 0 before the sum (which adds them to partial
/// sums they leave unchanged) — one blend under a [`KEEP`] mask, not a
/// fill of a varying length, which compiled to a call to `memset` — so no
/// loop has a scalar tail: the rows of a causal problem are 1 to `S` keys
/// long, and their tails took half the softmax's time. The bits are those
/// of the row alone.
#[inline(always)]
fn softmax_rows_loop(p: &mut [f32], c: Causal, exp: MapKernel, shifted: &mut [f32]) {
    for i in c.lo..c.hi {
        let (seen, row) = (c.seen(i), &mut p[(i - c.lo) * c.sp..(i - c.lo + 1) * c.sp]);
        let whole = seen.next_multiple_of(LANES);
        let (row, rest) = row.split_at_mut(whole);
        past(row, seen, f32::NEG_INFINITY);
        let max = row_max(row.as_chunks::<LANES>().0);
        let shifted = &mut shifted[..whole];
        for (s, x) in shifted
            .as_chunks_mut::<LANES>()
            .0
            .iter_mut()
            .zip(row.as_chunks::<LANES>().0)
        {
            for (s, &x) in s.iter_mut().zip(x) {
                *s = x - max;
            }
        }
        // Whole vectors (the lanes past the keys seen are −∞ − max, whose
        // exponentials are replaced by zeros): a masked store of the last
        // vector, read back whole at once, had the sum wait for it.
        // SAFETY: `exp` came from `transcendental` for a checked set.
        unsafe { exp(shifted, row) };
        past(row, seen, 0.0);
        let sum = lane_sum_whole(row.as_chunks::<LANES>().0);
        for x in row.as_chunks_mut::<LANES>().0 {
            for x in x.iter_mut() {
                *x /= sum;
            }
        }
        // 0/sum is 0 unless the row is NaN: zeros after, whatever the row.
        past(row, seen, 0.0);
        rest.fill(0.0);
    }
}

/// `KEEP[t][l]`: all ones for the lanes `l < t` of a row's last vector
/// that hold keys the row sees, zeros past them.
static KEEP: [[u32; LANES]; LANES + 1] = {
    let mut keep = [[0; LANES]; LANES + 1];
    let mut t = 0;
    while t <= LANES {
        let mut l = 0;
        while l < t {
            keep[t][l] = u32::MAX;
            l += 1;
        }
        t += 1;
    }
    keep
};

/// Sets the elements of `row` from `seen` on to `value` (`row` the whole
/// vectors that hold the `seen` keys, so only its last vector has such
/// lanes): one vector's blend under a mask from [`KEEP`] (a comparison of
/// the lane with the count compiled back into a `memset` of the lanes
/// past it).
#[inline(always)]
fn past(row: &mut [f32], seen: usize, value: f32) {
    let at = row.len() - LANES;
    let last: &mut [f32; LANES] = (&mut row[at..]).try_into().expect("LANES floats");
    let (keep, value) = (&KEEP[seen - at], value.to_bits());
    for (x, &k) in last.iter_mut().zip(keep) {
        *x = f32::from_bits((x.to_bits() & k) | (value & !k));
    }
}

/// The largest of a row's scores, NaN aside: a NaN score still makes the
/// row's probabilities all NaN (its shifted score is NaN, so is the sum
/// every probability is divided by), as a NaN maximum would. The lanes'
/// maxima are combined pairwise, in vectors (one lane at a time, they
/// were a fifth of the softmax's time); the max of numbers does not
/// depend on the order.
#[inline(always)]
fn row_max(x: &[[f32; LANES]]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    for chunk in x {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = if v > *a { v } else { *a };
        }
    }
    // No lane is NaN (a NaN score is never greater): `max` is the select.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] = acc[l].max(acc[l + width]);
        }
    }
    acc[0]
}

/// `dS = P∘(dP − δ)` in place of `dP`, `δᵢ = Σⱼ PᵢⱼdPᵢⱼ` over the keys row
/// `i` sees; zeros after.
#[inline(always)]
fn score_grads_loop(p: &[f32], dp: &mut [f32], c: Causal) {
    for i in c.lo..c.hi {
        let (seen, at) = (c.seen(i), (i - c.lo) * c.sp);
        // Whole vectors, as in `softmax_rows_loop`: past the keys seen,
        // `P` is 0 and `dP` is set to 0, adding nothing to δ.
        let whole = seen.next_multiple_of(LANES);
        let (pr, dr) = (&p[at..][..whole], &mut dp[at..at + c.sp]);
        let (dr, rest) = dr.split_at_mut(whole);
        past(dr, seen, 0.0);
        // `lane_sum` of the products, a vector at a time.
        let mut acc = [0f32; LANES];
        for (pj, g) in pr
            .as_chunks::<LANES>()
            .0
            .iter()
            .zip(dr.as_chunks::<LANES>().0)
        {
            for (a, (&pj, &g)) in acc.iter_mut().zip(pj.iter().zip(g)) {
                *a += pj * g;
            }
        }
        let delta = combine(acc);
        for (g, pj) in dr
            .as_chunks_mut::<LANES>()
            .0
            .iter_mut()
            .zip(pr.as_chunks::<LANES>().0)
        {
            for (g, &pj) in g.iter_mut().zip(pj) {
                *g = pj * (*g - delta);
            }
        }
        // 0·(0 − δ) is −0 for δ > 0: zeros after, whatever δ.
        past(dr, seen, 0.0);
        rest.fill(0.0);
    }
}

/// `x[i·sp + j] *= m[i·sp + j]` over the keys each query of the pass
/// sees: dropout factors applied to probabilities or to their gradients.
#[inline(always)]
fn dropped_loop(x: &mut [f32], m: &[f32], c: Causal) {
    for i in c.lo..c.hi {
        let at = (i - c.lo) * c.sp;
        let seen = c.seen(i);
        for (x, &f) in x[at..at + seen].iter_mut().zip(&m[at..at + seen]) {
            *x *= f;
        }
    }
}

wide::per_set! {
    /// Dropout factors applied ([`dropped_loop`]).
    fn dropped(x: &mut [f32], m: &[f32], c: Causal) -> () = dropped_loop;
}

/// The kernel sets whose loops take blocks two vectors wide (`WIDE`): a
/// block of [`ROWS`] × 2 vectors keeps 8 accumulators in AVX-512's 32
/// registers beside its operands, and needs 2 vector loads and 4
/// broadcasts per 8 multiply-adds where a block one vector wide needs 1
/// and 4 per 4. AVX2 (16 registers) and NEON (32 of a quarter the width)
/// would spill them. Each sum's chain of multiply-adds is the same either
/// way: so are the bits.
const WIDE_SETS: [KernelSet; 1] = [KernelSet::Avx512];

/// Declares `$name(set, …)` running `$narrow` or, on [`WIDE_SETS`],
/// `$wide`.
macro_rules! wide_or_narrow {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) = $loop:ident, $wide:ident, $narrow:ident;) => {
        wide::per_set! {
            /// The loop's blocks two vectors wide.
            fn $wide($($arg: $ty),*) -> () = $loop::<true>;
        }
        wide::per_set! {
            /// The loop's blocks one vector wide.
            fn $narrow($($arg: $ty),*) -> () = $loop::<false>;
        }
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        fn $name(set: KernelSet, $($arg: $ty),*) {
            if WIDE_SETS.contains(&set) {
                $wide(set, $($arg),*)
            } else {
                $narrow(set, $($arg),*)
            }
        }
    };
}

wide_or_narrow! {
    /// Scores or their gradients' products ([`products_loop`]).
    fn products(x: &[f32], xs: usize, t: &[f32], d: usize, c: Causal, scale: f32, out: &mut [f32]) = products_loop, products_wide, products_narrow;
}

wide::per_set! {
    /// Scores as one dot product each ([`dots_loop`]).
    fn dots(x: &[f32], xs: usize, y: &[f32], ys: usize, d: usize, c: Causal, scale: f32, out: &mut [f32]) -> () = dots_loop;
}

wide_or_narrow! {
    /// A causal weighted sum of rows ([`weighted_loop`]).
    fn weighted(w: &[f32], y: &[f32], ys: usize, d: usize, c: Causal, out: &mut [f32], os: usize) = weighted_loop, weighted_wide, weighted_narrow;
}

wide_or_narrow! {
    /// Its transposed form ([`transposed_weighted_loop`]).
    fn transposed_weighted(w: &[f32], x: &[f32], xs: usize, d: usize, c: Causal, out: &mut [f32], os: usize) = transposed_weighted_loop, transposed_weighted_wide, transposed_weighted_narrow;
}

wide::per_set! {
    /// Probabilities from scores ([`softmax_rows_loop`]).
    fn softmax_rows(p: &mut [f32], c: Causal, exp: MapKernel, shifted: &mut [f32]) -> () = softmax_rows_loop;
}

wide::per_set! {
    /// The scores' gradients ([`score_grads_loop`]).
    fn score_grads(p: &[f32], dp: &mut [f32], c: Causal) -> () = score_grads_loop;
}

/// `x`'s first `rows` rows of `cols` floats transposed into `out`
/// (`[cols, stride]`), each of its rows zero past `rows`: 8 × 8 blocks
/// through registers where AVX is present (one scattered store per
/// element made the transposes of a GPT's keys a tenth of its attention's
/// forward pass).
fn transposed(x: Rows<'_>, [rows, cols]: [usize; 2], stride: usize, out: &mut [f32]) {
    crate::gemm::pack::transpose_into(x.data, x.stride, [rows, cols], out, stride);
    if stride > rows {
        for row in out.chunks_exact_mut(stride).take(cols) {
            row[rows..].fill(0.0);
        }
    }
}

/// One problem's operands (f32 rows, each its own distance apart: heads
/// side by side are read in place), its keys transposed (unless
/// [`Problem::direct`]), and the score rows of one pass of
/// [`QUERY_BLOCK`] queries, in a buffer of the thread's
/// ([`crate::scratch`]: a decoding step runs a few tiny problems per
/// token, and allocating their buffers cost more than transposing).
struct Problem<'a> {
    set: KernelSet,
    exp: MapKernel,
    plan: &'a AttentionPlan,
    /// Which problem of the batch this is.
    b: usize,
    q: Rows<'a>,
    k: Rows<'a>,
    v: Rows<'a>,
    d: usize,
    /// The whole problem's extents (queries `0..T`).
    causal: Causal,
    /// The keys transposed, `[D, sp]` (zeros past the keys); empty when
    /// the scores are [`dots`] of rows ([`Problem::direct`]).
    kt: &'a mut [f32],
    /// One pass's probabilities, `[QUERY_BLOCK, sp]`.
    p: &'a mut [f32],
    /// One pass's dropout factors, as `p` (empty without dropout).
    m: &'a mut [f32],
    /// A row's shifted scores.
    shifted: &'a mut [f32],
}

impl<'a> Problem<'a> {
    /// Whether `plan`'s scores are dot products of query and key rows
    /// ([`dots`]: fewer queries than a register block's rows) rather than
    /// products with the transposed keys.
    fn direct(plan: &AttentionPlan) -> bool {
        plan.queries < ROWS
    }

    /// The lengths of a problem's buffers (`kt`, `p`, `m`, `shifted`).
    fn buffer_lens(plan: &AttentionPlan) -> [usize; 4] {
        let sp = plan.keys.next_multiple_of(LANES);
        let rows = QUERY_BLOCK.min(plan.queries) * sp;
        let m = if plan.dropout.is_some() { rows } else { 0 };
        let kt = if Self::direct(plan) { 0 } else { plan.dim * sp };
        [kt, rows, m, sp]
    }

    /// Runs `f` on problem `b` of `plan`, its buffers from the thread's
    /// scratch.
    fn with<R>(
        set: KernelSet,
        exp: MapKernel,
        plan: &AttentionPlan,
        b: usize,
        operands: [&Slabs<'_>; 3],
        f: impl FnOnce(&mut Problem<'_>) -> R,
    ) -> R {
        let lens = Self::buffer_lens(plan);
        // Not zeroed: every loop reads only what this problem wrote — the
        // keys' padding is zeroed where they are transposed, and the
        // softmax and the score gradients write each of their rows whole
        // (masked past the keys seen) before anything reads it. Zeroing
        // took 5 % of the backward pass's time in `memset`.
        scratch::sized(lens.iter().sum(), |buf| {
            let (kt, rest) = buf.split_at_mut(lens[0]);
            let (p, rest) = rest.split_at_mut(lens[1]);
            let (m, shifted) = rest.split_at_mut(lens[2]);
            f(&mut Problem::new(
                set,
                exp,
                plan,
                b,
                operands,
                [kt, p, m, shifted],
            ))
        })
    }

    /// Problem `b`'s operands, in `buffers` (of [`Problem::buffer_lens`],
    /// holding anything).
    fn new(
        set: KernelSet,
        exp: MapKernel,
        plan: &'a AttentionPlan,
        b: usize,
        [q, k, v]: [&'a Slabs<'_>; 3],
        [kt, p, m, shifted]: [&'a mut [f32]; 4],
    ) -> Self {
        let (t, s, d) = (plan.queries, plan.keys, plan.dim);
        let causal = Causal {
            lo: 0,
            hi: t,
            keys: s,
            extra: s - t,
            sp: s.next_multiple_of(LANES),
        };
        let (q, k, v) = (q.problem(b), k.problem(b), v.problem(b));
        if !Self::direct(plan) {
            transposed(k, [s, d], causal.sp, kt);
        }
        Problem {
            set,
            exp,
            plan,
            b,
            q,
            k,
            v,
            d,
            causal,
            kt,
            p,
            m,
            shifted,
        }
    }

    /// The probabilities of pass `c`'s queries into `self.p`.
    fn probabilities(&mut self, c: Causal) {
        let (set, d, scale) = (self.set, self.d, self.plan.scale);
        let (q, k) = (self.q, self.k);
        if Self::direct(self.plan) {
            dots(set, q.data, q.stride, k.data, k.stride, d, c, scale, self.p);
        } else {
            products(set, q.data, q.stride, self.kt, d, c, scale, self.p);
        }
        softmax_rows(self.set, self.p, c, self.exp, self.shifted);
    }

    /// Pass `c`'s dropout factors into `self.m`; false (and nothing
    /// drawn) without dropout.
    fn factors(&mut self, c: Causal) -> bool {
        let Some(d) = self.plan.dropout else {
            return false;
        };
        for i in c.lo..c.hi {
            let row = &mut self.m[(i - c.lo) * c.sp..][..c.seen(i)];
            let first = self.plan.first_weight(self.b, i);
            random::uniforms(self.set, d.seed, d.offset, first, row, |u| d.factor_of(u));
        }
        true
    }

    /// `y = P̃·v` (its `T` rows of `D`, `y.stride` apart).
    fn forward(&mut self, y: RowsMut<'_>) {
        let v = self.v;
        for c in self.causal.passes() {
            self.probabilities(c);
            if self.factors(c) {
                dropped(self.set, self.p, self.m, c);
            }
            weighted(
                self.set, self.p, v.data, v.stride, self.d, c, y.data, y.stride,
            );
        }
    }

    /// `dq` (`T` rows of `D`), `dk` and `dv` (`S` rows; zeros on entry)
    /// from this problem's `dy` rows, before the scale on `dq` and `dk`.
    fn backward(&mut self, dy: Rows<'_>, dq: RowsMut<'_>, dk: RowsMut<'_>, dv: RowsMut<'_>) {
        let (d, v) = (self.d, self.v);
        let (sp, rows) = (self.causal.sp, self.p.len());
        scratch::sized(d * sp + rows, |buf| {
            let (vt, ds) = buf.split_at_mut(d * sp);
            transposed(v, [self.causal.keys, d], sp, vt);
            self.backward_passes(dy, [dq, dk, dv], vt, ds);
        })
    }

    /// [`Problem::backward`]'s passes, with `vt` the values transposed
    /// and `ds` a pass's score gradients.
    fn backward_passes(
        &mut self,
        dy: Rows<'_>,
        [dq, dk, dv]: [RowsMut<'_>; 3],
        vt: &[f32],
        ds: &mut [f32],
    ) {
        let (set, d) = (self.set, self.d);
        let (q, k) = (self.q, self.k);
        for c in self.causal.passes() {
            self.probabilities(c);
            let dropout = self.factors(c);
            products(set, dy.data, dy.stride, vt, d, c, 1.0, ds);
            if dropout {
                // dP = (dy·vᵀ)∘M; δ and dS use the undropped P.
                dropped(set, ds, self.m, c);
            }
            score_grads(set, self.p, ds, c);
            weighted(set, ds, k.data, k.stride, d, c, dq.data, dq.stride);
            transposed_weighted(set, ds, q.data, q.stride, d, c, dk.data, dk.stride);
            if dropout {
                // dv = P̃ᵀ·dy.
                dropped(set, self.p, self.m, c);
            }
            transposed_weighted(set, self.p, dy.data, dy.stride, d, c, dv.data, dv.stride);
        }
    }
}

/// The f32 operands of `plan`, row-major, for the scalar reference (`set`
/// the scalar one, no pool; the SIMD sets read [`Slabs`]): contiguous
/// 16-bit ones widened with `set`'s vector conversion, over `pool`'s
/// threads where one is given.
pub(crate) fn operands<'a>(
    set: KernelSet,
    pool: Option<&Workers>,
    op: &'static str,
    views: [View<'a, HostData>; 3],
) -> Result<[std::borrow::Cow<'a, [f32]>; 3]> {
    let read = |v| convert::read_f32(set, pool, op, v);
    let [q, k, v] = views;
    Ok([read(q)?, read(k)?, read(v)?])
}

/// One problem's rows of an operand: row `i` is `data[i·stride..][..D]`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    stride: usize,
}

/// One problem's rows of a result, as [`Rows`]: heads side by side are
/// `heads·D` apart, the other heads' rows between them (the problems of
/// an example are worked one after another).
struct RowsMut<'a> {
    data: &'a mut [f32],
    stride: usize,
}

impl<'a> RowsMut<'a> {
    /// Head `h` (of `heads`, `d` wide) of an example's row-major
    /// `[rows, heads·d]` result.
    fn head(example: &'a mut [f32], h: usize, heads: usize, d: usize) -> Self {
        // (An example of no rows has no head to offset to.)
        let at = (h * d).min(example.len());
        RowsMut {
            data: &mut example[at..],
            stride: heads * d,
        }
    }
}

/// An `[n, rows, heads·D]` operand in f32, its problems' rows in place:
/// problem `e·heads + h`'s row `i` at
/// `data[e·example + i·row + h·D..][..D]`.
struct Slabs<'a> {
    data: std::borrow::Cow<'a, [f32]>,
    /// Floats from one example's rows to the next's, and from one row to
    /// the next.
    example: usize,
    row: usize,
    rows: usize,
    heads: usize,
    dim: usize,
}

impl<'a> Slabs<'a> {
    /// `view`'s problems (of `plan`): borrowed in place when it is f32
    /// and each row's elements are adjacent, however far apart the rows
    /// and examples are (heads side by side in a fused projection, a
    /// decoding step's keys and values: a cache narrowed to the positions
    /// filled so far); otherwise read row-major as [`operands`] does.
    fn of(
        set: KernelSet,
        pool: &Workers,
        op: &'static str,
        view: View<'a, HostData>,
        plan: &AttentionPlan,
    ) -> Result<Self> {
        let dims = view.layout.dims();
        let (heads, dim) = (plan.heads, plan.dim);
        let in_place = AttentionPlan::rows_in_place(view.layout);
        if let (HostData::F32(data), &[n, r, w], Some((sn, sr))) = (view.storage, dims, in_place) {
            if n > 0 && r > 0 && w > 0 {
                let start = view.layout.offset();
                let end = start + (n - 1) * sn + (r - 1) * sr + w;
                if end <= data.len() {
                    return Ok(Slabs {
                        data: std::borrow::Cow::Borrowed(&data[start..end]),
                        example: sn,
                        row: sr,
                        rows: r,
                        heads,
                        dim,
                    });
                }
            }
        }
        let (rows, width) = (dims[1], dims[2]);
        let data = convert::read_f32(set, Some(pool), op, view)?;
        Ok(Slabs {
            data,
            example: rows * width,
            row: width,
            rows,
            heads,
            dim,
        })
    }

    /// Problem `b`'s rows.
    fn problem(&self, b: usize) -> Rows<'_> {
        if self.rows == 0 || self.dim == 0 {
            return Rows {
                data: &[],
                stride: self.row,
            };
        }
        let start = b / self.heads * self.example + b % self.heads * self.dim;
        Rows {
            data: &self.data[start..start + (self.rows - 1) * self.row + self.dim],
            stride: self.row,
        }
    }
}

/// `set`'s vector exp (every SIMD set has one).
fn vector_exp(op: &str, set: KernelSet) -> Result<MapKernel> {
    transcendental(set, UnaryOp::Exp).ok_or_else(|| {
        kiln_core::Error::invalid(format!("{op}: no vector exp for kernel set {}", set.name()))
    })
}

/// [`kiln_core::Backend::attention_causal`] with `set`'s loops, whole
/// examples (all their heads) per task on `pool`, each task zeroing and
/// filling its run of the output (heads side by side read and written in
/// place).
pub(crate) fn attention_causal(
    set: KernelSet,
    pool: &Workers,
    q: View<'_, HostData>,
    k: View<'_, HostData>,
    v: View<'_, HostData>,
    options: &AttentionOptions,
) -> Result<HostData> {
    let op = "attention_causal";
    let plan = AttentionPlan::new(q, k, v, options)?;
    let [qs, ks, vs] = [q, k, v].map(|x| Slabs::of(set, pool, op, x, &plan));
    let (qs, ks, vs) = (qs?, ks?, vs?);
    let exp = vector_exp(op, set)?;
    let (h, t, d) = (plan.heads, plan.queries, plan.dim);
    let len = plan.batch * t * d;
    let each = (t * d).max(1);
    let operands = [&qs, &ks, &vs];
    let fill = |start: usize, out: &mut [MaybeUninit<f32>]| {
        let y = fresh::zeros(out);
        let first = start / each;
        for (e, example) in y.chunks_exact_mut(h * each).enumerate() {
            for j in 0..h {
                let b = first + e * h + j;
                Problem::with(set, exp, &plan, b, operands, |p| {
                    p.forward(RowsMut::head(example, j, h, d))
                });
            }
        }
    };
    // Small problems (decoding: one query per head) are grouped, so that a
    // call's few heads do not fork the team for a microsecond of work.
    let per_task = (TASK_MIN_WORK / (t * plan.keys * d).max(1))
        .max(1)
        .next_multiple_of(h);
    // SAFETY: `fill` zeroes every chunk it is handed before anything else.
    let y = unsafe { pool.filled(len, per_task * t * d, fill) };
    convert::store_f32_on(set, Some(pool), op, plan.dtype, y)
}

/// [`kiln_core::Backend::attention_causal_backward`] with `set`'s loops,
/// one example (all its heads) per task on `pool`.
pub(crate) fn attention_causal_backward(
    set: KernelSet,
    pool: &Workers,
    q: View<'_, HostData>,
    k: View<'_, HostData>,
    v: View<'_, HostData>,
    dy: View<'_, HostData>,
    options: &AttentionOptions,
) -> Result<AttentionGrads<HostData>> {
    let op = "attention_causal_backward";
    let plan = AttentionPlan::backward(q, k, v, dy, options)?;
    let [qs, ks, vs, dys] = [q, k, v, dy].map(|x| Slabs::of(set, pool, op, x, &plan));
    let (qs, ks, vs, dys) = (qs?, ks?, vs?, dys?);
    let exp = vector_exp(op, set)?;
    let (n, h, t, s, d) = (plan.batch, plan.heads, plan.queries, plan.keys, plan.dim);
    let (mut dq, mut dk, mut dv) = (
        Vec::with_capacity(n * t * d),
        Vec::with_capacity(n * s * d),
        Vec::with_capacity(n * s * d),
    );
    let examples = n / h;
    let jobs: Vec<_> = per_example(&mut dq, examples, h * t * d)
        .into_iter()
        .zip(per_example(&mut dk, examples, h * s * d))
        .zip(per_example(&mut dv, examples, h * s * d))
        .enumerate()
        .collect();
    let operands = [&qs, &ks, &vs];
    pool.for_each(jobs, |(e, ((dq, dk), dv))| {
        // Zeroed by the thread that accumulates into them.
        let (dq, dk, dv) = (fresh::zeros(dq), fresh::zeros(dk), fresh::zeros(dv));
        for j in 0..h {
            let b = e * h + j;
            let dy = dys.problem(b);
            let [gq, gk, gv] = [&mut *dq, &mut *dk, &mut *dv].map(|g| RowsMut::head(g, j, h, d));
            Problem::with(set, exp, &plan, b, operands, |p| p.backward(dy, gq, gk, gv));
        }
        // The example's heads are side by side: one pass scales them all.
        let scale = plan.scale;
        wide::update(set, dq, |x| x * scale);
        wide::update(set, dk, |x| x * scale);
    });
    // SAFETY: the examples' slices cover each buffer's `0..len`, and
    // every task zeroed its three slices first (`for_each` ran them all,
    // or resumed a task's panic before this line).
    unsafe {
        dq.set_len(n * t * d);
        dk.set_len(n * s * d);
        dv.set_len(n * s * d);
    }
    Ok(AttentionGrads {
        dq: convert::store_f32_on(set, Some(pool), op, plan.dtype, dq)?,
        dk: convert::store_f32_on(set, Some(pool), op, plan.dtype, dk)?,
        dv: convert::store_f32_on(set, Some(pool), op, plan.dtype, dv)?,
    })
}

/// The fresh `buf`'s first `n·each` slots as `n` slices of `each` (empty
/// when `each` is 0), one per example.
fn per_example(buf: &mut Vec<f32>, n: usize, each: usize) -> Vec<&mut [MaybeUninit<f32>]> {
    let mut rest = &mut buf.spare_capacity_mut()[..n * each];
    (0..n)
        .map(|_| {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(each);
            rest = tail;
            part
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wide blocks give the narrow ones' bits — the same chains of
    /// multiply-adds — for every loop, at widths with and without a
    /// narrow remainder (`d` 16 to 72, keys 1 to 70, in passes that start
    /// past 0), on every set this processor runs.
    #[test]
    fn wide_blocks_give_the_narrow_blocks_bits() {
        let val = |i: usize, s: usize| ((i * 7919 + s * 104_729) % 1013) as f32 / 512.0 - 0.99;
        for set in KernelSet::ALL.into_iter().filter(|s| s.available()) {
            for (t, d) in [
                (1usize, 32usize),
                (5, 16),
                (17, 40),
                (64, 32),
                (70, 64),
                (33, 72),
                (40, 48),
            ] {
                let sp = t.next_multiple_of(LANES);
                let whole = Causal {
                    lo: 0,
                    hi: t,
                    keys: t,
                    extra: 0,
                    sp,
                };
                // A second pass of queries, as a long problem runs it.
                let pass = Causal { lo: t / 3, ..whole };
                let (xs, os) = (d + 3, d + 5);
                let x: Vec<f32> = (0..t * xs).map(|i| val(i, 1)).collect();
                let kt: Vec<f32> = (0..d * sp).map(|i| val(i, 2)).collect();
                let w: Vec<f32> = (0..t * sp).map(|i| val(i, 3)).collect();
                let y: Vec<f32> = (0..t * xs).map(|i| val(i, 4)).collect();
                let start: Vec<f32> = (0..t * os).map(|i| val(i, 5)).collect();
                for c in [whole, pass] {
                    let (mut a, mut b) = (vec![0f32; t * sp], vec![0f32; t * sp]);
                    products_wide(set, &x, xs, &kt, d, c, 0.25, &mut a);
                    products_narrow(set, &x, xs, &kt, d, c, 0.25, &mut b);
                    assert_eq!(a, b, "products, {set:?}, t {t}, d {d}, from {}", c.lo);
                    let (mut a, mut b) = (start.clone(), start.clone());
                    weighted_wide(set, &w, &y, xs, d, c, &mut a, os);
                    weighted_narrow(set, &w, &y, xs, d, c, &mut b, os);
                    assert_eq!(a, b, "weighted, {set:?}, t {t}, d {d}, from {}", c.lo);
                    let (mut a, mut b) = (start.clone(), start.clone());
                    transposed_weighted_wide(set, &w, &x, xs, d, c, &mut a, os);
                    transposed_weighted_narrow(set, &w, &x, xs, d, c, &mut b, os);
                    assert_eq!(a, b, "transposed, {set:?}, t {t}, d {d}, from {}", c.lo);
                    assert_ne!(a, start, "transposed, {set:?}: nothing added");
                }
            }
        }
    }
}
