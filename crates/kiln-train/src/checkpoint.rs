//! Checkpoints: everything a run needs to continue exactly where it
//! stopped, in one safetensors file written atomically.
//!
//! Tensors: the model's parameters (named as in model files) and the
//! optimiser's slots (`optimizer.m.3` — slot `m` of parameter 3). Metadata:
//! the model spec (`kiln.spec`), the kiln version, and `kiln.checkpoint`, a
//! JSON [`Progress`]: where the run is (epoch, batch within it, optimiser
//! steps), its settings (seed, batch size, augmentation), the dataset's name
//! and fingerprint, the optimiser's kind and counters, the dropout streams'
//! positions, the partial epoch's running totals and the history so far.
//! The data order needs no state: each epoch's shuffle and each example's
//! augmentation are functions of the seed, so a resumed run draws them again.
//!
//! ```
//! use kiln_cpu::CpuBackend;
//! use kiln_train::checkpoint;
//!
//! // File names sort by position: epoch, then batch.
//! assert!(checkpoint::file_name(2, 0) < checkpoint::file_name(10, 0));
//! let dir = tempfile::tempdir().unwrap();
//! assert!(checkpoint::list(dir.path())?.is_empty());
//! // Loading from a folder with none says so, rather than starting afresh.
//! let e = checkpoint::load(dir.path(), &CpuBackend::reference()).err().unwrap();
//! assert!(e.to_string().contains("holds no checkpoint"), "{e}");
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_core::{Backend, DType, DataError, Error, HostData, Result};
use kiln_nn::{Optimizer, OptimizerState, Sequential};
use serde::{Deserialize, Serialize};

use crate::model_file::{self, SPEC_KEY};
use crate::EpochRecord;

/// The metadata key holding [`Progress`] (JSON).
pub const PROGRESS_KEY: &str = "kiln.checkpoint";
/// Checkpoint files are `ckpt-<epoch>-<batch>.safetensors` in their folder.
const PREFIX: &str = "ckpt-";

/// Where a run stands, and what it must match to continue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Epochs completed.
    pub epoch: usize,
    /// Batches of the next epoch already trained on (0 at an epoch's end).
    pub batch: usize,
    /// Seed of the data order and augmentation.
    pub seed: u64,
    /// Examples per batch.
    pub batch_size: usize,
    /// The dataset's name.
    pub dataset: String,
    /// The training set's fingerprint (a resumed run must see the same data).
    pub dataset_fingerprint: String,
    /// Whether training images were augmented.
    pub augment: bool,
    /// The optimiser's kind.
    pub optimizer: String,
    /// Optimiser steps taken.
    pub optimizer_step: u64,
    /// The learning rate.
    pub lr: f32,
    /// Positions of the model's dropout streams.
    pub rng_positions: Vec<u64>,
    /// Running totals of the partial epoch: summed loss·examples, correct, seen.
    pub partial: (f64, usize, usize),
    /// The epochs completed so far.
    pub history: Vec<EpochRecord>,
    /// The precision trained in (a resumed run must keep it).
    #[serde(default = "crate::history::default_precision")]
    pub precision: String,
    /// The loss scaler's state (f16 training).
    #[serde(default)]
    pub loss_scale: Option<crate::LossScaler>,
}

impl Progress {
    /// Checks that the fields are in range and agree with each other (a
    /// tampered or corrupted checkpoint is refused, not trained on): a batch
    /// size of 1 to 2²⁴, one history record per completed epoch, a partial
    /// epoch no longer than `batch` full batches with at most as many
    /// correct answers as examples and a finite, non-negative loss sum, a
    /// finite positive learning rate, finite history numbers.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::invalid(format!("checkpoint progress: {what}")));
        if self.batch_size == 0 || self.batch_size > 1 << 24 {
            return bad(format!("batch size {} is out of range", self.batch_size));
        }
        if self.history.len() != self.epoch {
            return bad(format!(
                "it claims {} completed epochs but holds {} epoch records",
                self.epoch,
                self.history.len()
            ));
        }
        let (loss, correct, seen) = self.partial;
        let most = (self.batch as u128) * (self.batch_size as u128);
        if (seen as u128) > most || correct > seen || !loss.is_finite() || loss < 0.0 {
            return bad(format!(
                "the partial epoch ({seen} examples, {correct} correct, loss sum {loss}) does not fit {} batches of {}",
                self.batch, self.batch_size
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!(
                "learning rate {} is not a positive number",
                self.lr
            ));
        }
        kiln_nn::optim::check_steps(self.optimizer_step).or_else(|e| bad(e.to_string()))?;
        if let Some(r) = self.history.iter().find(|r| {
            !(r.loss.is_finite() && r.accuracy.is_finite() && (0.0..=1.0).contains(&r.accuracy))
        }) {
            return bad(format!(
                "epoch {} has loss {} and accuracy {}",
                r.epoch, r.loss, r.accuracy
            ));
        }
        Ok(())
    }
}

/// A checkpoint read back: the model (with its weights), the optimiser
/// state and the progress.
pub struct Restored<B: Backend> {
    /// The rebuilt model.
    pub model: Sequential<B>,
    /// The optimiser's state, to load into a fresh optimiser of its kind.
    pub optimizer: OptimizerState,
    /// Where the run stands.
    pub progress: Progress,
    /// The file it came from.
    pub path: PathBuf,
}

