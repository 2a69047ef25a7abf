//! The seed's MLP built in code and trained with the `Trainer` on the
//! bundled 10,000-digit MNIST sample, Keras-style: `fit`, `evaluate`,
//! and a callback after every step.
//!
//! `cargo run --release -p kiln-examples --example train_mlp [-- OUT.safetensors]`

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kiln_core::Result;
use kiln_cpu::CpuBackend;
use kiln_data::{Dataset, Split};
use kiln_nn::{ActivationSpec::*, Adam, Loss, ModelSpec};
use kiln_train::{model_file, FitConfig, StepHook, Trainer, Verbosity};

fn main() -> Result<()> {
    let backend = CpuBackend::new()?;
    // Images are u8 in the dataset; the trainer's loader scales them to
    // [0, 1] floats, laid out [n, 1, 28, 28].
    let train = Dataset::bundled_sample(Split::Train)?;
    let test = Dataset::bundled_sample(Split::Test)?;

    // The model, in code: the same as `models/mlp.toml`. The seed fixes
    // the initial weights (each layer draws from its own stream).
    let model = ModelSpec::new("mlp", [1, 28, 28])
        .flatten()
        .dense(64, Relu)
        .dense(10, Softmax)
        .build(42, &backend)?;
    println!("{}", model.summary());

    let mut trainer = Trainer::new(
        model,
        Box::new(Adam::new(1e-3)?),
        Loss::CategoricalCrossEntropy,
        backend,
    );
    // A callback after every step: here it only counts them.
    let steps = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&steps);
    let cfg = FitConfig {
        epochs: 3,
        batch_size: 64,
        seed: 7,
        verbosity: Verbosity::Lines,
        on_step: Some(StepHook::new(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        })),
        ..FitConfig::default()
    };
    let history = trainer.fit(&train, Some(&test), &cfg)?;
    assert_eq!(steps.load(Ordering::Relaxed), 3 * train.len().div_ceil(64));

    let eval = trainer.evaluate(&test, 1000)?;
    println!(
        "test: loss {:.4}, accuracy {:.2}% after {} epochs",
        eval.loss,
        100.0 * eval.accuracy,
        history.epochs.len()
    );
    assert!(
        eval.accuracy > 0.85,
        "the MLP should pass 85 % on the sample"
    );

    // Saved atomically with its spec: `kiln eval`, `kiln predict`,
    // `kiln serve` and `model_file::load` read it.
    let out = std::env::args().nth(1);
    let dir = tempfile::tempdir().map_err(|e| kiln_core::Error::io("a temporary folder", e))?;
    let path = out.map_or_else(|| dir.path().join("mlp.safetensors"), Into::into);
    model_file::save(&path, trainer.model(), &HashMap::new())?;
    println!("saved {}", path.display());
    Ok(())
}
