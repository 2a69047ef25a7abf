//! Vectorised conversions between f32 and the 16-bit floats, bitwise equal
//! to the scalar ones (`half`'s, which the conformance suite checks
//! against the correctly rounded f64 result):
//!
//! - f32 → f16 and f16 → f32 with F16C (`vcvtps2ph` rounding to nearest
//!   even, `vcvtph2ps` exact) on x86 processors that have it, and with
//!   NEON's `fcvtn`/`fcvtl` (baseline on aarch64; round to nearest even
//!   under the default FPCR), eight lanes at a time;
//! - f32 → bf16 (round to nearest even on the bit pattern, NaN kept quiet)
//!   and bf16 → f32 (a shift), as branch-free loops compiled per kernel set.
//!   AVX-512 BF16's `vcvtne2ps2bf16` is deliberately not used: it treats
//!   subnormal inputs as zero, so it is not the correctly rounded
//!   conversion the conformance suite requires (the compiled loop runs at
//!   12 Gelem/s, memory-bound anyway).

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;

use kiln_core::{bf16, f16, DType, HostData, Result, View};

use super::wide;
use crate::fresh::Slot;
use crate::workers::Workers;
use crate::{storage, KernelSet};

/// f32 → bf16, round to nearest even on the bit pattern, NaN kept quiet.
#[inline(always)]
fn round_bf16(v: f32) -> bf16 {
    let b = v.to_bits();
    let rounded = if v.is_nan() {
        // Keep NaN a NaN: truncate and set the quiet bit.
        (b >> 16) | 0x0040
    } else {
        (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    };
    bf16::from_bits(rounded as u16)
}

/// The f32 → bf16 loop (see the module doc).
#[inline(always)]
pub(crate) fn to_bf16_loop(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| round_bf16(v)).collect()
}

/// The f32 → bf16 loop into a fresh buffer of `x`'s length.
#[inline(always)]
pub(crate) fn to_bf16_into_loop(x: &[f32], out: &mut [MaybeUninit<bf16>]) {
    assert_eq!(x.len(), out.len(), "a cast writes one element per input");
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(round_bf16(v));
    }
}

/// The bf16 → f32 loop.
#[inline(always)]
pub(crate) fn from_bf16_loop(x: &[bf16]) -> Vec<f32> {
    x.iter()
        .map(|v| f32::from_bits(u32::from(v.to_bits()) << 16))
        .collect()
}

/// The bf16 → f32 loop into a buffer of `x`'s length (fresh or not).
#[inline(always)]
pub(crate) fn from_bf16_into_loop(x: &[bf16], out: &mut [impl Slot]) {
    assert_eq!(x.len(), out.len(), "a cast writes one element per input");
    for (o, v) in out.iter_mut().zip(x) {
        o.put(f32::from_bits(u32::from(v.to_bits()) << 16));
    }
}

/// f32 → bf16, round to nearest even.
pub(crate) fn to_bf16(set: KernelSet, x: &[f32]) -> Vec<bf16> {
    wide::to_bf16(set, x)
}

/// bf16 → f32, exact.
pub(crate) fn from_bf16(set: KernelSet, x: &[bf16]) -> Vec<f32> {
    wide::from_bf16(set, x)
}

/// Elements per task of a cast spread over the team: a few microseconds
/// of memory-bound work each.
const CAST_PER_TASK: usize = 1 << 16;

/// [`to_bf16`] over `pool`'s threads (bitwise the same values).
pub(crate) fn to_bf16_on(set: KernelSet, pool: &Workers, x: &[f32]) -> Vec<bf16> {
    // SAFETY: the loop writes every element of its chunk (it asserts the
    // lengths match).
    unsafe {
        pool.filled(x.len(), CAST_PER_TASK, |i, o| {
            wide::to_bf16_into(set, &x[i..i + o.len()], o)
        })
    }
}

/// [`from_bf16`] over `pool`'s threads.
pub(crate) fn from_bf16_on(set: KernelSet, pool: &Workers, x: &[bf16]) -> Vec<f32> {
    // SAFETY: as in `to_bf16_on`.
    unsafe {
        pool.filled(x.len(), CAST_PER_TASK, |i, o| {
            wide::from_bf16_into(set, &x[i..i + o.len()], o)
        })
    }
}

