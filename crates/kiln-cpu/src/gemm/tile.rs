//! The register tile of the x86 micro-kernels: one body, generic over the
//! vector type, compiled into each instruction set's kernel functions (in
//! `avx2.rs` and `avx512.rs`), which carry the target features.

use std::arch::x86_64::*;

/// The vector operations the tile needs, for one register type.
///
/// Every method is `#[inline(always)]` and has no target feature of its
/// own: it compiles to its single instruction only inside a function that
/// enables the type's instruction set, and that is the only place it may
/// be called from.
pub(super) trait Vector: Copy {
    /// f32 lanes per register.
    const LANES: usize;
    /// # Safety
    /// The instruction set is enabled in the calling function.
    unsafe fn zero() -> Self;
    /// # Safety
    /// As for `zero`, and `LANES` floats are readable at `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// As for `zero`, and `LANES` floats are writable at `p`.
    unsafe fn store(p: *mut f32, v: Self);
    /// # Safety
    /// As for `zero`.
    unsafe fn splat(x: f32) -> Self;
    /// `a·b + c`, rounded once.
    ///
    /// # Safety
    /// As for `zero`.
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    /// # Safety
    /// As for `zero`.
    unsafe fn add(a: Self, b: Self) -> Self;
}

impl Vector for __m512 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: AVX-512F is enabled in the caller (the trait's contract).
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: as for `zero`, and p holds 16 floats.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self) {
        // SAFETY: as for `zero`, and p has room for 16 floats.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: as for `zero`.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: as for `zero`.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: as for `zero`.
        unsafe { _mm512_add_ps(a, b) }
    }
}

impl Vector for __m256 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: AVX2 and FMA are enabled in the caller (the contract).
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: as for `zero`, and p holds 8 floats.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self) {
        // SAFETY: as for `zero`, and p has room for 8 floats.
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: as for `zero`.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: as for `zero`.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: as for `zero`.
        unsafe { _mm256_add_ps(a, b) }
    }
}

/// The `MR × NV·LANES` tile `Σₚ A[i, p]·B[p, j]` with A's element `(i, p)`
/// at `a[i·rsa + p·csa]` and B's row `p` the `NV·LANES` floats at
/// `b[p·rsb ..]` (`rsb = 2·LANES` for a packed panel; B's row stride to
/// read it in place), stored to C's rows `ldc` apart (`add`: added to what
/// they hold). The kernels' tiles are two vectors wide (`NV = 2`); one
/// vector (`NV = 1`) computes the left half of a panel, for the last
/// panel of an output whose columns fill at most half of it.
///
/// Per k step: `NV` loads of B, `MR` broadcasts of A, `NV·MR` FMAs into as
/// many accumulators. Always inlined into callers compiled for `V`'s
/// instruction set, so packed panels' strides (`1` and `MR` for A,
/// `2·LANES` for B) are constants there: every load of the k loop,
/// unrolled by four, is then a fixed displacement from two pointers —
/// three integer instructions per four steps instead of about ten per
/// step, which compete with the FMAs for issue ports. C's cache lines are
/// requested first, so the loads (or the stores' line fills) at the end do
/// not wait on L2 or L3: C's rows are far apart and the hardware
/// prefetchers do not follow them (measured for the AVX-512 tile on the
/// Emerald Rapids Xeon; for AVX2's 16-float rows the second line is often
/// the same).
///
/// # Safety
/// `V`'s instruction set is enabled in the caller; `b[p·rsb + j]` is in
/// bounds for `p < kc`, `j < NV·LANES`; `a[i·rsa + p·csa]` is in bounds
/// for `i < MR`, `p < kc`; C holds `MR` rows of `NV·LANES` floats, `ldc`
/// apart.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile<V: Vector, const MR: usize, const NV: usize>(
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
    let w = V::LANES;
    for i in 0..MR {
        for v in 0..NV {
            // SAFETY: prefetches never fault; the addresses are inside C anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + v * w) as *const i8) };
        }
    }
    // SAFETY: V's instruction set is enabled (the contract).
    let mut acc = [[unsafe { V::zero() }; NV]; MR];
    let (mut a, mut b) = (a, b);
    // Step `q` past `a` and `b`.
    macro_rules! step {
        ($q:expr) => {
            // SAFETY: the steps stay below kc, whose B and A elements are
            // in bounds (the contract); `a` and `b` advance by whole steps.
            unsafe {
                let mut bv = [V::zero(); NV];
                for (v, bj) in bv.iter_mut().enumerate() {
                    *bj = V::load(b.add($q * rsb + v * w));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = V::splat(*a.add(i * rsa + $q * csa));
                    for (r, &bj) in row.iter_mut().zip(&bv) {
                        *r = V::mul_add(ai, bj, *r);
                    }
                }
            }
        };
    }
    for _ in 0..kc / 4 {
        step!(0);
        step!(1);
        step!(2);
        step!(3);
        // Wrapping: after the last step the pointers may point past A's or
        // B's allocation (rows read in place); they are not read there.
        (a, b) = (a.wrapping_add(4 * csa), b.wrapping_add(4 * rsb));
    }
    for _ in 0..kc % 4 {
        step!(0);
        (a, b) = (a.wrapping_add(csa), b.wrapping_add(rsb));
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, &r) in row.iter().enumerate() {
            // SAFETY: C holds MR rows of NV·LANES floats, ldc apart; V's
            // instruction set is enabled.
            unsafe {
                let cv = c.add(i * ldc + v * w);
                V::store(cv, if add { V::add(V::load(cv), r) } else { r });
            }
        }
    }
}

