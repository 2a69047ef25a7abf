//! # kiln-train
//!
//! Keras-style training on top of `kiln-nn`: a [`Trainer`] with
//! [`Trainer::fit`], [`Trainer::evaluate`] and [`Trainer::predict`], epoch
//! [`History`] written as JSON lines, progress output, and model files
//! ([`model_file`]) written atomically in safetensors; [`lm`] trains
//! language models by iterations over a text corpus.
//!
//! ```
//! use kiln_cpu::CpuBackend;
//! use kiln_data::{Dataset, Split};
//! use kiln_nn::{Adam, Loss, ModelSpec};
//! use kiln_train::{FitConfig, Trainer, Verbosity};
//!
//! let b = CpuBackend::new()?;
//! let train = Dataset::bundled_sample(Split::Train)?.take(2000);
//! let test = Dataset::bundled_sample(Split::Test)?;
//! let model = ModelSpec::mlp().build(1, &b)?;
//! let mut t = Trainer::new(model, Box::new(Adam::new(1e-3)?), Loss::CategoricalCrossEntropy, b);
//! let cfg = FitConfig { epochs: 2, verbosity: Verbosity::Silent, ..FitConfig::default() };
//! let history = t.fit(&train, Some(&test), &cfg)?;
//! assert_eq!(history.epochs.len(), 2);
//! assert!(t.evaluate(&test, 1000)?.accuracy > 0.8);
//! # Ok::<(), kiln_core::Error>(())
//! ```

pub mod callbacks;
pub mod checkpoint;
pub mod data_parallel;
pub mod generate;
pub mod history;
pub mod lm;
pub mod loss_scale;
pub mod metrics;
pub mod model_file;
pub mod observe;
#[cfg(feature = "plots")]
pub mod plots;
pub mod progress;
pub mod trainer;

pub use callbacks::{EarlyStopping, EpochControl, EpochHook, Monitor};
pub use data_parallel::DataParallel;
pub use generate::{generate, Generated, SampleConfig};
pub use history::{EpochRecord, History};
pub use lm::{LmCheckpointPolicy, LmFitConfig, LmRecord, LmTrainer};
pub use loss_scale::LossScaler;
pub use metrics::{ClassificationReport, RegressionReport};
pub use progress::Verbosity;
pub use trainer::{CheckpointPolicy, Evaluation, FitConfig, StepEnd, StepHook, Trainer};
