//! The AVX-512 max-pool kernels: a row of outputs for any unpadded window,
//! and whole planes of 2×2 windows at stride 2 (the CNNs' pool). Sixteen
//! output columns at a time, branch-free (the winner of each window is
//! chosen with mask blends, so real data — ReLU outputs full of ties at
//! zero — cannot mispredict), the tail under a mask; outputs are stored,
//! never read, so they may be fresh.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// One output row of an unpadded max-pool (see `super::row`): `best` and
/// `at` receive the maxima and their plane indices of the windows starting
/// at input row `top` — written, never read, so they may be fresh.
///
/// # Safety
/// The processor supports AVX-512F; every window of the row lies inside
/// `x` (`(top + kh − 1)·w + (ow − 1)·sw + kw ≤ x.len()`, checked by the
/// caller), and `best`, `at` have the same length `ow`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn row(
    x: &[f32],
    w: usize,
    top: usize,
    [kh, kw]: [usize; 2],
    sw: usize,
    best: &mut [MaybeUninit<f32>],
    at: &mut [MaybeUninit<u32>],
) {
    let ow = best.len().min(at.len());
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let steps = _mm512_mullo_epi32(lane, _mm512_set1_epi32(sw as i32));
    for j0 in (0..ow).step_by(16) {
        let lanes = (ow - j0).min(16);
        let mask: __mmask16 = ((1u32 << lanes) - 1) as u16;
        let (mut b, mut a) = (_mm512_setzero_ps(), _mm512_setzero_si512());
        for di in 0..kh {
            for dj in 0..kw {
                let start = (top + di) * w + dj + j0 * sw;
                let base = x.as_ptr().wrapping_add(start);
                // SAFETY: lanes below `lanes` read cells start + j·sw for
                // j < lanes, inside x (the caller's bound); masked-off
                // lanes and the masked halves read nothing.
                let v = unsafe {
                    match sw {
                        1 => _mm512_maskz_loadu_ps(mask, base),
                        2 => {
                            let span = 2 * lanes - 1;
                            let lo_mask = ((1u64 << span.min(16)) - 1) as u16;
                            let hi_mask = ((1u64 << span.saturating_sub(16)) - 1) as u16;
                            let lo = _mm512_maskz_loadu_ps(lo_mask, base);
                            let hi = _mm512_maskz_loadu_ps(hi_mask, base.wrapping_add(16));
                            _mm512_permutex2var_ps(lo, even, hi)
                        }
                        _ => _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, steps, base),
                    }
                };
                let idx = _mm512_add_epi32(_mm512_set1_epi32(start as i32), steps);
                if di == 0 && dj == 0 {
                    (b, a) = (v, idx);
                    continue;
                }
                // take = !isnan(b) && (isnan(v) || v > b)
                let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(b, b);
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                let greater = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, b);
                let take = ordered & (nan | greater);
                b = _mm512_mask_blend_ps(take, b, v);
                a = _mm512_mask_blend_epi32(take, a, idx);
            }
        }
        // SAFETY: the mask covers j0..j0+lanes ≤ ow, inside both outputs.
        unsafe {
            _mm512_mask_storeu_ps(best.as_mut_ptr().add(j0).cast(), mask, b);
            _mm512_mask_storeu_epi32(at.as_mut_ptr().add(j0).cast(), mask, a);
        }
    }
}

/// The winner of an earlier candidate (or group of window cells) and a
/// later one, lane by lane: the later one only if the earlier is not NaN
/// and the later is NaN or strictly greater. Grouping a window's cells
/// (each row's pair, then the rows) gives the sequential scan's winner:
/// the first maximum in window order, NaN maximal.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn later_if_greater(
    (b, a): (__m512, __m512i),
    (v, idx): (__m512, __m512i),
) -> (__m512, __m512i) {
    let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(b, b);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let greater = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, b);
    let take = ordered & (nan | greater);
    (
        _mm512_mask_blend_ps(take, b, v),
        _mm512_mask_blend_epi32(take, a, idx),
    )
}

/// One window row of 16 outputs of [`plane_2x2`]: the cells `start + 2j`
/// and `start + 2j + 1`, the first winning ties, with its plane index.
///
/// # Safety
/// AVX-512F; the lanes the masks keep (of `x[start..start + 32]`) are
/// inside `x`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn window_row(
    x: &[f32],
    start: usize,
    [lo_mask, hi_mask]: [__mmask16; 2],
    [even, odd]: [__m512i; 2],
) -> (__m512, __m512i) {
    let base = x.as_ptr().wrapping_add(start);
    // SAFETY: the caller's bound; masked-off lanes read nothing.
    let (lo, hi) = unsafe {
        (
            _mm512_maskz_loadu_ps(lo_mask, base),
            _mm512_maskz_loadu_ps(hi_mask, base.wrapping_add(16)),
        )
    };
    let idx = _mm512_add_epi32(_mm512_set1_epi32(start as i32), even);
    let left = (_mm512_permutex2var_ps(lo, even, hi), idx);
    let right = (
        _mm512_permutex2var_ps(lo, odd, hi),
        _mm512_add_epi32(idx, _mm512_set1_epi32(1)),
    );
    later_if_greater(left, right)
}

/// A whole plane (`w` wide) pooled by 2×2 windows at stride 2, unpadded:
/// `best` and `at` (`oh × ow`) receive the maxima and their plane indices,
/// written, never read. Per 16 outputs: one pair of loads per window row,
/// its even and odd columns split by permutes, each row's pair compared,
/// then the rows' winners — two chains where the row kernel has one of
/// four links.
///
/// # Safety
/// The processor supports AVX-512F; the windows fit the plane
/// (`2·oh·w ≤ x.len()`, `2·ow ≤ w`), and `best`, `at` hold `oh·ow`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn plane_2x2(
    x: &[f32],
    w: usize,
    [oh, ow]: [usize; 2],
    best: &mut [MaybeUninit<f32>],
    at: &mut [MaybeUninit<u32>],
) {
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for i in 0..oh {
        for j0 in (0..ow).step_by(16) {
            let lanes = (ow - j0).min(16);
            let mask: __mmask16 = ((1u32 << lanes) - 1) as u16;
            // Columns 2·j0 .. 2·(j0 + lanes): every one a window cell.
            let span = 2 * lanes;
            let lo_mask = ((1u64 << span.min(16)) - 1) as u16;
            let hi_mask = ((1u64 << span.saturating_sub(16)) - 1) as u16;
            let start = 2 * i * w + 2 * j0;
            let masks = [lo_mask, hi_mask];
            // SAFETY: the kept lanes read cells start + t for t < span,
            // window cells of output row i, inside x by the caller's bound.
            let top = unsafe { window_row(x, start, masks, [even, odd]) };
            // SAFETY: as above, one input row down (start + w + t).
            let bottom = unsafe { window_row(x, start + w, masks, [even, odd]) };
            let (b, a) = later_if_greater(top, bottom);
            // SAFETY: the mask covers j0..j0 + lanes ≤ ow of row i, inside
            // both outputs (oh·ow each, the caller's bound).
            unsafe {
                _mm512_mask_storeu_ps(best.as_mut_ptr().add(i * ow + j0).cast(), mask, b);
                _mm512_mask_storeu_epi32(at.as_mut_ptr().add(i * ow + j0).cast(), mask, a);
            }
        }
    }
}
