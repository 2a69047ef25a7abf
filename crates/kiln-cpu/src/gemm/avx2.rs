//! The AVX2 + FMA micro-kernel: a 6 × 16 tile in 12 ymm accumulators.

use std::arch::x86_64::*;

use super::MicroKernel;

/// 6 rows × 16 columns: per k step, two 8-wide loads of B, six broadcasts
/// of A and twelve fused multiply-adds.
pub(crate) struct Avx2;

impl MicroKernel for Avx2 {
    const MR: usize = 6;
    const NR: usize = 16;

    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32) {
        // SAFETY: forwarded from the caller (AVX2 and FMA present, buffer sizes).
        unsafe { packed(kc, a, b, c) }
    }

    unsafe fn tile_into(
        kc: usize,
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        // SAFETY: forwarded from the caller (features present, A in
        // bounds, C holds 6 rows of 16 floats, ldc apart).
        unsafe {
            if (rsa, csa) == (1, Self::MR) {
                into_packed(kc, a, b, c, ldc, add)
            } else {
                into(kc, a, rsa, csa, b, c, ldc, add)
            }
        }
    }

    unsafe fn tile_strided(
        kc: usize,
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        c: *mut f32,
    ) {
        // SAFETY: forwarded from the caller (AVX2 and FMA present, A's elements
        // in bounds, buffer sizes).
        unsafe { kernel(kc, a, rsa, csa, b, c, 16, false) }
    }
}

/// `C += tile` (`add`) or `C = tile`, with C's rows `ldc` apart.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn into(
    kc: usize,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    // SAFETY: forwarded from `tile_into`'s caller.
    unsafe { kernel(kc, a, rsa, csa, b, c, ldc, add) }
}

/// [`into`] from a packed A panel (constant strides).
#[target_feature(enable = "avx2,fma")]
unsafe fn into_packed(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, add: bool) {
    // SAFETY: forwarded from `tile_into`'s caller.
    unsafe { kernel(kc, a, 1, 6, b, c, ldc, add) }
}

/// The packed form: A's panel holds step `p`, row `i` at `p·6 + i`.
#[target_feature(enable = "avx2,fma")]
unsafe fn packed(kc: usize, a: *const f32, b: *const f32, c: *mut f32) {
    // SAFETY: forwarded; with these strides the reads stay in the panel.
    unsafe { kernel(kc, a, 1, 6, b, c, 16, false) }
}

/// The tile with A's element `(i, p)` at `a[i·rsa + p·csa]` (a packed
/// panel's strides are `1` and `MR`; compiling a copy with them as
/// constants measured no faster on an Emerald Rapids Xeon).
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    kc: usize,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    for p in 0..kc {
        // SAFETY: b holds kc·16 floats (the MicroKernel contract).
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_ps(b.add(p * 16)),
                _mm256_loadu_ps(b.add(p * 16 + 8)),
            )
        };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: A's element (i, p) is in bounds (the contract).
            let ai = _mm256_set1_ps(unsafe { *a.add(i * rsa + p * csa) });
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: c has room for 6 rows of 16 floats, ldc apart.
        unsafe {
            let (c0, c1) = (c.add(i * ldc), c.add(i * ldc + 8));
            if add {
                _mm256_storeu_ps(c0, _mm256_add_ps(_mm256_loadu_ps(c0), row[0]));
                _mm256_storeu_ps(c1, _mm256_add_ps(_mm256_loadu_ps(c1), row[1]));
            } else {
                _mm256_storeu_ps(c0, row[0]);
                _mm256_storeu_ps(c1, row[1]);
            }
        }
    }
}
