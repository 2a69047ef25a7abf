//! Vectorised elementwise kernels for the SIMD kernel sets.
//!
//! - [`wide`]: the reference loops for exactly rounded ops (relu, add,
//!   affine, optimiser steps, …) compiled with each set's features enabled,
//!   so the compiler emits that set's vector instructions; their results are
//!   bitwise the reference's.
//! - One module per ISA of hand-written transcendentals (`avx512`, `avx2`,
//!   `neon`): exp, sigmoid, tanh, log, each stating its ulp bound, swept over
//!   ≈ 70 million f32 inputs by its tests and checked by the conformance
//!   suite like any other kernel.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub(crate) mod convert;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
pub(crate) mod ops;
pub(crate) mod random;
#[cfg(test)]
mod sweep;
pub(crate) mod wide;

/// log₂e, to find k = round(x·log₂e) in eˣ = 2ᵏ·eʳ.
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that k·LN2_HI is exact for |k| ≤ 2⁸: LN2_HI = 0.693145751953125
/// (16 significant bits) and LN2_LO ≈ 1.4286068e-6, the f32 nearest ln 2 − LN2_HI.
pub(crate) const LN2_HI: f32 = f32::from_bits(0x3F31_7200);
/// The low part of ln 2.
pub(crate) const LN2_LO: f32 = f32::from_bits(0x35BF_BE8E);
/// 1/n! for n = 7 down to 2: eʳ ≈ 1 + r + r²·P(r) on |r| ≤ ln2/2.
pub(crate) const EXP_TAYLOR: [f32; 6] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];

/// Odd Taylor coefficients of tanh after the linear term, highest first:
/// tanh a = a + a³·P(a²), P's coefficients for a¹⁷ down to a³.
pub(crate) const TANH_TAYLOR: [f32; 8] = [
    (6_404_582.0 / 10_854_718_875.0_f64) as f32,
    (-929_569.0 / 638_512_875.0_f64) as f32,
    (21_844.0 / 6_081_075.0_f64) as f32,
    (-1_382.0 / 155_925.0_f64) as f32,
    (62.0 / 2_835.0_f64) as f32,
    (-17.0 / 315.0_f64) as f32,
    (2.0 / 15.0_f64) as f32,
    (-1.0 / 3.0_f64) as f32,
];

/// Below this |x| tanh uses its Taylor series.
pub(crate) const TANH_SMALL: f32 = 0.4;

/// `2/(2k+1)` for k = 6 down to 1: ln(1+f) − 2s = s·(z·P(z)), z = s².
pub(crate) const ATANH_SERIES: [f32; 6] = [
    2.0 / 13.0,
    2.0 / 11.0,
    2.0 / 9.0,
    2.0 / 7.0,
    2.0 / 5.0,
    2.0 / 3.0,
];
