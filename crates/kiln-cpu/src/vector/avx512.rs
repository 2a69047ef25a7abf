//! Transcendentals for f32 with AVX-512F: exp, sigmoid, tanh and log.
//!
//! eˣ within 2 ulps (the bound `UnaryOp::Exp` states): `x = k·ln2 + r` with `k = round(x/ln2)` and `r` from a two-part
//! ln2 (Cody–Waite, exact first step), `eʳ` from its degree-7 Taylor
//! polynomial on |r| ≤ ln2/2 (truncation < 0.1 ulp) in Horner form with fused
//! multiply-adds, and `2ᵏ` applied by `vscalefps`, which rounds once and
//! handles overflow to ∞ and gradual underflow. Inputs are clamped to
//! [−104, 89] (beyond which eˣ is 0 or ∞ in f32) in an order that keeps NaN.

use std::arch::x86_64::*;

use super::{EXP_TAYLOR as C, LN2_HI, LN2_LO, LOG2E};

#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    // min/max return their second operand when either is NaN: keep x second.
    let x = _mm512_max_ps(
        _mm512_set1_ps(-104.0),
        _mm512_min_ps(_mm512_set1_ps(89.0), x),
    );
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
    );
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(C[0]);
    for &c in &C[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let one = _mm512_set1_ps(1.0);
    p = _mm512_fmadd_ps(p, r, one);
    p = _mm512_fmadd_ps(p, r, one);
    _mm512_scalef_ps(p, k)
}

/// `out[i] = exp(x[i])`.
///
/// # Safety
/// The processor supports AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp(x: &[f32], out: &mut [f32]) {
    map16(x, out, |v| exp16(v));
}

/// Applies `f` to `x` sixteen lanes at a time, the tail under a mask, into `out`.
#[inline]
#[target_feature(enable = "avx512f")]
fn map16(x: &[f32], out: &mut [f32], f: impl Fn(__m512) -> __m512) {
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 ≤ n, which both slices hold.
        unsafe {
            _mm512_storeu_ps(
                out.as_mut_ptr().add(i),
                f(_mm512_loadu_ps(x.as_ptr().add(i))),
            )
        };
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        // SAFETY: the mask covers only the n − i < 16 elements left, and
        // masked-off lanes are neither read nor written.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, f(v));
        }
    }
}

/// `out[i] = 1/(1 + exp(−x[i]))`, within 4 ulps (the bound
/// `UnaryOp::Sigmoid` states): with `e = exp(−|x|)`, `1/(1+e)` for x ≥ 0
/// and `e/(1+e)` below, so neither branch overflows or cancels.
///
/// # Safety
/// The processor supports AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn sigmoid(x: &[f32], out: &mut [f32]) {
    let one = _mm512_set1_ps(1.0);
    let f = |v: __m512| {
        let neg_abs = _mm512_castsi512_ps(_mm512_or_si512(
            _mm512_castps_si512(v),
            _mm512_set1_epi32(i32::MIN),
        ));
        let e = exp16(neg_abs);
        let s = _mm512_div_ps(one, _mm512_add_ps(one, e));
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_setzero_ps());
        // e/(1+e) as e·s; NaN stays NaN through exp and both branches.
        _mm512_mask_mul_ps(s, below, e, s)
    };
    map16(x, out, f);
}

/// `out[i] = tanh(x[i])`, within 3 ulps (the bound `UnaryOp::Tanh` states).
/// With `a = |x|`: below 0.4 the odd Taylor series to a¹⁷ (truncation
/// < 0.1 ulp); above, `(1 − e)/(1 + e)` with `e = exp(−2a)`, where
/// `1 − e ≥ 0.55` cannot cancel. The sign is copied back, so −0 stays −0.
///
/// # Safety
/// The processor supports AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn tanh(x: &[f32], out: &mut [f32]) {
    let one = _mm512_set1_ps(1.0);
    let f = |v: __m512| {
        let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
        let a = _mm512_abs_ps(v);
        let a2 = _mm512_mul_ps(a, a);
        let mut p = _mm512_set1_ps(super::TANH_TAYLOR[0]);
        for &c in &super::TANH_TAYLOR[1..] {
            p = _mm512_fmadd_ps(p, a2, _mm512_set1_ps(c));
        }
        let small = _mm512_fmadd_ps(_mm512_mul_ps(a, a2), p, a);
        let e = exp16(_mm512_mul_ps(a, _mm512_set1_ps(-2.0)));
        let large = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, _mm512_set1_ps(super::TANH_SMALL));
        let t = _mm512_mask_blend_ps(below, large, small);
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign))
    };
    map16(x, out, f);
}

