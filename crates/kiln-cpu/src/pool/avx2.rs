//! The AVX2 max-pool kernel: whole planes of 2×2 windows at stride 2 (the
//! CNNs' pool), eight output columns at a time, branch-free (each window's
//! winner is chosen by compares and blends, as in the AVX-512 kernel), a
//! short last group by masked loads; outputs are stored, never read, so
//! they may be fresh.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// Eight candidates: values and their plane indices.
type Lanes = (__m256, __m256i);

/// The winner of an earlier candidate (or group of window cells) and a
/// later one, lane by lane: the later one only if the earlier is not NaN
/// and the later is NaN or strictly greater — the sequential scan's rule
/// (first maximum in window order, NaN maximal), whose winner grouping a
/// window's cells by rows gives.
#[inline]
#[target_feature(enable = "avx2")]
fn later_if_greater((b, a): Lanes, (v, idx): Lanes) -> Lanes {
    let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(b, b);
    let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
    let greater = _mm256_cmp_ps::<_CMP_GT_OQ>(v, b);
    let take = _mm256_and_ps(ordered, _mm256_or_ps(nan, greater));
    // The indices blend as bit patterns: a blend moves lanes whole.
    let index = _mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(idx), take);
    (_mm256_blendv_ps(b, v, take), _mm256_castps_si256(index))
}

/// One window row of eight outputs: cells `2t` and `2t + 1` of the sixteen
/// in `lo` (cells 0–7) and `hi` (8–15), the first winning ties, with plane
/// indices from `start`. `even` holds `0, 2, …, 14`.
#[inline]
#[target_feature(enable = "avx2")]
fn window_row(lo: __m256, hi: __m256, start: usize, even: __m256i) -> Lanes {
    // Within each 128-bit half, the even (odd) cells of lo then of hi;
    // then the 64-bit pairs reordered so that lo's come first.
    let split =
        |pairs: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(pairs)));
    let left = split(_mm256_shuffle_ps::<0x88>(lo, hi));
    let right = split(_mm256_shuffle_ps::<0xDD>(lo, hi));
    let idx = _mm256_add_epi32(_mm256_set1_epi32(start as i32), even);
    later_if_greater(
        (left, idx),
        (right, _mm256_add_epi32(idx, _mm256_set1_epi32(1))),
    )
}

/// A whole plane (`w` wide) pooled by 2×2 windows at stride 2, unpadded:
/// `best` and `at` (`oh × ow`) receive the maxima and their plane indices,
/// written, never read. Per eight outputs: two loads per window row, its
/// even and odd columns split by a shuffle and a permute, each row's pair
/// compared, then the rows' winners.
///
/// # Safety
/// The processor supports AVX2; the windows fit the plane (`2·oh·w ≤
/// x.len()`, `2·ow ≤ w`), and `best`, `at` hold `oh·ow`. (The indices are
/// added modulo 2³² in i32 lanes: right where they fit u32, which callers
/// check.)
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn plane_2x2(
    x: &[f32],
    w: usize,
    [oh, ow]: [usize; 2],
    best: &mut [MaybeUninit<f32>],
    at: &mut [MaybeUninit<u32>],
) {
    let even = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for i in 0..oh {
        for j0 in (0..ow).step_by(8) {
            let lanes = (ow - j0).min(8);
            let start = 2 * i * w + 2 * j0;
            let k = i * ow + j0;
            if lanes == 8 {
                // SAFETY: cells start .. start + 16 of window rows 2i and
                // 2i + 1 (w further): columns 2·j0 .. 2·(j0 + 8) ≤ 2·ow
                // ≤ w of rows below 2·oh, inside x (the contract).
                let [tl, th, bl, bh] = [0, 8, w, w + 8]
                    .map(|off| unsafe { _mm256_loadu_ps(x.as_ptr().add(start + off)) });
                let top = window_row(tl, th, start, even);
                let bottom = window_row(bl, bh, start + w, even);
                let (b, a) = later_if_greater(top, bottom);
                // SAFETY: outputs k .. k + 8 of row i, j0 + 8 ≤ ow: inside
                // both (oh·ow each, the contract).
                unsafe {
                    _mm256_storeu_ps(best.as_mut_ptr().add(k).cast(), b);
                    _mm256_storeu_si256(at.as_mut_ptr().add(k).cast(), a);
                }
                continue;
            }
            // The last group, short: its 2·lanes cells of each window row
            // by masked loads (lanes past them zero, read nothing; a copy
            // to the stack read back whole stalled on store forwarding and
            // took half the kernel's time); the padding lanes' winners are
            // dropped.
            let cells = |n: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
            let (lo_mask, hi_mask) = (cells(2 * lanes), cells((2 * lanes).saturating_sub(8)));
            // SAFETY: the kept lanes read cells start + t, t < 2·lanes, of
            // window rows 2i and 2i + 1: columns below 2·ow ≤ w, inside x
            // (the contract); masked-off lanes read nothing.
            let [tl, th, bl, bh] = [(0, lo_mask), (8, hi_mask), (w, lo_mask), (w + 8, hi_mask)]
                .map(|(off, mask)| unsafe {
                    _mm256_maskload_ps(x.as_ptr().wrapping_add(start + off), mask)
                });
            let top = window_row(tl, th, start, even);
            let bottom = window_row(bl, bh, start + w, even);
            let (b, a) = later_if_greater(top, bottom);
            let (mut bs, mut as_) = ([0f32; 8], [0u32; 8]);
            // SAFETY: each store writes the eight lanes of a local array.
            unsafe {
                _mm256_storeu_ps(bs.as_mut_ptr(), b);
                _mm256_storeu_si256(as_.as_mut_ptr().cast(), a);
            }
            for t in 0..lanes {
                best[k + t].write(bs[t]);
                at[k + t].write(as_[t]);
            }
        }
    }
}
