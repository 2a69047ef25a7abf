//! AVX-512 kernels of the convolutions behind a 2×2 max-pool: the fused
//! forward pass ([`conv_relu_pool`]) and the backward pass's transposed
//! patch matrix ([`im2col_t_rows`]).
//!
//! The fused convolution + bias + optional ReLU + 2×2 max-pool computes
//! every pooled output straight from the image, with no patch matrix, no
//! packed panels and no convolution output in memory.
//!
//! For a stride-1 unpadded convolution feeding a 2×2 stride-2 pool, the
//! four convolution outputs of a pooling window are the even and odd
//! columns of two neighbouring output rows. Sixteen pooled columns at a
//! time, the kernel keeps those four as four vectors per output channel —
//! lane `t` of the (row `dr`, column parity `dc`) vector is the
//! convolution output at `(2r + dr, 2(t₀ + t) + dc)` — and every window
//! tap's operand is then one vector of the input with its lanes two cells
//! apart: `V[ic][q][s]`, lane `t` = input cell `(ic, 2r + q, 2(t₀ + t) +
//! s)`, built once per 16 pooled columns by two loads and a permute and
//! shared by all output channels. Per tap and channel: one broadcast of the
//! weight and four fused multiply-adds, in tap order from zero — the
//! packed GEMM's sum exactly, when the patch fits one of its `KC` blocks
//! (checked by the caller), so the results are bitwise those of im2col,
//! GEMM, epilogue and pool run one after another. Then `+ bias`, the
//! window's first maximum and its index, as the pool kernel picks them,
//! and the ReLU (NaN kept, as the reference): on the window's winner where
//! no candidate is NaN (it picks the cell the ReLU'd candidates would, in
//! three instructions where ReLU'ing four candidates took eight), on each
//! candidate first otherwise.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use crate::pool::avx512::later_if_greater;

/// Output channels per register block: 4 × 4 accumulators, the four tap
/// vectors and a broadcast weight in the 32 zmm registers.
const CHANNELS: usize = 4;

/// One image's fused problem: the convolution's geometry and operands.
pub(crate) struct Image<'a> {
    /// The image, `c × h × w`.
    pub x: &'a [f32],
    /// Channels, rows and columns of the image.
    pub chw: [usize; 3],
    /// The convolution window, `kh × kw` (stride 1, unpadded).
    pub kernel: [usize; 2],
    /// The filters, `o × (c·kh·kw)`.
    pub filters: &'a [f32],
    /// One bias per output channel, or `None`.
    pub bias: Option<&'a [f32]>,
    /// Whether the ReLU follows the bias (else no activation).
    pub relu: bool,
    /// Whether each convolution output is rounded to bf16 before pooling,
    /// as the unfused ops would store it (a bf16 model's layer).
    pub round_bf16: bool,
}

impl Image<'_> {
    /// The convolution output's rows and columns.
    fn conv_output(&self) -> [usize; 2] {
        let ([_, h, w], [kh, kw]) = (self.chw, self.kernel);
        [(h + 1).saturating_sub(kh), (w + 1).saturating_sub(kw)]
    }

    /// Floats of the tap-vector buffer [`conv_relu_pool`] needs.
    pub(crate) fn taps_len(&self) -> usize {
        let ([c, ..], [kh, kw]) = (self.chw, self.kernel);
        c * (kh + 1) * (kw + 1) * 16
    }
}