/// `out[i] = ln(x[i])`, within 2 ulps (the bound `UnaryOp::Log` states).
/// `x = m·2ᵉ` with `m ∈ [√½, √2)` (subnormals scaled by 2²³ first),
/// `f = m − 1` exact, and `ln(1+f) = f − s·(f − R)` with `s = f/(2+f)` and
/// `R = 2s²/3 + 2s⁴/5 + … + 2s¹²/13` (the atanh series; truncation < 10⁻¹²
/// relative), then `e·ln2` added in two parts. ln 0 = −∞, ln x<0 = NaN,
/// ln ∞ = ∞, NaN stays NaN.
///
/// # Safety
/// The processor supports AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn log(x: &[f32], out: &mut [f32]) {
    let f = |v: __m512| {
        let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_set1_ps(f32::MIN_POSITIVE));
        let scaled = _mm512_mask_mul_ps(v, tiny, v, _mm512_set1_ps(8_388_608.0));
        let bits = _mm512_castps_si512(scaled);
        let mut e = _mm512_sub_epi32(_mm512_srli_epi32::<23>(bits), _mm512_set1_epi32(127));
        e = _mm512_mask_sub_epi32(e, tiny, e, _mm512_set1_epi32(23));
        let mut m = _mm512_castsi512_ps(_mm512_or_si512(
            _mm512_and_si512(bits, _mm512_set1_epi32(0x007F_FFFF)),
            _mm512_set1_epi32(0x3F80_0000),
        ));
        let high = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(m, _mm512_set1_ps(std::f32::consts::SQRT_2));
        m = _mm512_mask_mul_ps(m, high, m, _mm512_set1_ps(0.5));
        e = _mm512_mask_add_epi32(e, high, e, _mm512_set1_epi32(1));
        let ef = _mm512_cvtepi32_ps(e);
        let fm = _mm512_sub_ps(m, _mm512_set1_ps(1.0));
        let s = _mm512_div_ps(fm, _mm512_add_ps(fm, _mm512_set1_ps(2.0)));
        let z = _mm512_mul_ps(s, s);
        let mut r = _mm512_set1_ps(super::ATANH_SERIES[0]);
        for &c in &super::ATANH_SERIES[1..] {
            r = _mm512_fmadd_ps(r, z, _mm512_set1_ps(c));
        }
        r = _mm512_mul_ps(r, z);
        let log1p = _mm512_fnmadd_ps(s, _mm512_sub_ps(fm, r), fm);
        let lo = _mm512_fmadd_ps(ef, _mm512_set1_ps(LN2_LO), log1p);
        let mut y = _mm512_fmadd_ps(ef, _mm512_set1_ps(LN2_HI), lo);
        // Special values, in order: x < 0 → NaN, ±0 → −∞, +∞ → +∞, NaN → NaN.
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_setzero_ps());
        y = _mm512_mask_blend_ps(neg, y, _mm512_set1_ps(f32::NAN));
        let zero = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, _mm512_setzero_ps());
        y = _mm512_mask_blend_ps(zero, y, _mm512_set1_ps(f32::NEG_INFINITY));
        let inf = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, _mm512_set1_ps(f32::INFINITY));
        y = _mm512_mask_blend_ps(inf, y, v);
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_mask_blend_ps(nan, y, v)
    };
    map16(x, out, f);
}

#[cfg(test)]
mod tests {
    use super::super::sweep::sweep;
    use kiln_core::UnaryOp;

    fn available() -> bool {
        let ok = std::arch::is_x86_feature_detected!("avx512f");
        if !ok {
            eprintln!("skipped: no AVX-512F here");
        }
        ok
    }

    #[test]
    fn exp_within_two_ulps_across_the_f32_range() {
        if available() {
            // SAFETY: AVX-512F was just detected.
            sweep(|x, o| unsafe { super::exp(x, o) }, UnaryOp::Exp);
        }
    }

    #[test]
    fn sigmoid_within_four_ulps_across_the_f32_range() {
        if available() {
            // SAFETY: as above.
            sweep(|x, o| unsafe { super::sigmoid(x, o) }, UnaryOp::Sigmoid);
        }
    }

    #[test]
    fn tanh_within_three_ulps_across_the_f32_range() {
        if available() {
            // SAFETY: as above.
            sweep(|x, o| unsafe { super::tanh(x, o) }, UnaryOp::Tanh);
        }
    }

    #[test]
    fn log_within_two_ulps_across_the_f32_range() {
        if available() {
            // SAFETY: as above.
            sweep(|x, o| unsafe { super::log(x, o) }, UnaryOp::Log);
        }
    }
}
