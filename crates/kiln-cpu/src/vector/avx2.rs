//! Transcendentals for f32 with AVX2 + FMA: exp, sigmoid, tanh and log, the
//! same algorithms and bounds as the AVX-512 kernels (see `super::avx512`)
//! on eight lanes. AVX2 has no `vscalefps`, so eˣ's `2ᵏ` is applied as two
//! exact powers of two built in the exponent field, `2^⌊k/2⌋ · 2^(k−⌊k/2⌋)`:
//! the first product is exact (it stays normal), the second rounds once,
//! into the subnormals where it must.

use std::arch::x86_64::*;

use super::{EXP_TAYLOR, LN2_HI, LN2_LO, LOG2E};

/// `2ⁿ` for integer lanes `n` in [−126, 127].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn pow2(n: __m256i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        n,
        _mm256_set1_epi32(127),
    )))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    // min/max return their second operand when either is NaN: keep x second.
    let x = _mm256_max_ps(
        _mm256_set1_ps(-104.0),
        _mm256_min_ps(_mm256_set1_ps(89.0), x),
    );
    let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(LOG2E),
    ));
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_TAYLOR[0]);
    for &c in &EXP_TAYLOR[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let one = _mm256_set1_ps(1.0);
    p = _mm256_fmadd_ps(p, r, one);
    p = _mm256_fmadd_ps(p, r, one);
    // k ∈ [−150, 129]: both halves within [−75, 65]. A NaN x leaves p NaN,
    // whatever the converted k.
    let ki = _mm256_cvtps_epi32(k);
    let k1 = _mm256_srai_epi32::<1>(ki);
    let k2 = _mm256_sub_epi32(ki, k1);
    _mm256_mul_ps(_mm256_mul_ps(p, pow2(k1)), pow2(k2))
}

/// Applies `f` to `x` eight lanes at a time into `out`; the tail goes
/// through a zero-padded stack copy.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn map8(x: &[f32], out: &mut [f32], f: impl Fn(__m256) -> __m256) {
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 ≤ n, which both slices hold.
        unsafe {
            _mm256_storeu_ps(
                out.as_mut_ptr().add(i),
                f(_mm256_loadu_ps(x.as_ptr().add(i))),
            )
        };
        i += 8;
    }
    if i < n {
        let mut buf = [0f32; 8];
        buf[..n - i].copy_from_slice(&x[i..n]);
        // SAFETY: buf holds eight floats.
        unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), f(_mm256_loadu_ps(buf.as_ptr()))) };
        out[i..n].copy_from_slice(&buf[..n - i]);
    }
}

/// `out[i] = exp(x[i])`, within 2 ulps.
///
/// # Safety
/// The processor supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp(x: &[f32], out: &mut [f32]) {
    map8(x, out, |v| exp8(v));
}

/// `out[i] = 1/(1 + exp(−x[i]))`, within 4 ulps: `1/(1+e)` or `e/(1+e)`
/// with `e = exp(−|x|)`.
///
/// # Safety
/// The processor supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn sigmoid(x: &[f32], out: &mut [f32]) {
    let one = _mm256_set1_ps(1.0);
    let f = |v: __m256| {
        let neg_abs = _mm256_or_ps(v, _mm256_set1_ps(-0.0));
        let e = exp8(neg_abs);
        let s = _mm256_div_ps(one, _mm256_add_ps(one, e));
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_setzero_ps());
        _mm256_blendv_ps(s, _mm256_mul_ps(e, s), below)
    };
    map8(x, out, f);
}

