//! eˣ for f32 with AVX-512F, within 2 ulps (the bound `UnaryOp::Exp`
//! states): `x = k·ln2 + r` with `k = round(x/ln2)` and `r` from a two-part
//! ln2 (Cody–Waite, exact first step), `eʳ` from its degree-7 Taylor
//! polynomial on |r| ≤ ln2/2 (truncation < 0.1 ulp) in Horner form with fused
//! multiply-adds, and `2ᵏ` applied by `vscalefps`, which rounds once and
//! handles overflow to ∞ and gradual underflow. Inputs are clamped to
//! [−104, 89] (beyond which eˣ is 0 or ∞ in f32) in an order that keeps NaN.

use std::arch::x86_64::*;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that k·LN2_HI is exact for |k| ≤ 2⁸: LN2_HI = 0.693145751953125
/// (16 significant bits) and LN2_LO ≈ 1.4286068e-6, the f32 nearest ln 2 − LN2_HI.
const LN2_HI: f32 = f32::from_bits(0x3F31_7200);
const LN2_LO: f32 = f32::from_bits(0x35BF_BE8E);
/// 1/n! for n = 7 down to 2.
const C: [f32; 6] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];

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

#[cfg(test)]
mod tests {
    /// Every 61st f32 bit pattern (≈ 70 million inputs, all magnitudes and
    /// both signs) against the correctly rounded f64 result: within `ulps`,
    /// NaN and ±∞ handled exactly.
    fn sweep(kernel: unsafe fn(&[f32], &mut [f32]), oracle: fn(f64) -> f64, ulps: i64) {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F here");
            return;
        }
        let xs: Vec<f32> = (0..u32::MAX).step_by(61).map(f32::from_bits).collect();
        let mut out = vec![0f32; xs.len()];
        // SAFETY: AVX-512F was just detected.
        unsafe { kernel(&xs, &mut out) };
        let key = |v: f32| {
            let b = v.to_bits() as i64;
            if b & (1 << 31) != 0 {
                -(b & 0x7fff_ffff)
            } else {
                b
            }
        };
        let mut worst = (0i64, 0f32);
        for (&x, &y) in xs.iter().zip(&out) {
            let want = oracle(f64::from(x)) as f32;
            if want.is_nan() || !want.is_finite() || !y.is_finite() {
                assert!(
                    want.is_nan() && y.is_nan() || want == y,
                    "exp({x:e}) = {y:e}, want {want:e}"
                );
                continue;
            }
            let d = (key(y) - key(want)).abs();
            if d > worst.0 {
                worst = (d, x);
            }
        }
        eprintln!("worst: {} ulps at x = {:e}", worst.0, worst.1);
        assert!(worst.0 <= ulps, "off by {} ulps at {:e}", worst.0, worst.1);
    }

    #[test]
    fn exp_within_two_ulps_across_the_f32_range() {
        sweep(super::exp, f64::exp, 2);
    }

    #[test]
    fn sigmoid_within_four_ulps_across_the_f32_range() {
        sweep(super::sigmoid, |x| 1.0 / (1.0 + (-x).exp()), 4);
    }
}