/// Pools `relu(conv(x) + bias)` by 2×2 windows at stride 2 for one image:
/// `pooled` and `at` (`o × ph × pw`, `ph = ⌊oh/2⌋`, `pw = ⌊ow/2⌋`) receive
/// the maxima and their indices into the `oh × ow` convolution plane,
/// written, never read; `taps` is scratch of [`Image::taps_len`] floats.
/// The operands' lengths are checked (panics otherwise).
///
/// # Safety
/// The processor supports AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn conv_relu_pool(
    img: &Image<'_>,
    pooled: &mut [MaybeUninit<f32>],
    at: &mut [MaybeUninit<u32>],
    taps: &mut [f32],
) {
    let ([c, h, w], [kh, kw]) = (img.chw, img.kernel);
    let [oh, ow] = img.conv_output();
    let (ph, pw) = (oh / 2, ow / 2);
    let patch = c * kh * kw;
    let o = img.filters.len() / patch.max(1);
    assert!(
        (1..=h).contains(&kh)
            && (1..=w).contains(&kw)
            && img.x.len() >= c * h * w
            && img.filters.len() == o * patch
            && img.bias.is_none_or(|b| b.len() >= o)
            && taps.len() >= img.taps_len()
            && pooled.len() >= o * ph * pw
            && at.len() >= o * ph * pw,
        "fused convolution-pool: operands do not match a {c}×{h}×{w} image and {o} {kh}×{kw} filters"
    );
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for r in 0..ph {
        for t0 in (0..pw).step_by(16) {
            let lanes = (pw - t0).min(16);
            let mask = ((1u32 << lanes) - 1) as __mmask16;
            // Lane t reads cell 2(t0 + t) + s of its row: 2·lanes − 1
            // consecutive cells from 2·t0 + s, the even ones kept.
            let span = 2 * lanes - 1;
            let lo_mask = ((1u64 << span.min(16)) - 1) as __mmask16;
            let hi_mask = ((1u64 << span.saturating_sub(16)) - 1) as __mmask16;
            let mut v = taps.as_mut_ptr();
            for ic in 0..c {
                for q in 0..=kh {
                    let row = (ic * h + 2 * r + q) * w + 2 * t0;
                    for s in 0..=kw {
                        let base = img.x.as_ptr().wrapping_add(row + s);
                        // SAFETY: the kept lanes read cells up to column
                        // 2(t0 + lanes − 1) + s ≤ 2(pw − 1) + kw ≤ w − 1
                        // of row 2r + q ≤ 2(ph − 1) + kh ≤ h − 1 (as
                        // 2·pw ≤ ow, 2·ph ≤ oh), inside x; masked-off
                        // lanes read nothing. `taps` holds c·(kh+1)·(kw+1)
                        // vectors (asserted), one written here.
                        unsafe {
                            let lo = _mm512_maskz_loadu_ps(lo_mask, base);
                            let hi = _mm512_maskz_loadu_ps(hi_mask, base.wrapping_add(16));
                            _mm512_storeu_ps(v, _mm512_permutex2var_ps(lo, even, hi));
                            v = v.add(16);
                        }
                    }
                }
            }
            // Plane indices of the (dr, dc) = (0, 0) cells; the others
            // are 1, ow and ow + 1 further.
            let first = _mm512_add_epi32(_mm512_set1_epi32((2 * r * ow + 2 * t0) as i32), even);
            let out = r * pw + t0;
            let mut ob = 0;
            while ob < o {
                let block = Block {
                    img,
                    taps,
                    first_oc: ob,
                    first,
                    ow,
                    mask,
                    out,
                    plane: ph * pw,
                };
                // SAFETY: AVX-512F; channels ob.. of the block exist, and
                // their outputs lie in `pooled` and `at` (asserted); the
                // tap vectors were written above.
                unsafe {
                    match o - ob {
                        1 => block.run::<1>(pooled, at),
                        2 => block.run::<2>(pooled, at),
                        3 => block.run::<3>(pooled, at),
                        _ => block.run::<CHANNELS>(pooled, at),
                    }
                }
                ob += CHANNELS;
            }
        }
    }
}

/// Up to [`CHANNELS`] output channels of one group of 16 pooled columns.
struct Block<'a, 'b> {
    img: &'a Image<'b>,
    taps: &'a [f32],
    first_oc: usize,
    /// Plane indices of each lane's first window cell.
    first: __m512i,
    ow: usize,
    /// The lanes that are pooled outputs.
    mask: __mmask16,
    /// Index of the block's first output within a channel's pooled plane.
    out: usize,
    /// Outputs per channel.
    plane: usize,
}