/// Storage elements `r` of a float operand as f32: borrowed for f32,
/// widened with the vector conversions (exact) for f16 and bf16; `None` for
/// u32, or f16 where there is no vector conversion. bf16 is widened over
/// `pool`'s threads where one is given.
pub(crate) fn widen<'a>(
    set: KernelSet,
    pool: Option<&Workers>,
    data: &'a HostData,
    r: Range<usize>,
) -> Option<Cow<'a, [f32]>> {
    Some(match data {
        HostData::F32(d) => Cow::Borrowed(&d[r]),
        HostData::BF16(d) => Cow::Owned(match pool {
            Some(pool) => from_bf16_on(set, pool, &d[r]),
            None => from_bf16(set, &d[r]),
        }),
        HostData::F16(d) => Cow::Owned(from_f16(&d[r])?),
        HostData::U32(_) => return None,
    })
}

/// [`storage::read_f32`] for the SIMD sets: a contiguous f16/bf16 operand
/// is widened with the vector conversions (bitwise the same values). The
/// scalar set keeps the reference's plain loops; bf16 is widened over
/// `pool`'s threads where one is given.
pub(crate) fn read_f32<'a>(
    set: KernelSet,
    pool: Option<&Workers>,
    op: &'static str,
    v: View<'a, HostData>,
) -> Result<Cow<'a, [f32]>> {
    let range = v
        .layout
        .contiguous_range()
        .filter(|r| r.end <= v.storage.len() && set != KernelSet::Scalar);
    match range.and_then(|r| widen(set, pool, v.storage, r)) {
        Some(data) => Ok(data),
        None => storage::read_f32(op, v),
    }
}

/// [`storage::store_f32`] for the SIMD sets: f32 results rounded to f16 or
/// bf16 with the vector conversions (bitwise the same values).
pub(crate) fn store_f32(
    set: KernelSet,
    op: &'static str,
    dtype: DType,
    v: Vec<f32>,
) -> Result<HostData> {
    if set == KernelSet::Scalar {
        return storage::store_f32(op, dtype, v);
    }
    match dtype {
        DType::BF16 => Ok(HostData::BF16(to_bf16(set, &v))),
        DType::F16 => match to_f16(&v) {
            Some(h) => Ok(HostData::F16(h)),
            None => storage::store_f32(op, dtype, v),
        },
        _ => storage::store_f32(op, dtype, v),
    }
}

/// [`store_f32`] with a bf16 result rounded over `pool`'s threads.
pub(crate) fn store_f32_on(
    set: KernelSet,
    pool: Option<&Workers>,
    op: &'static str,
    dtype: DType,
    v: Vec<f32>,
) -> Result<HostData> {
    match pool {
        Some(pool) if dtype == DType::BF16 && set != KernelSet::Scalar => {
            Ok(HostData::BF16(to_bf16_on(set, pool, &v)))
        }
        _ => store_f32(set, op, dtype, v),
    }
}

/// Rounds f32 values in place to what `dtype` would store (a no-op for f32).
pub(crate) fn round_to(set: KernelSet, dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::BF16 => v.copy_from_slice(&from_bf16(set, &to_bf16(set, v))),
        DType::F16 => match to_f16(v).and_then(|h| from_f16(&h)) {
            Some(r) => v.copy_from_slice(&r),
            None => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        },
        _ => {}
    }
}

/// f32 → f16 with F16C (an x86 processor that has it) or NEON; `None`
/// where neither is available.
pub(crate) fn to_f16(x: &[f32]) -> Option<Vec<f16>> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        let mut out = vec![f16::ZERO; x.len()];
        // SAFETY: F16C was just detected.
        unsafe { f16c::to_f16(x, &mut out) };
        return Some(out);
    }
    #[cfg(target_arch = "aarch64")]
    {
        let mut out = vec![f16::ZERO; x.len()];
        fcvt::to_f16(x, &mut out);
        return Some(out);
    }
    #[allow(unreachable_code)]
    {
        let _ = x;
        None
    }
}

/// f16 → f32 with F16C (an x86 processor that has it) or NEON; `None`
/// where neither is available.
pub(crate) fn from_f16(x: &[f16]) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        let mut out = vec![0f32; x.len()];
        // SAFETY: F16C was just detected.
        unsafe { f16c::from_f16(x, &mut out) };
        return Some(out);
    }
    #[cfg(target_arch = "aarch64")]
    {
        let mut out = vec![0f32; x.len()];
        fcvt::from_f16(x, &mut out);
        return Some(out);
    }
    #[allow(unreachable_code)]
    {
        let _ = x;
        None
    }
}

/// NEON's conversions between f32 and f16 (`fcvtn`/`fcvtn2` narrowing
/// four lanes into each half of a register, `fcvtl`/`fcvtl2` widening).
/// They are part of base AArch64 SIMD (no FP16 extension needed); Rust's
/// f16 vector intrinsics are not stable, so they are written as `asm!`.
#[cfg(target_arch = "aarch64")]
mod fcvt {
    use std::arch::aarch64::*;
    use std::arch::asm;

    use kiln_core::f16;

