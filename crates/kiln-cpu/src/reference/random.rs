//! Draws from the shared Philox streams (see `kiln_core::rng`).

use kiln_core::{rng, DType, Distribution, HostData, Result};

use crate::storage::store_f32;

pub(crate) fn random(
    dist: Distribution,
    numel: usize,
    dtype: DType,
    seed: u64,
    offset: u64,
) -> Result<HostData> {
    dist.validate()?;
    let values: Vec<f32> = match dist {
        Distribution::Uniform { low, high } => (0..numel as u64)
            .map(|i| (low + (high - low) * f64::from(rng::uniform(seed, offset, i))) as f32)
            .collect(),
        Distribution::Normal { mean, std } => (0..numel as u64)
            .map(|i| (mean + std * rng::normal(seed, offset, i)) as f32)
            .collect(),
    };
    store_f32("random", dtype, values)
}