impl Block<'_, '_> {
    /// Channels `first_oc .. first_oc + M`: sums, epilogue, pool, stores.
    ///
    /// # Safety
    /// AVX-512F; those channels exist, and their outputs (`(first_oc + m)
    /// · plane + out + t` for the masked lanes) lie in `pooled` and `at`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn run<const M: usize>(
        &self,
        pooled: &mut [MaybeUninit<f32>],
        at: &mut [MaybeUninit<u32>],
    ) {
        let img = self.img;
        let ([c, ..], [kh, kw]) = (img.chw, img.kernel);
        let patch = c * kh * kw;
        let (rows, cols) = (kh + 1, kw + 1);
        let mut acc = [[_mm512_setzero_ps(); 4]; M];
        let filters = img.filters.as_ptr().wrapping_add(self.first_oc * patch);
        let v = self.taps.as_ptr();
        let mut p = 0;
        for ic in 0..c {
            for di in 0..kh {
                for dj in 0..kw {
                    let at_v = |q: usize, s: usize| ((ic * rows + q) * cols + s) * 16;
                    // SAFETY: (q, s) ≤ (kh, kw): inside the tap buffer.
                    let b = unsafe {
                        [
                            _mm512_loadu_ps(v.add(at_v(di, dj))),
                            _mm512_loadu_ps(v.add(at_v(di, dj + 1))),
                            _mm512_loadu_ps(v.add(at_v(di + 1, dj))),
                            _mm512_loadu_ps(v.add(at_v(di + 1, dj + 1))),
                        ]
                    };
                    for (m, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: channel first_oc + m exists (the
                        // contract); its tap p is inside `filters`.
                        let wv = _mm512_set1_ps(unsafe { *filters.add(m * patch + p) });
                        for (a, &b) in acc.iter_mut().zip(&b) {
                            *a = _mm512_fmadd_ps(wv, b, *a);
                        }
                    }
                    p += 1;
                }
            }
        }
        let one = _mm512_set1_epi32(1);
        let below = _mm512_add_epi32(self.first, _mm512_set1_epi32(self.ow as i32));
        for (m, acc) in acc.iter().enumerate() {
            let oc = self.first_oc + m;
            // `+ 0.0` without a bias too, as the unfused epilogue (it
            // turns −0 into +0).
            let add = _mm512_set1_ps(img.bias.map_or(0.0, |b| b[oc]));
            // The biased outputs, rounded as a bf16 layer stores them; the
            // ReLU comes after the pool where no candidate is NaN.
            let y = acc.map(|a| {
                let y = _mm512_add_ps(a, add);
                if img.round_bf16 {
                    to_bf16_value(y)
                } else {
                    y
                }
            });
            // Window order: the top row's pair, then the bottom row's.
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(y[0], y[1])
                | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(y[2], y[3]);
            let (best, index) = if nan == 0 {
                // No NaN among the candidates (the rule for every block of
                // finite data): a later cell wins only if strictly greater.
                // The ReLU is applied to the winner: where it is positive,
                // the four ReLU'd candidates pick the same cell (a
                // non-positive one never beats it, and positives compare
                // as they are); where it is not, all four are +0 and the
                // first cell wins the ties.
                let right_top = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(y[1], y[0]);
                let right_bottom = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(y[3], y[2]);
                let top = _mm512_mask_blend_ps(right_top, y[0], y[1]);
                let bottom = _mm512_mask_blend_ps(right_bottom, y[2], y[3]);
                let top_at = _mm512_mask_add_epi32(self.first, right_top, self.first, one);
                let bottom_at = _mm512_mask_add_epi32(below, right_bottom, below, one);
                let lower = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(bottom, top);
                let best = _mm512_mask_blend_ps(lower, top, bottom);
                let index = _mm512_mask_blend_epi32(lower, top_at, bottom_at);
                if img.relu {
                    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(best, _mm512_setzero_ps());
                    (
                        _mm512_maskz_mov_ps(positive, best),
                        _mm512_mask_blend_epi32(positive, self.first, index),
                    )
                } else {
                    (best, index)
                }
            } else {
                let y = if img.relu { y.map(|y| relu(y)) } else { y };
                let right = |at: __m512i| _mm512_add_epi32(at, one);
                let top = later_if_greater((y[0], self.first), (y[1], right(self.first)));
                let bottom = later_if_greater((y[2], below), (y[3], right(below)));
                later_if_greater(top, bottom)
            };
            let k = oc * self.plane + self.out;
            // SAFETY: the masked lanes are outputs k .. k + lanes of
            // channel oc, inside both slices (the contract).
            unsafe {
                _mm512_mask_storeu_ps(pooled.as_mut_ptr().add(k).cast(), self.mask, best);
                _mm512_mask_storeu_epi32(at.as_mut_ptr().add(k).cast(), self.mask, index);
            }
        }
    }
}