    pub(super) fn to_f16(x: &[f32], out: &mut [f16]) {
        let n = x.len().min(out.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 ≤ n elements of both slices; f16 is a u16;
            // NEON is baseline on aarch64; the asm only converts registers.
            unsafe {
                let lo = vld1q_f32(x.as_ptr().add(i));
                let hi = vld1q_f32(x.as_ptr().add(i + 4));
                let h: uint16x8_t;
                asm!(
                    "fcvtn {h:v}.4h, {lo:v}.4s",
                    "fcvtn2 {h:v}.8h, {hi:v}.4s",
                    h = out(vreg) h,
                    lo = in(vreg) lo,
                    hi = in(vreg) hi,
                    options(pure, nomem, nostack),
                );
                vst1q_u16(out.as_mut_ptr().add(i) as *mut u16, h);
            }
            i += 8;
        }
        for (o, &v) in out[i..n].iter_mut().zip(&x[i..n]) {
            *o = f16::from_f32(v);
        }
    }

    pub(super) fn from_f16(x: &[f16], out: &mut [f32]) {
        let n = x.len().min(out.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: as in `to_f16`.
            unsafe {
                let h = vld1q_u16(x.as_ptr().add(i) as *const u16);
                let (lo, hi): (float32x4_t, float32x4_t);
                asm!(
                    "fcvtl {lo:v}.4s, {h:v}.4h",
                    "fcvtl2 {hi:v}.4s, {h:v}.8h",
                    lo = out(vreg) lo,
                    hi = out(vreg) hi,
                    h = in(vreg) h,
                    options(pure, nomem, nostack),
                );
                vst1q_f32(out.as_mut_ptr().add(i), lo);
                vst1q_f32(out.as_mut_ptr().add(i + 4), hi);
            }
            i += 8;
        }
        for (o, v) in out[i..n].iter_mut().zip(&x[i..n]) {
            *o = v.to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::*;

    use kiln_core::f16;

    /// # Safety
    /// The processor supports F16C and AVX; `out` is as long as `x`.
    #[target_feature(enable = "f16c,avx")]
    pub(super) unsafe fn to_f16(x: &[f32], out: &mut [f16]) {
        let n = x.len().min(out.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 ≤ n elements of both slices; f16 is a u16.
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, h);
            }
            i += 8;
        }
        for (o, &v) in out[i..n].iter_mut().zip(&x[i..n]) {
            *o = f16::from_f32(v);
        }
    }

    /// # Safety
    /// The processor supports F16C and AVX; `out` is as long as `x`.
    #[target_feature(enable = "f16c,avx")]
    pub(super) unsafe fn from_f16(x: &[f16], out: &mut [f32]) {
        let n = x.len().min(out.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 ≤ n elements of both slices; f16 is a u16.
            unsafe {
                let h = _mm_loadu_si128(x.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for (o, v) in out[i..n].iter_mut().zip(&x[i..n]) {
            *o = v.to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 61st f32 bit pattern (≈ 70 M: all exponents, ±0, subnormals,
    /// ±∞, NaNs) converts to the scalar result, bitwise.
    #[test]
    fn conversions_match_the_scalar_ones_bitwise() {
        let xs: Vec<f32> = (0..u32::MAX).step_by(61).map(f32::from_bits).collect();
        let set = KernelSet::best();
        let b = to_bf16(set, &xs);
        for (&x, &y) in xs.iter().zip(&b) {
            let want = bf16::from_f32(x);
            assert!(
                y.to_bits() == want.to_bits() || (x.is_nan() && y.is_nan()),
                "bf16({x:e}): {:#06x} vs {:#06x}",
                y.to_bits(),
                want.to_bits()
            );
        }
        let back = from_bf16(set, &b);
        assert!(back
            .iter()
            .zip(&b)
            .all(|(f, h)| f.to_bits() == h.to_f32().to_bits()));
        // NEON always converts; x86 does wherever it has F16C.
        #[cfg(target_arch = "aarch64")]
        assert!(to_f16(&xs[..1]).is_some() && from_f16(&[f16::ONE]).is_some());
        if let Some(h) = to_f16(&xs) {
            for (&x, &y) in xs.iter().zip(&h) {
                let want = f16::from_f32(x);
                assert!(
                    y.to_bits() == want.to_bits() || (x.is_nan() && y.is_nan()),
                    "f16({x:e}): {:#06x} vs {:#06x}",
                    y.to_bits(),
                    want.to_bits()
                );
            }
            let back = from_f16(&h).unwrap();
            assert!(back
                .iter()
                .zip(&h)
                .all(|(f, v)| f.to_bits() == v.to_f32().to_bits() || f.is_nan()));
        }
    }
}
