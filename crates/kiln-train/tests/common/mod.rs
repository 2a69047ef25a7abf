//! Helpers shared by the training tests.

use kiln_cpu::CpuBackend;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kiln_train::{FitConfig, StepHook, Trainer, Verbosity};

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

/// Stops `c`'s run once `steps` steps have completed: the flag goes up in
/// the step hook, so the next step is abandoned after its forward pass.
#[allow(dead_code)]
pub fn stop_after(c: &mut FitConfig, steps: usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    c.stop = Some(stop);
    c.on_step = Some(StepHook::new(move |s| {
        if (s.epoch - 1) * s.batches + s.batch >= steps {
            flag.store(true, Ordering::SeqCst);
        }
    }));
}