/// `out[i] = tanh(x[i])`, within 3 ulps (Taylor series below |x| = 0.4,
/// `(1 − e)/(1 + e)` with `e = exp(−2|x|)` above; the sign copied back).
///
/// # Safety
/// The processor supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn tanh(x: &[f32], out: &mut [f32]) {
    let one = _mm256_set1_ps(1.0);
    let f = |v: __m256| {
        let sign_bit = _mm256_set1_ps(-0.0);
        let sign = _mm256_and_ps(v, sign_bit);
        let a = _mm256_andnot_ps(sign_bit, v);
        let a2 = _mm256_mul_ps(a, a);
        let mut p = _mm256_set1_ps(super::TANH_TAYLOR[0]);
        for &c in &super::TANH_TAYLOR[1..] {
            p = _mm256_fmadd_ps(p, a2, _mm256_set1_ps(c));
        }
        let small = _mm256_fmadd_ps(_mm256_mul_ps(a, a2), p, a);
        let e = exp8(_mm256_mul_ps(a, _mm256_set1_ps(-2.0)));
        let large = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(a, _mm256_set1_ps(super::TANH_SMALL));
        _mm256_or_ps(_mm256_blendv_ps(large, small, below), sign)
    };
    map8(x, out, f);
}

/// `out[i] = ln(x[i])`, within 2 ulps (the reduction and series of the
/// AVX-512 kernel).
///
/// # Safety
/// The processor supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn log(x: &[f32], out: &mut [f32]) {
    let f = |v: __m256| {
        let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_set1_ps(f32::MIN_POSITIVE));
        let scaled = _mm256_blendv_ps(v, _mm256_mul_ps(v, _mm256_set1_ps(8_388_608.0)), tiny);
        let bits = _mm256_castps_si256(scaled);
        let mut e = _mm256_sub_epi32(_mm256_srli_epi32::<23>(bits), _mm256_set1_epi32(127));
        // The tiny mask is all ones (−1) in its lanes: add 23 × it.
        e = _mm256_add_epi32(
            e,
            _mm256_mullo_epi32(_mm256_castps_si256(tiny), _mm256_set1_epi32(23)),
        );
        let mut m = _mm256_castsi256_ps(_mm256_or_si256(
            _mm256_and_si256(bits, _mm256_set1_epi32(0x007F_FFFF)),
            _mm256_set1_epi32(0x3F80_0000),
        ));
        let high = _mm256_cmp_ps::<_CMP_GE_OQ>(m, _mm256_set1_ps(std::f32::consts::SQRT_2));
        m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5)), high);
        e = _mm256_sub_epi32(e, _mm256_castps_si256(high));
        let ef = _mm256_cvtepi32_ps(e);
        let fm = _mm256_sub_ps(m, _mm256_set1_ps(1.0));
        let s = _mm256_div_ps(fm, _mm256_add_ps(fm, _mm256_set1_ps(2.0)));
        let z = _mm256_mul_ps(s, s);
        let mut r = _mm256_set1_ps(super::ATANH_SERIES[0]);
        for &c in &super::ATANH_SERIES[1..] {
            r = _mm256_fmadd_ps(r, z, _mm256_set1_ps(c));
        }
        r = _mm256_mul_ps(r, z);
        let log1p = _mm256_fnmadd_ps(s, _mm256_sub_ps(fm, r), fm);
        let lo = _mm256_fmadd_ps(ef, _mm256_set1_ps(LN2_LO), log1p);
        let mut y = _mm256_fmadd_ps(ef, _mm256_set1_ps(LN2_HI), lo);
        let zero = _mm256_setzero_ps();
        let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(v, zero);
        y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::NAN), neg);
        let is_zero = _mm256_cmp_ps::<_CMP_EQ_OQ>(v, zero);
        y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::NEG_INFINITY), is_zero);
        let inf = _mm256_cmp_ps::<_CMP_EQ_OQ>(v, _mm256_set1_ps(f32::INFINITY));
        y = _mm256_blendv_ps(y, v, inf);
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
        _mm256_blendv_ps(y, v, nan)
    };
    map8(x, out, f);
}

#[cfg(test)]
mod tests {
    use super::super::sweep::sweep;
    use kiln_core::UnaryOp;

    fn available() -> bool {
        let ok = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if !ok {
            eprintln!("skipped: no AVX2+FMA here");
        }
        ok
    }

    #[test]
    fn exp_within_two_ulps_across_the_f32_range() {
        if available() {
            // SAFETY: AVX2 and FMA were just detected.
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
