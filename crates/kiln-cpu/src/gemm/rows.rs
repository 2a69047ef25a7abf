//! The GEMM for a few rows of A (decoding one token, a batch-1 forward
//! pass): no packing, B's rows read in place.
//!
//! With `m` this small the packed driver spends more time copying B into
//! panels than multiplying (a 128 × 384 weight packed for one row of A).
//! Here each row of C is computed a register block of columns at a time:
//! the block's accumulators stay in registers while `a[i, p]·B[p, block]`
//! is added for p in order, one fused multiply-add per element, in blocks
//! of the set's `KC` added into C — the packed kernel's order exactly, so
//! the two paths give the same bits. Each step is one broadcast and one
//! load of B per vector of accumulators (the loop is bound by B's loads,
//! not by stores of C).
//!
//! One row times a large enough B (a decoding step's weights) is split by
//! columns over the team, each thread's columns summed as above, so the
//! bits do not depend on the thread count. A decoding step reads every
//! weight once per token. On the tenth session's 2-core Xeon the config A
//! GPT's 16 products (3.1 MB of weights) took 89 µs on one thread,
//! streamed from L3 at about 35 GB/s, where two layers' 8 (1.6 MB, within
//! its 2 MB L2) took 19 µs; two threads, each reading half the columns,
//! took 55 µs.

use std::mem::MaybeUninit;

use super::pack::Matrix;
use crate::vector::wide;
use crate::workers::Workers;
use crate::KernelSet;

/// Rows of A at most for which this path runs instead of the packed one.
pub(crate) const MAX_ROWS: usize = 4;

/// Columns of a register block, per set: enough independent chains of
/// multiply-adds to cover their latency, few enough to stay in registers
/// (8 of AVX-512's 32 registers; 8 of AVX2's 16, 16 of NEON's 32).
fn block_columns(set: KernelSet) -> usize {
    match set {
        KernelSet::Avx512 => 128,
        _ => 64,
    }
}

/// `out[j] (=|+=) acc[j]` for the block's `out.len()` columns: the first
/// k block stores, later ones add (as the packed driver).
#[inline(always)]
fn store(out: &mut [f32], acc: &[f32], first: bool) {
    if first {
        out.copy_from_slice(&acc[..out.len()]);
    } else {
        for (o, &x) in out.iter_mut().zip(acc) {
            *o += x;
        }
    }
}

/// Row `i` of C over `out.len() ≤ COLS` columns from `j0`. A whole block's
/// accumulators are one fixed-size array, one flat loop the compiler keeps
/// in registers; a narrower (last) block runs the same sums over a
/// shorter slice.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<const COLS: usize>(
    kc_block: usize,
    a: &Matrix<'_>,
    b: &Matrix<'_>,
    i: usize,
    k: usize,
    j0: usize,
    out: &mut [f32],
) {
    let (bd, w) = (b.data(), out.len());
    for pc in (0..k).step_by(kc_block) {
        let ps = pc..pc + kc_block.min(k - pc);
        let mut acc = [0f32; COLS];
        // Two loops, not a branch in one: with the narrow case's slice in
        // the same loop the accumulators would be kept in memory.
        if w == COLS {
            for p in ps {
                let av = a.at(i, p);
                let at = b.index(p, j0);
                let row: &[f32; COLS] = bd[at..at + COLS].try_into().expect("COLS floats");
                for (c, &x) in acc.iter_mut().zip(row) {
                    *c = av.mul_add(x, *c);
                }
            }
        } else {
            for p in ps {
                let av = a.at(i, p);
                let at = b.index(p, j0);
                for (c, &x) in acc[..w].iter_mut().zip(&bd[at..at + w]) {
                    *c = av.mul_add(x, *c);
                }
            }
        }
        store(out, &acc, pc == 0);
    }
}

/// [`rows_loop`] with register blocks of `COLS` columns (then one of 64
/// where the rest allows).
#[inline(always)]
fn rows_blocked<const COLS: usize>(
    kc_block: usize,
    a: &Matrix<'_>,
    b: &Matrix<'_>,
    (m, k): (usize, usize),
    (j0, w, ldc): (usize, usize, usize),
    c: &mut [MaybeUninit<f32>],
) {
    for (i, row) in c.chunks_mut(ldc).take(m).enumerate() {
        let row = crate::fresh::zeros(&mut row[..w]);
        let whole = w / COLS * COLS;
        let (head, rest) = row.split_at_mut(whole);
        for (blk, out) in head.chunks_mut(COLS).enumerate() {
            block::<COLS>(kc_block, a, b, i, k, j0 + blk * COLS, out);
        }
        let (mid, tail) = rest.split_at_mut(rest.len() / 64 * 64);
        for (blk, out) in mid.chunks_mut(64).enumerate() {
            block::<64>(kc_block, a, b, i, k, j0 + whole + blk * 64, out);
        }
        if !tail.is_empty() {
            let at = j0 + w - tail.len();
            block::<COLS>(kc_block, a, b, i, k, at, tail);
        }
    }
}

/// `c = a·b` over columns `j0..j0 + w` for `m ≤ MAX_ROWS` rows of `a`
/// (`m × k`, any strides) and a `b` (`k × n`) whose rows are contiguous
/// (column stride 1): row `i` of the result into `c[i·ldc..][..w]`, in
/// register blocks of `cols` (128 or 64) columns.
#[inline(always)]
fn rows_loop(
    kc_block: usize,
    cols: usize,
    a: &Matrix<'_>,
    b: &Matrix<'_>,
    mk: (usize, usize),
    columns: (usize, usize, usize),
    c: &mut [MaybeUninit<f32>],
) {
    if cols == 128 {
        rows_blocked::<128>(kc_block, a, b, mk, columns, c);
    } else {
        rows_blocked::<64>(kc_block, a, b, mk, columns, c);
    }
}

wide::per_set! {
    /// [`rows_loop`] compiled for the kernel set.
    fn rows(kc_block: usize, cols: usize, a: &Matrix<'_>, b: &Matrix<'_>, mk: (usize, usize), columns: (usize, usize, usize), c: &mut [MaybeUninit<f32>]) -> () = rows_loop;
}

/// Whether a product of `m` rows with `b` takes this path.
pub(crate) fn applies(set: KernelSet, m: usize, b: &Matrix<'_>) -> bool {
    set != KernelSet::Scalar && m <= MAX_ROWS && b.cs() == 1
}

/// Multiply-adds (`k × n`) from which one row's product is split by
/// columns over the team (a 128 × 128 weight is; forking the team costs
/// about a microsecond).
const SPLIT_MIN_WORK: usize = 1 << 14;

/// Runs the path ([`applies`] must hold).
pub(crate) fn gemm(
    set: KernelSet,
    kc: usize,
    a: &Matrix<'_>,
    b: &Matrix<'_>,
    (m, k, n): (usize, usize, usize),
    c: &mut [MaybeUninit<f32>],
    pool: Option<&Workers>,
) {
    let cols = block_columns(set);
    let threads = pool.map_or(1, Workers::threads);
    if let (Some(pool), true) = (pool, m == 1 && threads > 1 && k * n >= SPLIT_MIN_WORK) {
        let part = n.div_ceil(threads).next_multiple_of(64);
        let jobs: Vec<_> = c[..n].chunks_mut(part).enumerate().collect();
        pool.for_each(jobs, |(t, c)| {
            let w = c.len();
            rows(set, kc, cols, a, b, (1, k), (t * part, w, w), c);
        });
        return;
    }
    rows(set, kc, cols, a, b, (m, k), (0, n, n), c);
}
