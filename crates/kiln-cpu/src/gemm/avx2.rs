//! The AVX2 + FMA micro-kernel: a 6 × 16 tile in 12 ymm accumulators, and
//! its left half, 6 × 8 in 6, for a last panel at most half full.

use std::arch::x86_64::*;

use super::tile::tile;
use super::MicroKernel;

/// 6 rows × 16 columns: per k step, two 8-wide loads of B, six broadcasts
/// of A and twelve fused multiply-adds ([`tile`]).
pub(crate) struct Avx2;

impl MicroKernel for Avx2 {
    const MR: usize = 6;
    const NR: usize = 16;
    const B_IN_PLACE: bool = true;

    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32) {
        // SAFETY: forwarded from the caller (AVX2 and FMA present, buffer sizes); C is
        // one tile, 16 floats a row.
        unsafe { into_packed(kc, a, b, c, 16, false) }
    }

    unsafe fn tile_into(
        kc: usize,
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        rsb: usize,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        // SAFETY: forwarded from the caller (features present, A and B in
        // bounds, C holds 6 rows of 16 floats, ldc apart).
        unsafe {
            if (rsa, csa, rsb) == (1, Self::MR, Self::NR) {
                into_packed(kc, a, b, c, ldc, add)
            } else {
                into(kc, a, rsa, csa, b, rsb, c, ldc, add)
            }
        }
    }

    unsafe fn half_tile_into(
        kc: usize,
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        rsb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY: forwarded from the caller (features present, A and B in
        // bounds, C holds 6 rows of 16 floats, ldc apart).
        unsafe {
            if (rsa, csa, rsb) == (1, Self::MR, Self::NR) {
                half_packed(kc, a, b, c, ldc)
            } else {
                half(kc, a, rsa, csa, b, rsb, c, ldc)
            }
        }
    }
}

/// `C += tile` (`add`) or `C = tile`, with C's rows `ldc` apart and B's
/// rows `rsb` apart.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn into(
    kc: usize,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    // SAFETY: forwarded from `tile_into`'s caller; AVX2 and FMA enabled here.
    unsafe { tile::<__m256, 6, 2>(kc, a, rsa, csa, b, rsb, c, ldc, add) }
}

/// [`into`] from packed A and B panels: their strides compiled in as
/// constants.
#[target_feature(enable = "avx2,fma")]
unsafe fn into_packed(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, add: bool) {
    // SAFETY: forwarded from `tile_into`'s caller; AVX2 and FMA enabled here.
    unsafe { tile::<__m256, 6, 2>(kc, a, 1, 6, b, 16, c, ldc, add) }
}

/// The left half of [`into`]'s tile, 6 × 8 (one vector a row),
/// stored to C.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn half(
    kc: usize,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    rsb: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: forwarded from `half_tile_into`'s caller; AVX2 and FMA enabled here.
    unsafe { tile::<__m256, 6, 1>(kc, a, rsa, csa, b, rsb, c, ldc, false) }
}

/// [`half`] from packed A and B panels (B's rows 16 floats apart).
#[target_feature(enable = "avx2,fma")]
unsafe fn half_packed(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    // SAFETY: forwarded from `half_tile_into`'s caller; AVX2 and FMA enabled here.
    unsafe { tile::<__m256, 6, 1>(kc, a, 1, 6, b, 16, c, ldc, false) }
}
