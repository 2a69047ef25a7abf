//! Helpers shared by kiln-cpu's integration tests (each test crate uses
//! some of them).
#![allow(dead_code)]

use kiln_core::rng;
use kiln_cpu::{CpuBackend, KernelSet};

/// `n` values in `[-1, 1)` from seed `seed`'s Philox stream.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| rng::uniform(seed, 0, i) * 2.0 - 1.0)
        .collect()
}

/// Every SIMD set this processor has, on 1, 2 and 3 threads: the backends a
/// "same bits as the reference" test compares.
pub fn every_set_and_thread_count() -> Vec<CpuBackend> {
    [KernelSet::Avx2, KernelSet::Avx512, KernelSet::Neon]
        .into_iter()
        .filter(|set| set.available())
        .flat_map(|set| {
            [1, 2, 3].map(|threads| {
                CpuBackend::with_kernels(set)
                    .unwrap()
                    .with_threads(threads)
                    .unwrap()
            })
        })
        .collect()
}
