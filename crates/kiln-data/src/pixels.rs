//! Pixel bytes to the floats a model takes: `b / 255`, correctly rounded —
//! bit for bit what `f32::from(b) / 255.0` gives.
//!
//! Vector divisions cost about a cycle a pixel: on the Emerald Rapids Xeon
//! the loader thread's conversion was 7.5 % of an MLP epoch's samples, on
//! the cores the compute threads share. Where the processor has fused
//! multiply-adds the quotient is instead `q = b·r` (`r` = 1/255 rounded)
//! corrected once, `q + (b − q·255)·r`: the residual `b − q·255` is exact
//! in one FMA, and the corrected quotient is the correctly rounded `b /
//! 255` for each of the 256 bytes (the module's tests check all of them on
//! the portable paths and on every vector path the test machine has).

use std::mem::MaybeUninit;

/// 1/255, rounded to f32.
#[cfg(any(test, target_arch = "x86_64", target_arch = "aarch64"))]
const RECIP_255: f32 = 1.0 / 255.0;

/// `b / 255` from a product and one fused correction (needs FMA hardware
/// to be fast; `mul_add` is correctly rounded everywhere).
#[cfg(any(test, target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn unit_fma(b: u8) -> f32 {
    let b = f32::from(b);
    let q = b * RECIP_255;
    let residual = (-q).mul_add(255.0, b);
    residual.mul_add(RECIP_255, q)
}

/// `b / 255` by division (processors without FMA; on AArch64, which has
/// FMA, only the tests use it).
#[cfg(any(test, not(target_arch = "aarch64")))]
#[inline(always)]
fn unit_div(b: u8) -> f32 {
    f32::from(b) / 255.0
}

/// The loop every path compiles: `dst[i] = unit(src[i])`, written, never
/// read.
#[inline(always)]
fn fill_by(dst: &mut [MaybeUninit<f32>], src: &[u8], unit: impl Fn(u8) -> f32) {
    for (d, &b) in dst.iter_mut().zip(src) {
        d.write(unit(b));
    }
}

/// [`fill_by`] with [`unit_fma`], vectorised for AVX-512.
///
/// # Safety
/// The processor supports AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn fill_avx512(dst: &mut [MaybeUninit<f32>], src: &[u8]) {
    fill_by(dst, src, unit_fma);
}

/// [`fill_by`] with [`unit_fma`], vectorised for AVX2.
///
/// # Safety
/// The processor supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fill_avx2(dst: &mut [MaybeUninit<f32>], src: &[u8]) {
    fill_by(dst, src, unit_fma);
}

/// Writes `b / 255` of each byte of `src` to `dst` (of the same length),
/// correctly rounded, by the fastest path this processor has.
fn fill_unit(dst: &mut [MaybeUninit<f32>], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "pixels: one float per byte");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F and FMA were detected just above.
                return unsafe { fill_avx512(dst, src) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 and FMA were detected just above.
                return unsafe { fill_avx2(dst, src) };
            }
        }
        fill_by(dst, src, unit_div)
    }
    // FMA is part of the base AArch64 instruction set.
    #[cfg(target_arch = "aarch64")]
    fill_by(dst, src, unit_fma);
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fill_by(dst, src, unit_div);
}

/// Appends `b / 255` of each byte of `src` to `dst`, correctly rounded
/// (written once: no zeroed buffer first).
pub(crate) fn extend_unit(dst: &mut Vec<f32>, src: &[u8]) {
    let len = dst.len();
    dst.reserve(src.len());
    fill_unit(&mut dst.spare_capacity_mut()[..src.len()], src);
    // SAFETY: the `src.len()` floats past `len` were written just above
    // (`fill_unit` writes every element of its slice).
    unsafe { dst.set_len(len + src.len()) };
}

