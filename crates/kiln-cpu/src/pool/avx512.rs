//! The AVX-512 max-pool row: sixteen output columns at a time, branch-free
//! (the winner of each window is chosen with mask blends, so real data —
//! ReLU outputs full of ties at zero — cannot mispredict), the tail under a
//! mask.

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