/// The file name of the checkpoint at `(epoch, batch)`; names sort in
/// training order.
pub fn file_name(epoch: usize, batch: usize) -> String {
    format!("{PREFIX}{epoch:06}-{batch:06}.safetensors")
}

/// Writes a checkpoint of `model` and `optimizer` at `progress` into `dir`
/// (atomically), then deletes all but the newest `keep` checkpoints there.
/// Returns the file written.
pub fn save<B: Backend>(
    dir: &Path,
    model: &Sequential<B>,
    optimizer: &dyn Optimizer<B>,
    backend: &B,
    progress: &Progress,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::io(
            format!("creating the checkpoint folder {}", dir.display()),
            e,
        )
    })?;
    let state = optimizer.state(backend)?;
    let extra_tensors: Vec<(String, Vec<usize>, HostData)> = state
        .slots
        .into_iter()
        .map(|(slot, pos, data)| (format!("optimizer.{slot}.{pos}"), vec![data.len()], data))
        .collect();
    let mut meta = HashMap::new();
    let json = serde_json::to_string(progress)
        .map_err(|e| Error::invalid(format!("serialising checkpoint progress: {e}")))?;
    meta.insert(PROGRESS_KEY.to_string(), json);
    let path = dir.join(file_name(progress.epoch, progress.batch));
    model_file::save_with(&path, model, &meta, &extra_tensors)?;
    prune(dir, keep)?;
    Ok(path)
}

/// The checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        Error::io(
            format!("reading the checkpoint folder {}", dir.display()),
            e,
        )
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    let files = list(dir)?;
    let excess = files.len().saturating_sub(keep.max(1));
    for old in &files[..excess] {
        std::fs::remove_file(old)
            .map_err(|e| Error::io(format!("removing old checkpoint {}", old.display()), e))?;
    }
    Ok(())
}

/// Reads a checkpoint: `path` is a checkpoint file, or a folder whose newest
/// checkpoint is taken.
pub fn load<B: Backend>(path: &Path, backend: &B) -> Result<Restored<B>> {
    let file = if path.is_dir() {
        list(path)?.pop().ok_or_else(|| {
            Error::invalid(format!(
                "{} holds no checkpoint ({PREFIX}*.safetensors); train with --checkpoint-every N first",
                path.display()
            ))
        })?
    } else {
        path.to_path_buf()
    };
    let bytes = kiln_core::files::read(&file, "checkpoint")?;
    from_bytes(&bytes, backend)
        .map(|(model, optimizer, progress)| Restored {
            model,
            optimizer,
            progress,
            path: file.clone(),
        })
        .map_err(|e| match e {
            Error::InvalidArgument(msg) => Error::Data {
                path: file.clone(),
                source: DataError::Invalid(msg),
            },
            other => other,
        })
}

/// The optimiser slots among a checkpoint's tensors (`optimizer.m.3`: slot
/// `m` of parameter 3), each f32, sorted by parameter then slot.
pub(crate) fn optimizer_slots(
    extra: Vec<(String, HostData)>,
) -> Result<Vec<(String, usize, HostData)>> {
    let mut slots = Vec::new();
    for (name, data) in extra {
        let rest = name.strip_prefix("optimizer.").unwrap_or(&name);
        let (slot, pos) = rest
            .rsplit_once('.')
            .and_then(|(s, p)| Some((s.to_string(), p.parse::<usize>().ok()?)))
            .ok_or_else(|| Error::invalid(format!("unexpected tensor `{name}` in checkpoint")))?;
        if data.dtype() != DType::F32 {
            return Err(Error::invalid(format!(
                "optimizer tensor `{name}` is not f32"
            )));
        }
        slots.push((slot, pos, data));
    }
    slots.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    Ok(slots)
}

/// Parses the bytes of a checkpoint file: the model, the optimiser state
/// and the progress, each checked (a truncated or corrupted file, a missing
/// or misshapen tensor, metadata that does not parse: each its own error).
pub fn from_bytes<B: Backend>(
    bytes: &[u8],
    backend: &B,
) -> Result<(Sequential<B>, OptimizerState, Progress)> {
    let loaded = model_file::from_bytes_with_extra(bytes, backend, "optimizer.")?;
    let json = loaded.metadata.get(PROGRESS_KEY).ok_or_else(|| {
        Error::invalid(format!(
            "no `{PROGRESS_KEY}` metadata: a model file, not a checkpoint (it has `{SPEC_KEY}` only)"
        ))
    })?;
    let progress: Progress = serde_json::from_str(json)
        .map_err(|e| Error::invalid(format!("checkpoint progress: {e}")))?;
    progress.validate()?;
    let slots = optimizer_slots(loaded.extra)?;
    let state = OptimizerState {
        kind: progress.optimizer.clone(),
        step: progress.optimizer_step,
        lr: progress.lr,
        slots,
    };
    let mut model = loaded.model;
    model.set_rng_positions(&progress.rng_positions)?;
    model.set_precision(progress.precision.parse()?);
    Ok((model, state, progress))
}