/// Overwrites `dst` with `b / 255` of each byte of `src` (of the same
/// length), correctly rounded.
pub(crate) fn write_unit(dst: &mut [f32], src: &[u8]) {
    // SAFETY: `MaybeUninit<f32>` has f32's layout, and `fill_unit` only
    // writes initialised floats through the view, so `dst` stays
    // initialised.
    let view = unsafe { &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>]) };
    fill_unit(view, src);
}

/// Asks for `data`'s cache lines ahead of use: a hint, which never
/// faults and changes no value (a no-op where the target has no prefetch
/// instruction kiln issues).
pub(crate) fn prefetch<T>(data: &[T]) {
    const LINE: usize = 64;
    let (start, bytes) = (data.as_ptr().cast::<u8>(), std::mem::size_of_val(data));
    if bytes == 0 {
        return;
    }
    // Every line the bytes touch: from the first one's start, which may
    // lie before the data, to the line of the last byte.
    let lead = start as usize % LINE;
    for offset in (0..lead + bytes).step_by(LINE) {
        let p = start.wrapping_sub(lead).wrapping_add(offset);
        // SAFETY: a prefetch only hints the cache: it never faults (the
        // first line may start before `data`), reads no value into the
        // program and writes nothing.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
        }
        // SAFETY: as above: `prfm` is a hint that never faults.
        #[cfg(target_arch = "aarch64")]
        unsafe {
            std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let _ = p;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_byte() -> Vec<u8> {
        (0..=255).collect()
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    fn by_division() -> Vec<u32> {
        bits(
            &every_byte()
                .iter()
                .map(|&b| f32::from(b) / 255.0)
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn the_fused_correction_is_the_quotient_for_every_byte() {
        let fused: Vec<f32> = every_byte().into_iter().map(unit_fma).collect();
        assert_eq!(bits(&fused), by_division());
        // The product alone is not: the correction is what makes it exact.
        let product: Vec<f32> = every_byte()
            .into_iter()
            .map(|b| f32::from(b) * RECIP_255)
            .collect();
        assert_ne!(bits(&product), by_division());
    }

    #[test]
    fn every_path_gives_the_quotient_after_what_dst_held() {
        // Offsets and lengths that leave vector tails; 7 is coprime with
        // 256, so the bytes take every value.
        let src: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
        let want: Vec<u32> = src
            .iter()
            .map(|&b| (f32::from(b) / 255.0).to_bits())
            .collect();
        type Fill = dyn Fn(&mut [MaybeUninit<f32>], &[u8]);
        let check = |name: &str, fill: &Fill| {
            for (start, len) in [(0, 1000), (3, 17), (5, 256), (0, 0), (999, 1)] {
                let mut dst = vec![MaybeUninit::new(-1.0f32); len];
                fill(&mut dst, &src[start..start + len]);
                // SAFETY: every element was initialised above.
                let got: Vec<f32> = dst.iter().map(|d| unsafe { d.assume_init() }).collect();
                assert_eq!(bits(&got), want[start..start + len], "{name} {start}+{len}");
            }
        };
        check("dispatched", &fill_unit);
        check("division", &|d, s| fill_by(d, s, unit_div));
        check("fused, portable", &|d, s| fill_by(d, s, unit_fma));
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("fma") {
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 and FMA were detected just above.
                    check("avx2", &|d, s| unsafe { fill_avx2(d, s) });
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F and FMA were detected just above.
                    check("avx512", &|d, s| unsafe { fill_avx512(d, s) });
                }
            }
        }
    }

    #[test]
    fn extending_keeps_what_dst_held_and_writing_overwrites() {
        let src: Vec<u8> = (0..=255).rev().collect();
        let want: Vec<u32> = src
            .iter()
            .map(|&b| (f32::from(b) / 255.0).to_bits())
            .collect();
        let mut v = vec![-1.0f32; 3];
        extend_unit(&mut v, &src);
        assert_eq!(bits(&v[..3]), bits(&[-1.0; 3]));
        assert_eq!(bits(&v[3..]), want);
        let mut w = vec![7.0f32; 256];
        write_unit(&mut w, &src);
        assert_eq!(bits(&w), want);
    }
}
