//! The AVX-512F micro-kernel: an 8 × 32 tile in 16 zmm accumulators.

use std::arch::x86_64::*;

use super::MicroKernel;

/// 8 rows × 32 columns: per k step, two 16-wide loads of B, eight
/// broadcasts of A and sixteen fused multiply-adds.
pub(crate) struct Avx512;

impl MicroKernel for Avx512 {
    const MR: usize = 8;
    const NR: usize = 32;

    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32) {
        // SAFETY: forwarded from the caller (AVX-512F present, buffer sizes).
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
        // bounds, C holds 8 rows of 32 floats, ldc apart).
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
        // SAFETY: forwarded from the caller (AVX-512F present, A's elements
        // in bounds, buffer sizes).
        unsafe { kernel(kc, a, rsa, csa, b, c, 32, false) }
    }
}

/// `C += tile` (`add`) or `C = tile`, with C's rows `ldc` apart.
#[target_feature(enable = "avx512f")]
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
#[target_feature(enable = "avx512f")]
unsafe fn into_packed(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, add: bool) {
    // SAFETY: forwarded from `tile_into`'s caller.
    unsafe { kernel(kc, a, 1, 8, b, c, ldc, add) }
}

/// The packed form: A's panel holds step `p`, row `i` at `p·8 + i`.
#[target_feature(enable = "avx512f")]
unsafe fn packed(kc: usize, a: *const f32, b: *const f32, c: *mut f32) {
    // SAFETY: forwarded; with these strides the reads stay in the panel.
    unsafe { kernel(kc, a, 1, 8, b, c, 32, false) }
}

/// The tile with A's element `(i, p)` at `a[i·rsa + p·csa]` (a packed
/// panel's strides are `1` and `MR`; compiling a copy with them as
/// constants measured no faster on an Emerald Rapids Xeon).
#[target_feature(enable = "avx512f")]
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
    // Ask for C's 16 cache lines now, so the loads (or the stores' line
    // fills) at the end do not wait on L2 or L3: C's rows are far apart
    // and the hardware prefetchers do not follow them.
    for i in 0..8 {
        // SAFETY: prefetches never fault; the addresses are inside C anyway.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + 16) as *const i8);
        }
    }
    let mut acc = [[_mm512_setzero_ps(); 2]; 8];
    for p in 0..kc {
        // SAFETY: b holds kc·32 floats (the MicroKernel contract).
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_ps(b.add(p * 32)),
                _mm512_loadu_ps(b.add(p * 32 + 16)),
            )
        };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: A's element (i, p) is in bounds (the contract).
            let ai = _mm512_set1_ps(unsafe { *a.add(i * rsa + p * csa) });
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: c has room for 8 rows of 32 floats, ldc apart.
        unsafe {
            let (c0, c1) = (c.add(i * ldc), c.add(i * ldc + 16));
            if add {
                _mm512_storeu_ps(c0, _mm512_add_ps(_mm512_loadu_ps(c0), row[0]));
                _mm512_storeu_ps(c1, _mm512_add_ps(_mm512_loadu_ps(c1), row[1]));
            } else {
                _mm512_storeu_ps(c0, row[0]);
                _mm512_storeu_ps(c1, row[1]);
            }
        }
    }
}