/// `y` rounded to bf16 and widened back: round to nearest even on the bit
/// pattern, a NaN truncated and made quiet — the values of
/// `crate::vector::convert`'s f32 → bf16 → f32.
#[target_feature(enable = "avx512f")]
#[inline]
fn to_bf16_value(y: __m512) -> __m512 {
    let bits = _mm512_castps_si512(y);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd);
    let high = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(y, y);
    let quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000));
    let out = _mm512_mask_blend_epi32(nan, rounded, quiet);
    _mm512_castsi512_ps(_mm512_and_si512(out, high))
}

/// The reference's ReLU: NaN and positive values kept, everything else +0.
#[target_feature(enable = "avx512f")]
#[inline]
fn relu(y: __m512) -> __m512 {
    let keep = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(y, _mm512_setzero_ps());
    _mm512_maskz_mov_ps(keep, y)
}

/// Rows of the transposed patch matrix of a stride-1 unpadded convolution
/// whose patch fits one vector (`c·kh·kw ≤ 16`): row `cell` of `cols_t`
/// (rows `ld ≥ 16` apart) receives the patch output cell `cell` reads, and
/// zeros in its columns `c·kh·kw .. 16`. Sixteen cells of an output row at
/// a time: each patch column is one load of the image (its sixteen cells
/// read neighbouring inputs), and a 16 × 16 register transpose turns the
/// columns into the cells' rows — a load, four shuffles and a store a row,
/// where copying each row's runs one by one took 17 cycles.
///
/// The operands' sizes are checked (panics otherwise).
///
/// # Safety
/// The processor supports AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn im2col_t_rows(
    image: &[f32],
    [c, h, w]: [usize; 3],
    [kh, kw]: [usize; 2],
    cols_t: &mut [f32],
    ld: usize,
) {
    let (oh, ow) = ((h + 1).saturating_sub(kh), (w + 1).saturating_sub(kw));
    assert!(
        (1..=h).contains(&kh)
            && (1..=w).contains(&kw)
            && c * kh * kw <= 16
            && ld >= 16
            && image.len() >= c * h * w
            && cols_t.len() >= oh * ow * ld,
        "transposed im2col: a {c}×{h}×{w} image, {kh}×{kw} windows, rows of {ld} in {} floats",
        cols_t.len()
    );
    let (x, out) = (image.as_ptr(), cols_t.as_mut_ptr());
    for i in 0..oh {
        for j0 in (0..ow).step_by(16) {
            let lanes = (ow - j0).min(16);
            let mask = ((1u32 << lanes) - 1) as __mmask16;
            let mut columns = [_mm512_setzero_ps(); 16];
            for ic in 0..c {
                for di in 0..kh {
                    let row = (ic * h + i + di) * w + j0;
                    for dj in 0..kw {
                        // SAFETY: the kept lanes read cells j0 + dj ..
                        // j0 + lanes − 1 + dj ≤ ow − 1 + kw − 1 = w − 1 of
                        // row i + di ≤ h − 1 of channel ic: inside the
                        // image (the contract).
                        columns[(ic * kh + di) * kw + dj] =
                            unsafe { _mm512_maskz_loadu_ps(mask, x.add(row + dj)) };
                    }
                }
            }
            let rows = transpose16(columns);
            for (t, row) in rows.iter().take(lanes).enumerate() {
                // SAFETY: row i·ow + j0 + t < oh·ow of cols_t, 16 ≤ ld
                // floats (the contract).
                unsafe { _mm512_storeu_ps(out.add((i * ow + j0 + t) * ld), *row) };
            }
        }
    }
}

