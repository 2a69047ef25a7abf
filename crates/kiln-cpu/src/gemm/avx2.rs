//! The AVX2 + FMA micro-kernel: a 6 × 16 tile in 12 ymm accumulators, and
//! its left half, 6 × 8 in 6, for a last panel at most half full.

use std::arch::x86_64::__m256;

super::tile::micro_kernel! {
    /// 6 rows × 16 columns: per k step, two 8-wide loads of B, six
    /// broadcasts of A and twelve fused multiply-adds ([`tile`](super::tile::tile)).
    Avx2: __m256, 6, 16, "avx2,fma"
}
