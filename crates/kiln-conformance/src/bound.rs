//! Judging an element against its bound. The bounds themselves — what
//! "correct" means for each op — live in [`kiln_core::bounds`], the single
//! source this suite, the kernels' own tests and the docs read; this module
//! holds the comparison.
//!
//! A backend's element `got` is compared with the exact (f64) value `want`:
//!
//! - [`Bound::Exact`]: bitwise equal to `want` in the storage type (any NaN
//!   matches any NaN);
//! - [`Bound::CorrectlyRounded`]: equal to `want` rounded to nearest-even in
//!   the storage type;
//! - [`Bound::Ulps`]: within `n` units in the last place of the rounded `want`;
//! - [`Bound::Abs`]: `|got − want| ≤ e` plus half an ulp of the storage type
//!   at `want` (the final store). Dot products use `e = γₙ·Σ|aᵢbᵢ|` with
//!   `γₙ = n·u/(1 − n·u)` and `u` the unit roundoff of the accumulation.
//!
//! In every case NaN must meet NaN, and an infinite `want` the same infinity.
//! When an [`Bound::Abs`] bound is itself beyond the format's range, the
//! result may also overflow to ±∞ or NaN (the error analysis assumes no
//! overflow, so nothing tighter can be promised). Where a sum's partial
//! sums can leave the f32 range, [`Bound::Overflowing`] also admits what
//! the op makes of ±∞ and NaN (a ReLU epilogue turns −∞ into 0).
//!
//! ```
//! use kiln_conformance::bound::{judge, ulp};
//! use kiln_core::{bounds::Bound, DType};
//!
//! // f32's spacing just above 1 is 2⁻²³.
//! assert_eq!(ulp(DType::F32, 1.0), f64::from(f32::EPSILON));
//! // A value 2 ulps off passes a 4-ulp bound and fails a correctly rounded one.
//! let got = 1.0 + 2.0 * f64::from(f32::EPSILON);
//! assert!(judge(Bound::Ulps(4), DType::F32, 1.0, got).ok);
//! assert!(!judge(Bound::CorrectlyRounded, DType::F32, 1.0, got).ok);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use half::{bf16, f16};
use kiln_core::DType;

pub use kiln_core::bounds::{gamma, Bound, ETA_F32};

/// Rounds an f64 to the storage type (nearest-even) and widens it back.
pub fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => f64::from(x as f32),
        DType::F16 => kiln_core::f16_from_f64(x).to_f64(),
        DType::BF16 => kiln_core::bf16_from_f64(x).to_f64(),
        DType::U32 => x,
    }
}

/// The largest finite value of the storage type.
pub fn max_finite(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f64::from(f32::MAX),
        DType::F16 => f16::MAX.to_f64(),
        DType::BF16 => bf16::MAX.to_f64(),
        DType::U32 => f64::from(u32::MAX),
    }
}

/// The spacing of the storage type's values around `x` (one ulp).
pub fn ulp(dtype: DType, x: f64) -> f64 {
    let (mantissa_bits, min_exp) = match dtype {
        DType::F32 => (24, -126),
        DType::F16 => (11, -14),
        DType::BF16 => (8, -126),
        DType::U32 => return 1.0,
    };
    let e = if x == 0.0 || !x.is_finite() {
        min_exp
    } else {
        (x.abs().log2().floor() as i32).max(min_exp)
    };
    2f64.powi(e - (mantissa_bits - 1))
}

/// The number of representable values between `a` and `b` (both already
/// values of the storage type), counting through zero.
pub fn ulps_between(dtype: DType, a: f64, b: f64) -> f64 {
    let key = |x: f64| -> i64 {
        let bits = match dtype {
            DType::F32 => i64::from((x as f32).to_bits()),
            DType::F16 => i64::from(kiln_core::f16_from_f64(x).to_bits()),
            DType::BF16 => i64::from(kiln_core::bf16_from_f64(x).to_bits()),
            DType::U32 => return x as i64,
        };
        let sign = match dtype {
            DType::F32 => 1i64 << 31,
            _ => 1i64 << 15,
        };
        // Map sign-magnitude to a monotonic integer line.
        if bits & sign != 0 {
            -(bits & (sign - 1))
        } else {
            bits
        }
    };
    (key(a) - key(b)).unsigned_abs() as f64
}

/// The verdict on one element.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// Whether it is within the bound.
    pub ok: bool,
    /// The error as a fraction of the bound (0 when exact; ∞ when an exact
    /// or correctly rounded op is off at all).
    pub fraction: f64,
    /// |got − want|.
    pub abs_error: f64,
    /// The distance in ulps from the correctly rounded value.
    pub ulps: f64,
}

