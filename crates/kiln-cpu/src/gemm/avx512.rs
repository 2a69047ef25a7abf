//! The AVX-512F micro-kernel: an 8 × 32 tile in 16 zmm accumulators, and
//! its left half, 8 × 16 in 8, for a last panel at most half full.

use std::arch::x86_64::*;

use super::tile::tile;
use super::MicroKernel;

/// 8 rows × 32 columns: per k step, two 16-wide loads of B, eight
/// broadcasts of A and sixteen fused multiply-adds ([`tile`]).
pub(crate) struct Avx512;

impl MicroKernel for Avx512 {
    const MR: usize = 8;
    const NR: usize = 32;
    const B_IN_PLACE: bool = true;

    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32) {
        // SAFETY: forwarded from the caller (AVX-512F present, buffer sizes); C is
        // one tile, 32 floats a row.
        unsafe { into_packed(kc, a, b, c, 32, false) }
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
        // bounds, C holds 8 rows of 32 floats, ldc apart).
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
        // bounds, C holds 8 rows of 32 floats, ldc apart).
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
#[target_feature(enable = "avx512f")]
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
    // SAFETY: forwarded from `tile_into`'s caller; AVX-512F enabled here.
    unsafe { tile::<__m512, 8, 2>(kc, a, rsa, csa, b, rsb, c, ldc, add) }
}

/// [`into`] from packed A and B panels: their strides compiled in as
/// constants.
#[target_feature(enable = "avx512f")]
unsafe fn into_packed(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, add: bool) {
    // SAFETY: forwarded from `tile_into`'s caller; AVX-512F enabled here.
    unsafe { tile::<__m512, 8, 2>(kc, a, 1, 8, b, 32, c, ldc, add) }
}

/// The left half of [`into`]'s tile, 8 × 16 (one vector a row),
/// stored to C.
#[target_feature(enable = "avx512f")]
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
    // SAFETY: forwarded from `half_tile_into`'s caller; AVX-512F enabled here.
    unsafe { tile::<__m512, 8, 1>(kc, a, rsa, csa, b, rsb, c, ldc, false) }
}

/// [`half`] from packed A and B panels (B's rows 32 floats apart).
#[target_feature(enable = "avx512f")]
unsafe fn half_packed(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    // SAFETY: forwarded from `half_tile_into`'s caller; AVX-512F enabled here.
    unsafe { tile::<__m512, 8, 1>(kc, a, 1, 8, b, 32, c, ldc, false) }
}
