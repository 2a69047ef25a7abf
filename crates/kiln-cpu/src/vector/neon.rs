//! Transcendentals for f32 with NEON: exp, sigmoid, tanh and log, the same
//! algorithms and bounds as the x86 kernels (see `super::avx2`, whose
//! two-step `2ᵏ` this shares) on four lanes.

use std::arch::aarch64::*;

use super::{ATANH_SERIES, EXP_TAYLOR, LN2_HI, LN2_LO, LOG2E, TANH_SMALL, TANH_TAYLOR};

/// `2ⁿ` for integer lanes `n` in [−126, 127].
#[inline]
#[target_feature(enable = "neon")]
fn pow2(n: int32x4_t) -> float32x4_t {
    vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(n, vdupq_n_s32(127))))
}

#[inline]
#[target_feature(enable = "neon")]
fn exp4(x: float32x4_t) -> float32x4_t {
    // NEON's min/max propagate NaN.
    let x = vmaxq_f32(vdupq_n_f32(-104.0), vminq_f32(vdupq_n_f32(89.0), x));
    let k = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(LOG2E)));
    let r = vfmsq_f32(x, k, vdupq_n_f32(LN2_HI));
    let r = vfmsq_f32(r, k, vdupq_n_f32(LN2_LO));
    let mut p = vdupq_n_f32(EXP_TAYLOR[0]);
    for &c in &EXP_TAYLOR[1..] {
        p = vfmaq_f32(vdupq_n_f32(c), p, r);
    }
    let one = vdupq_n_f32(1.0);
    p = vfmaq_f32(one, p, r);
    p = vfmaq_f32(one, p, r);
    let ki = vcvtq_s32_f32(k);
    let k1 = vshrq_n_s32::<1>(ki);
    let k2 = vsubq_s32(ki, k1);
    vmulq_f32(vmulq_f32(p, pow2(k1)), pow2(k2))
}

/// Applies `f` to `x` four lanes at a time into `out`; the tail goes
/// through a zero-padded stack copy.
#[inline]
#[target_feature(enable = "neon")]
fn map4(x: &[f32], out: &mut [f32], f: impl Fn(float32x4_t) -> float32x4_t) {
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 ≤ n, which both slices hold.
        unsafe { vst1q_f32(out.as_mut_ptr().add(i), f(vld1q_f32(x.as_ptr().add(i)))) };
        i += 4;
    }
    if i < n {
        let mut buf = [0f32; 4];
        buf[..n - i].copy_from_slice(&x[i..n]);
        // SAFETY: buf holds four floats.
        unsafe { vst1q_f32(buf.as_mut_ptr(), f(vld1q_f32(buf.as_ptr()))) };
        out[i..n].copy_from_slice(&buf[..n - i]);
    }
}

/// `out[i] = exp(x[i])`, within 2 ulps.
///
/// # Safety
/// The processor supports NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn exp(x: &[f32], out: &mut [f32]) {
    map4(x, out, |v| exp4(v));
}

/// `out[i] = 1/(1 + exp(−x[i]))`, within 4 ulps.
///
/// # Safety
/// The processor supports NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn sigmoid(x: &[f32], out: &mut [f32]) {
    let one = vdupq_n_f32(1.0);
    let f = |v: float32x4_t| {
        let e = exp4(vnegq_f32(vabsq_f32(v)));
        let s = vdivq_f32(one, vaddq_f32(one, e));
        let below = vcltq_f32(v, vdupq_n_f32(0.0));
        vbslq_f32(below, vmulq_f32(e, s), s)
    };
    map4(x, out, f);
}

/// `out[i] = tanh(x[i])`, within 3 ulps.
///
/// # Safety
/// The processor supports NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn tanh(x: &[f32], out: &mut [f32]) {
    let one = vdupq_n_f32(1.0);
    let f = |v: float32x4_t| {
        let sign = vandq_u32(vreinterpretq_u32_f32(v), vdupq_n_u32(0x8000_0000));
        let a = vabsq_f32(v);
        let a2 = vmulq_f32(a, a);
        let mut p = vdupq_n_f32(TANH_TAYLOR[0]);
        for &c in &TANH_TAYLOR[1..] {
            p = vfmaq_f32(vdupq_n_f32(c), p, a2);
        }
        let small = vfmaq_f32(a, vmulq_f32(a, a2), p);
        let e = exp4(vmulq_f32(a, vdupq_n_f32(-2.0)));
        let large = vdivq_f32(vsubq_f32(one, e), vaddq_f32(one, e));
        let below = vcltq_f32(a, vdupq_n_f32(TANH_SMALL));
        let t = vbslq_f32(below, small, large);
        vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(t), sign))
    };
    map4(x, out, f);
}