/// Judges `got` (a value of `dtype`) against the exact `want`.
pub fn judge(bound: Bound, dtype: DType, want: f64, got: f64) -> Verdict {
    let verdict = |ok: bool, fraction: f64, abs_error: f64, ulps: f64| Verdict {
        ok,
        fraction,
        abs_error,
        ulps,
    };
    let fail = verdict(false, f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let pass = verdict(true, 0.0, 0.0, 0.0);
    if want.is_nan() {
        return if got.is_nan() { pass } else { fail };
    }
    let bound = match bound {
        Bound::Overflowing { abs, images } => {
            if got.is_nan() || images.contains(&got) {
                return pass;
            }
            // An infinity the op cannot make of ±∞ (−∞ after a ReLU) is wrong.
            if got.is_infinite() {
                return fail;
            }
            Bound::Abs(abs)
        }
        other => other,
    };
    // An absolute bound beyond the format's range admits overflow (±∞, or
    // NaN from ∞ − ∞): the error analysis assumes none, so it promises nothing.
    let abs_total = match bound {
        Bound::Abs(e) => e + 0.5 * ulp(dtype, want),
        _ => 0.0,
    };
    let beyond_range = abs_total.is_nan() || abs_total >= max_finite(dtype);
    if matches!(bound, Bound::Abs(_)) && beyond_range && !got.is_finite() {
        return pass;
    }
    if got.is_nan() {
        return fail;
    }
    let rounded = round_to(dtype, want);
    if want.is_infinite() || !rounded.is_finite() || got.is_infinite() {
        return if got == rounded { pass } else { fail };
    }
    let abs_error = (got - want).abs();
    let ulps = ulps_between(dtype, got, rounded);
    let same_sign = got.is_sign_negative() == rounded.is_sign_negative();
    match bound {
        // Bitwise, so +0 and −0 differ.
        Bound::Exact => {
            let ok = got == rounded && same_sign;
            verdict(ok, if ok { 0.0 } else { f64::INFINITY }, abs_error, ulps)
        }
        // Value-equal: max(+0, −0) may return either zero.
        Bound::CorrectlyRounded => {
            let ok = got == rounded;
            verdict(ok, if ok { 0.0 } else { f64::INFINITY }, abs_error, ulps)
        }
        Bound::Ulps(n) => verdict(
            ulps <= f64::from(n),
            ulps / f64::from(n.max(1)),
            abs_error,
            ulps,
        ),
        Bound::Abs(_) | Bound::Overflowing { .. } => {
            let fraction = if abs_total > 0.0 {
                abs_error / abs_total
            } else if abs_error == 0.0 {
                0.0
            } else {
                f64::INFINITY
            };
            verdict(fraction <= 1.0, fraction, abs_error, ulps)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_ulps() {
        assert_eq!(round_to(DType::F32, 1.0 + 2f64.powi(-30)), 1.0);
        assert_eq!(ulp(DType::F32, 1.0), 2f64.powi(-23));
        assert_eq!(ulp(DType::F16, 1.0), 2f64.powi(-10));
        assert_eq!(ulp(DType::BF16, 3.0), 2f64.powi(-6));
        assert_eq!(
            ulps_between(
                DType::F32,
                1.0,
                f64::from(f32::from_bits(1.0f32.to_bits() + 3))
            ),
            3.0
        );
        let tiny = f64::from(f32::from_bits(1));
        assert_eq!(ulps_between(DType::F32, tiny, -tiny), 2.0);
    }

    #[test]
    fn judgements() {
        assert!(judge(Bound::Exact, DType::F32, 1.5, 1.5).ok);
        assert!(!judge(Bound::Exact, DType::F32, 0.0, -0.0).ok);
        assert!(judge(Bound::Exact, DType::F32, f64::NAN, f64::NAN).ok);
        assert!(
            !judge(
                Bound::CorrectlyRounded,
                DType::F32,
                f64::INFINITY,
                f64::from(f32::MAX)
            )
            .ok
        );
        assert!(judge(Bound::CorrectlyRounded, DType::F32, 1e39, f64::INFINITY).ok);
        let one_up = f64::from(f32::from_bits(1.0f32.to_bits() + 1));
        assert!(!judge(Bound::CorrectlyRounded, DType::F32, 1.0, one_up).ok);
        assert!(judge(Bound::Ulps(1), DType::F32, 1.0, one_up).ok);
        let v = judge(Bound::Abs(1e-6), DType::F32, 1.0, 1.0 + 1e-6);
        assert!(v.ok && v.fraction > 0.9, "{v:?}");
        assert!(!judge(Bound::Abs(1e-6), DType::F32, 1.0, 1.0 + 1e-5).ok);
        assert!(judge(Bound::Abs(1e39), DType::F32, 1.0, f64::INFINITY).ok);
        assert!(!judge(Bound::Abs(1.0), DType::F32, 1.0, f64::INFINITY).ok);
    }

    #[test]
    fn overflowing_sums_admit_what_ieee_arithmetic_gives() {
        // relu(s) where s = 1.8e60 exactly, but the f32 partial sums went to −∞.
        let relu = [0.0, f64::INFINITY];
        let b = Bound::accumulated(1e54, 2e60, 4, relu);
        assert!(matches!(b, Bound::Overflowing { .. }));
        for got in [0.0, f64::INFINITY, f64::NAN] {
            assert!(judge(b, DType::F32, 1.8e60, got).ok, "{got}");
        }
        assert!(!judge(b, DType::F32, 1.8e60, 5.0).ok);
        assert!(!judge(b, DType::F32, 1.8e60, f64::NEG_INFINITY).ok);
        // Within range the plain bound holds: 0 is no answer for 3.
        let b = Bound::accumulated(1e-6, 3.0, 4, relu);
        assert_eq!(b, Bound::Abs(1e-6));
        assert!(!judge(b, DType::F32, 3.0, 0.0).ok);
    }
}
