//! Vectorised elementwise kernels for the SIMD kernel sets. Each states its
//! bound, and the conformance suite checks it like any other kernel; ops
//! without a vector kernel here use the reference loops.

#[cfg(target_arch = "x86_64")]
pub(crate) mod exp_avx512;
