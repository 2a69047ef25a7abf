//! Helpers shared by the training tests.

use kiln_cpu::CpuBackend;
use kiln_train::{FitConfig, Trainer, Verbosity};

/// A silent fit of `epochs` epochs, batch 128, examples ordered by `seed`.
pub fn cfg(epochs: usize, seed: u64) -> FitConfig {
    FitConfig {
        epochs,
        batch_size: 128,
        seed,
        verbosity: Verbosity::Silent,
        ..FitConfig::default()
    }
}

/// The model's parameters, as bytes, for bit-for-bit comparisons.
pub fn weights(t: &Trainer<CpuBackend>) -> Vec<Vec<u8>> {
    t.model()
        .params()
        .iter()
        .map(|p| p.value().to_host().unwrap().as_bytes().to_vec())
        .collect()
}
