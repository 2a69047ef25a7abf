//! The AVX-512F micro-kernel: an 8 × 32 tile in 16 zmm accumulators, and
//! its left half, 8 × 16 in 8, for a last panel at most half full.

use std::arch::x86_64::__m512;

super::tile::micro_kernel! {
    /// 8 rows × 32 columns: per k step, two 16-wide loads of B, eight
    /// broadcasts of A and sixteen fused multiply-adds ([`tile`](super::tile::tile)).
    Avx512: __m512, 8, 32, "avx512f"
}
