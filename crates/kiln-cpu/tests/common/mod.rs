//! Helpers shared by kiln-cpu's integration tests.

use kiln_core::rng;

/// `n` values in `[-1, 1)` from seed `seed`'s Philox stream.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| rng::uniform(seed, 0, i) * 2.0 - 1.0)
        .collect()
}