/// Declares an x86 micro-kernel: `$name`, a [`MicroKernel`] whose
/// `MR × NR` tile is [`tile`] on `$vec` (two vectors a row) and whose half
/// tile is one vector a row, and the `$feature`-enabled functions they
/// run: `into` (any strides) and `into_packed` (packed panels' strides
/// compiled in), `half` and `half_packed` — one body per instruction set,
/// named per set in profiles (`gemm::avx512::into`).
///
/// [`MicroKernel`]: super::MicroKernel
macro_rules! micro_kernel {
    ($(#[$doc:meta])* $name:ident: $vec:ty, $mr:literal, $nr:literal, $feature:literal) => {
        $(#[$doc])*
        pub(crate) struct $name;

        impl $crate::gemm::MicroKernel for $name {
            const MR: usize = $mr;
            const NR: usize = $nr;
            const B_IN_PLACE: bool = true;
            const HALF_TILE: bool = true;

            unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32) {
                // SAFETY: forwarded from the caller (the instruction set
                // present, buffer sizes); C is one tile, NR floats a row.
                unsafe { into_packed(kc, a, b, c, $nr, false) }
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
                // SAFETY: forwarded from the caller (the instruction set
                // present, A and B in bounds, C holds MR rows of NR floats,
                // ldc apart).
                unsafe {
                    if (rsa, csa, rsb) == (1, $mr, $nr) {
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
                // SAFETY: as for `tile_into`; the half reads and writes the
                // first NR / 2 floats of each row.
                unsafe {
                    if (rsa, csa, rsb) == (1, $mr, $nr) {
                        half_packed(kc, a, b, c, ldc)
                    } else {
                        half(kc, a, rsa, csa, b, rsb, c, ldc)
                    }
                }
            }
        }

        /// `C += tile` (`add`) or `C = tile`, with C's rows `ldc` apart and
        /// B's rows `rsb` apart.
        #[target_feature(enable = $feature)]
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
            // SAFETY: forwarded from `tile_into`'s caller; the instruction
            // set is enabled here.
            unsafe { $crate::gemm::tile::tile::<$vec, $mr, 2>(kc, a, rsa, csa, b, rsb, c, ldc, add) }
        }

        /// [`into`] from packed A and B panels: their strides compiled in
        /// as constants.
        #[target_feature(enable = $feature)]
        unsafe fn into_packed(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, add: bool) {
            // SAFETY: as for `into`.
            unsafe { $crate::gemm::tile::tile::<$vec, $mr, 2>(kc, a, 1, $mr, b, $nr, c, ldc, add) }
        }

        /// The left half of [`into`]'s tile (one vector a row), stored to C.
        #[target_feature(enable = $feature)]
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
            // SAFETY: forwarded from `half_tile_into`'s caller; the
            // instruction set is enabled here.
            unsafe { $crate::gemm::tile::tile::<$vec, $mr, 1>(kc, a, rsa, csa, b, rsb, c, ldc, false) }
        }

        /// [`half`] from packed A and B panels (B's rows NR floats apart).
        #[target_feature(enable = $feature)]
        unsafe fn half_packed(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
            // SAFETY: as for `half`.
            unsafe { $crate::gemm::tile::tile::<$vec, $mr, 1>(kc, a, 1, $mr, b, $nr, c, ldc, false) }
        }
    };
}

pub(super) use micro_kernel;
