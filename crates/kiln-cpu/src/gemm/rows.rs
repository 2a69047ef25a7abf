//! The GEMM for a few rows of A (decoding one token, a batch-1 forward
//! pass): no packing, B's rows read in place.
//!
//! With `m` this small the packed driver spends more time copying B into
//! panels than multiplying (a 128 × 384 weight packed for one row of A).
//! Here each row of C accumulates `a[i, p]·B[p, :]` for p in order, one
//! fused multiply-add per element, in blocks of the set's `KC` added into C — the
//! packed kernel's order exactly, so the two paths give the same bits.

use std::mem::MaybeUninit;

use super::pack::Matrix;
use crate::vector::wide;
use crate::KernelSet;

/// Rows of A at most for which this path runs instead of the packed one.
pub(crate) const MAX_ROWS: usize = 4;

/// `c = a·b` for `m ≤ MAX_ROWS` rows of `a` (`m × k`, any strides) and a
/// `b` (`k × n`) whose rows are contiguous (column stride 1), into the
/// row-major `m × n` slice `c` (fresh: each row is zeroed, then summed).
#[inline(always)]
fn rows_loop(
    kc_block: usize,
    a: &Matrix<'_>,
    b: &Matrix<'_>,
    m: usize,
    k: usize,
    n: usize,
    c: &mut [MaybeUninit<f32>],
) {
    let bd = b.data();
    let mut block = vec![0f32; n];
    for (i, row) in c.chunks_mut(n).take(m).enumerate() {
        let row = crate::fresh::zeros(row);
        for pc in (0..k).step_by(kc_block) {
            let kc = kc_block.min(k - pc);
            // The first block stores, later ones add, as the packed driver.
            let acc: &mut [f32] = if pc == 0 { &mut *row } else { &mut block };
            if pc > 0 {
                acc.fill(0.0);
            }
            for p in pc..pc + kc {
                let av = a.at(i, p);
                let start = b.index(p, 0);
                let bp = &bd[start..start + n];
                for (cv, &bv) in acc.iter_mut().zip(bp) {
                    *cv = av.mul_add(bv, *cv);
                }
            }
            if pc > 0 {
                for (cv, &t) in row.iter_mut().zip(&block) {
                    *cv += t;
                }
            }
        }
    }
}

wide::per_set! {
    /// [`rows_loop`] compiled for the kernel set.
    fn rows(kc_block: usize, a: &Matrix<'_>, b: &Matrix<'_>, m: usize, k: usize, n: usize, c: &mut [MaybeUninit<f32>]) -> () = rows_loop;
}

/// Whether a product of `m` rows with `b` takes this path.
pub(crate) fn applies(set: KernelSet, m: usize, b: &Matrix<'_>) -> bool {
    set != KernelSet::Scalar && m <= MAX_ROWS && b.cs() == 1
}

/// Runs the path ([`applies`] must hold).
pub(crate) fn gemm(
    set: KernelSet,
    kc: usize,
    a: &Matrix<'_>,
    b: &Matrix<'_>,
    (m, k, n): (usize, usize, usize),
    c: &mut [MaybeUninit<f32>],
) {
    rows(set, kc, a, b, m, k, n, c);
}