/// The transpose of a 16 × 16 block held as sixteen row vectors: lane `j`
/// of output `i` is lane `i` of input `j`. Four rounds of shuffles — 32-bit
/// pairs, 64-bit pairs, then 128-bit quarters twice.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let t: [__m512; 16] = std::array::from_fn(|k| {
        let (a, b) = (r[k & !1], r[k | 1]);
        if k % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4g + q], 128-bit quarter L: column 4L + q of rows 4g .. 4g + 3.
    let u: [__m512; 16] = std::array::from_fn(|k| {
        let (g, q) = (k / 4, k % 4);
        let (a, b) = (t[4 * g + q / 2], t[4 * g + 2 + q / 2]);
        if q % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(a, b)
        } else {
            _mm512_shuffle_ps::<0xEE>(a, b)
        }
    });
    let mut out = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        // Quarters 0 and 2 (even) and 1 and 3 (odd) of rows 0–7 and 8–15.
        let even_lo = _mm512_shuffle_f32x4::<0x88>(u[q], u[4 + q]);
        let odd_lo = _mm512_shuffle_f32x4::<0xDD>(u[q], u[4 + q]);
        let even_hi = _mm512_shuffle_f32x4::<0x88>(u[8 + q], u[12 + q]);
        let odd_hi = _mm512_shuffle_f32x4::<0xDD>(u[8 + q], u[12 + q]);
        out[q] = _mm512_shuffle_f32x4::<0x88>(even_lo, even_hi);
        out[8 + q] = _mm512_shuffle_f32x4::<0xDD>(even_lo, even_hi);
        out[4 + q] = _mm512_shuffle_f32x4::<0x88>(odd_lo, odd_hi);
        out[12 + q] = _mm512_shuffle_f32x4::<0xDD>(odd_lo, odd_hi);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::convert::{from_bf16_loop, to_bf16_loop};

    /// The in-register bf16 rounding gives the scalar conversion's values
    /// bit for bit: ties to even, overflow to infinity, subnormals, zeros
    /// and NaNs of both signs (made quiet), and a sweep of the bit patterns.
    #[test]
    fn rounding_in_registers_is_the_scalar_conversion() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut bits: Vec<u32> = vec![
            0x3F80_8000, // 1 + 2⁻⁸: a tie, to even (down)
            0x3F81_8000, // a tie, to even (up)
            0x7F7F_FFFF, // the largest finite: rounds to ∞
            0xFF7F_FFFF,
            0x0000_0001, // subnormals
            0x8000_8000,
            0x007F_FFFF,
            0x0000_0000,
            0x8000_0000,
            0x7F80_0000, // ±∞
            0xFF80_0000,
            0x7F80_0001, // signalling NaNs
            0xFF80_0001,
            0x7FC0_0000, // quiet NaNs
            0xFFFF_FFFF,
        ];
        bits.extend((0..1 << 16).map(|i: u32| i.wrapping_mul(65_537).wrapping_add(i >> 3)));
        for chunk in bits.chunks(16) {
            let mut lanes = [0f32; 16];
            for (l, &b) in lanes.iter_mut().zip(chunk) {
                *l = f32::from_bits(b);
            }
            let want = from_bf16_loop(&to_bf16_loop(&lanes));
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F was just detected; both arrays hold 16 floats.
            unsafe {
                _mm512_storeu_ps(
                    got.as_mut_ptr(),
                    to_bf16_value(_mm512_loadu_ps(lanes.as_ptr())),
                );
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{:#010x}", lanes[i].to_bits());
            }
        }
    }
}