/// `out[i] = ln(x[i])`, within 2 ulps.
///
/// # Safety
/// The processor supports NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn log(x: &[f32], out: &mut [f32]) {
    let f = |v: float32x4_t| {
        let tiny = vcltq_f32(v, vdupq_n_f32(f32::MIN_POSITIVE));
        let scaled = vbslq_f32(tiny, vmulq_f32(v, vdupq_n_f32(8_388_608.0)), v);
        let bits = vreinterpretq_s32_f32(scaled);
        let mut e = vsubq_s32(vshrq_n_s32::<23>(bits), vdupq_n_s32(127));
        e = vsubq_s32(e, vandq_s32(vreinterpretq_s32_u32(tiny), vdupq_n_s32(23)));
        let mut m = vreinterpretq_f32_s32(vorrq_s32(
            vandq_s32(bits, vdupq_n_s32(0x007F_FFFF)),
            vdupq_n_s32(0x3F80_0000),
        ));
        let high = vcgeq_f32(m, vdupq_n_f32(std::f32::consts::SQRT_2));
        m = vbslq_f32(high, vmulq_f32(m, vdupq_n_f32(0.5)), m);
        e = vsubq_s32(e, vreinterpretq_s32_u32(high));
        let ef = vcvtq_f32_s32(e);
        let fm = vsubq_f32(m, vdupq_n_f32(1.0));
        let s = vdivq_f32(fm, vaddq_f32(fm, vdupq_n_f32(2.0)));
        let z = vmulq_f32(s, s);
        let mut r = vdupq_n_f32(ATANH_SERIES[0]);
        for &c in &ATANH_SERIES[1..] {
            r = vfmaq_f32(vdupq_n_f32(c), r, z);
        }
        r = vmulq_f32(r, z);
        let log1p = vfmsq_f32(fm, s, vsubq_f32(fm, r));
        let lo = vfmaq_f32(log1p, ef, vdupq_n_f32(LN2_LO));
        let mut y = vfmaq_f32(lo, ef, vdupq_n_f32(LN2_HI));
        let zero = vdupq_n_f32(0.0);
        y = vbslq_f32(vcltq_f32(v, zero), vdupq_n_f32(f32::NAN), y);
        y = vbslq_f32(vceqq_f32(v, zero), vdupq_n_f32(f32::NEG_INFINITY), y);
        y = vbslq_f32(vceqq_f32(v, vdupq_n_f32(f32::INFINITY)), v, y);
        // NaN compares unequal to itself.
        vbslq_f32(vceqq_f32(v, v), y, v)
    };
    map4(x, out, f);
}

#[cfg(test)]
mod tests {
    use super::super::sweep::sweep;
    use kiln_core::UnaryOp;

    #[test]
    fn exp_within_two_ulps_across_the_f32_range() {
        // SAFETY: NEON is part of every aarch64 processor Rust targets.
        sweep(|x, o| unsafe { super::exp(x, o) }, UnaryOp::Exp);
    }

    #[test]
    fn sigmoid_within_four_ulps_across_the_f32_range() {
        // SAFETY: as above.
        sweep(|x, o| unsafe { super::sigmoid(x, o) }, UnaryOp::Sigmoid);
    }

    #[test]
    fn tanh_within_three_ulps_across_the_f32_range() {
        // SAFETY: as above.
        sweep(|x, o| unsafe { super::tanh(x, o) }, UnaryOp::Tanh);
    }

    #[test]
    fn log_within_two_ulps_across_the_f32_range() {
        // SAFETY: as above.
        sweep(|x, o| unsafe { super::log(x, o) }, UnaryOp::Log);
    }
}
