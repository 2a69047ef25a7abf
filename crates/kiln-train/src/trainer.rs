//! `Trainer`: fit, evaluate and predict.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kiln_core::{no_grad, Backend, DType, Error, GradStore, HostData, Result, Tensor};
use kiln_data::{loader::assemble, Batch, DataLoader, Dataset};
use kiln_dist::overlap::GradientSync;
use kiln_dist::replicas;
use kiln_nn::{Loss, Optimizer, Sequential};

use crate::checkpoint::{self, Progress};
use crate::data_parallel::{shard_streams, streams_past, DataParallel};
use crate::progress::EpochProgress;
use crate::{ClassificationReport, EpochRecord, History, LossScaler, Verbosity};

/// Settings of [`Trainer::fit`].
#[derive(Clone, Debug)]
pub struct FitConfig {
    /// Number of passes over the training set.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Seeds the example order (the weights are seeded when the model is built).
    pub seed: u64,
    /// Shuffle every epoch.
    pub shuffle: bool,
    /// What to print.
    pub verbosity: Verbosity,
    /// The run's JSON-lines history: written afresh once the run's checks
    /// have passed (with a resumed checkpoint's epochs), then each epoch's
    /// record appended. A run refused before it trains leaves the file
    /// as it was.
    pub history_path: Option<PathBuf>,
    /// Random affine augmentation of the training images, if any.
    pub augment: Option<kiln_data::Augment>,
    /// Where and how often to write checkpoints, if at all.
    pub checkpoint: Option<CheckpointPolicy>,
    /// Set (by a signal handler) to stop. The flag is read before each
    /// layer of a step's forward pass, before each node of its backward
    /// pass and after its update: a step still computing is abandoned (its
    /// update never applied, its dropout draws given back), so a long step
    /// delays the stop by one op at most. A checkpoint of the last completed step
    /// is then written (if a policy is set) and `fit` returns
    /// [`Error::Interrupted`] naming it; resuming from it is exact.
    pub stop: Option<Arc<AtomicBool>>,
    /// The loss scaler f16 training starts with (ignored in f32 and bf16;
    /// a resumed run continues the checkpoint's).
    pub loss_scale: LossScaler,
    /// Called after every completed step (its update applied), before the
    /// stop flag is read: for callers that follow a run step by step, or
    /// stop it after a given step.
    pub on_step: Option<StepHook>,
    /// Called after each epoch with its record (validation included); a
    /// [`EpochControl::Stop`](crate::EpochControl::Stop) ends the run there, after the record and a
    /// checkpoint (if a policy is set) are written
    /// ([`crate::EarlyStopping`] is one).
    pub on_epoch: Option<crate::EpochHook>,
    /// The learning rate of every step, by its index from 0 across epochs
    /// (`None`: the optimiser's own, constant). Set before each step from
    /// the step's position, so a resumed run follows it exactly.
    pub lr_schedule: Option<kiln_nn::LrSchedule>,
    /// Data-parallel training with other processes (`None`: this process
    /// alone). Each global batch of `batch_size` is split among the ranks;
    /// a stop request is honoured at the end of the step on every rank
    /// together (not mid-step); rank 0 alone writes the history file and
    /// checkpoints.
    pub distributed: Option<DataParallel>,
}

/// A completed training step, as [`FitConfig::on_step`] sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepEnd {
    /// The epoch, from 1.
    pub epoch: usize,
    /// Steps of this epoch done, this one included.
    pub batch: usize,
    /// Steps in an epoch.
    pub batches: usize,
    /// This step's mean loss per example.
    pub loss: f64,
}

/// A function [`Trainer::fit`] calls after each step ([`FitConfig::on_step`]).
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use kiln_train::{FitConfig, StepHook};
///
/// // Stop a run after its tenth step (a checkpoint of it is written when
/// // a checkpoint policy is set).
/// let stop = Arc::new(AtomicBool::new(false));
/// let flag = Arc::clone(&stop);
/// let cfg = FitConfig {
///     stop: Some(stop),
///     on_step: Some(StepHook::new(move |s| {
///         if s.batch == 10 {
///             flag.store(true, Ordering::SeqCst);
///         }
///     })),
///     ..FitConfig::default()
/// };
/// # let _ = cfg;
/// ```
#[derive(Clone)]
pub struct StepHook(Arc<dyn Fn(&StepEnd) + Send + Sync>);

impl StepHook {
    /// Wraps `f`.
    pub fn new(f: impl Fn(&StepEnd) + Send + Sync + 'static) -> Self {
        StepHook(Arc::new(f))
    }
}

impl std::fmt::Debug for StepHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepHook(..)")
    }
}

/// Where an interrupted run stops: `batch` steps of `epoch` (of `batches`)
/// are done.
#[derive(Clone, Copy)]
struct Stop {
    epoch: usize,
    batch: usize,
    batches: usize,
}

/// Whether `cfg.stop` has been set.
fn stopping(cfg: &FitConfig) -> bool {
    cfg.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
}

/// The data parallelism of a run with more than one process.
fn parallel(cfg: &FitConfig) -> Option<&DataParallel> {
    cfg.distributed.as_ref().filter(|d| d.world() > 1)
}

/// Whether this process writes the run's files (rank 0, or alone).
fn writes_files(cfg: &FitConfig) -> bool {
    parallel(cfg).is_none_or(|d| d.rank() == 0)
}

/// When [`Trainer::fit`] writes checkpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// The folder they go to.
    pub dir: PathBuf,
    /// Every this many epochs (0: only when interrupted).
    pub every: usize,
    /// How many to keep (the newest).
    pub keep: usize,
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            epochs: 10,
            batch_size: 128,
            seed: 0,
            shuffle: true,
            verbosity: Verbosity::Auto,
            history_path: None,
            augment: None,
            checkpoint: None,
            stop: None,
            loss_scale: LossScaler::default(),
            on_step: None,
            on_epoch: None,
            lr_schedule: None,
            distributed: None,
        }
    }
}

impl FitConfig {
    /// Checks the numbers a run needs: at least one epoch, at least one
    /// example a step, and the LR schedule's own numbers. [`Trainer::fit`]
    /// calls it first; the C and Python bindings rely on it.
    ///
    /// ```
    /// use kiln_train::FitConfig;
    ///
    /// assert!(FitConfig::default().check().is_ok());
    /// let e = FitConfig { epochs: 0, ..FitConfig::default() }.check().unwrap_err();
    /// assert!(e.to_string().contains("epochs = 0"), "{e}");
    /// ```
    pub fn check(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(Error::invalid(format!(
                "epochs = {}, batch_size = {}: both must be at least 1",
                self.epochs, self.batch_size
            )));
        }
        if let Some(schedule) = &self.lr_schedule {
            schedule.check()?;
        }
        Ok(())
    }
}

/// Loss and accuracy over a dataset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean loss per example.
    pub loss: f64,
    /// Fraction of examples whose top class is the label.
    pub accuracy: f64,
    /// Number of examples.
    pub examples: usize,
}

/// Trains a [`Sequential`] model on a backend.
pub struct Trainer<B: Backend> {
    model: Sequential<B>,
    optimizer: Box<dyn Optimizer<B>>,
    loss: Loss,
    backend: B,
}

/// Running sums over an epoch or an evaluation.
#[derive(Default)]
struct Tally {
    loss: f64,
    correct: usize,
    seen: usize,
}

impl Tally {
    fn add(&mut self, batch_loss: f64, correct: usize, n: usize) {
        self.loss += batch_loss * n as f64;
        self.correct += correct;
        self.seen += n;
    }
    fn loss(&self) -> f64 {
        self.loss / self.seen.max(1) as f64
    }
    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.seen.max(1) as f64
    }
}

impl<B: Backend> Trainer<B> {
    /// A trainer for `model`, minimising `loss` with `optimizer`.
    pub fn new(
        model: Sequential<B>,
        optimizer: Box<dyn Optimizer<B>>,
        loss: Loss,
        backend: B,
    ) -> Self {
        Trainer {
            model,
            optimizer,
            loss,
            backend,
        }
    }

    /// A trainer that only evaluates, reports and predicts (`kiln eval`,
    /// `predict`, `serve`): cross-entropy, and an optimiser never stepped.
    pub fn for_inference(model: Sequential<B>, backend: B) -> Result<Self> {
        let optimizer: Box<dyn Optimizer<B>> = Box::new(kiln_nn::Adam::new(1e-3)?);
        Ok(Self::new(
            model,
            optimizer,
            Loss::CategoricalCrossEntropy,
            backend,
        ))
    }

    /// The trained model, the trainer given up (its optimiser state with it).
    pub fn into_model(self) -> Sequential<B> {
        self.model
    }

    /// The model.
    pub fn model(&self) -> &Sequential<B> {
        &self.model
    }

    /// The model, mutable.
    pub fn model_mut(&mut self) -> &mut Sequential<B> {
        &mut self.model
    }

    /// The optimiser.
    pub fn optimizer(&self) -> &dyn Optimizer<B> {
        self.optimizer.as_ref()
    }

    /// The optimiser, to change (its learning rate between `fit` calls).
    pub fn optimizer_mut(&mut self) -> &mut dyn Optimizer<B> {
        self.optimizer.as_mut()
    }

    /// Loads a checkpoint's optimiser state into this trainer's optimiser
    /// (same kind, shapes checked against the model's parameters).
    pub fn load_optimizer_state(&mut self, state: &kiln_nn::OptimizerState) -> Result<()> {
        self.optimizer.load_state(state, &self.model.params())
    }

    fn check_dataset(&self, ds: &Dataset) -> Result<()> {
        let want = self.model.input_shape();
        if ds.example_shape()[..] != want[..] {
            return Err(Error::shape(
                "fit",
                format!(
                    "dataset `{}` has examples of shape {:?}, model `{}` takes {:?}",
                    ds.name(),
                    ds.example_shape(),
                    self.model.name(),
                    want
                ),
            ));
        }
        let out = self.model.output_shape()?;
        if let Some(target) = ds.target_shape() {
            if self.loss != Loss::MeanSquaredError {
                return Err(Error::invalid(format!(
                    "dataset `{}` has value targets (regression): train with Loss::MeanSquaredError, not {:?}",
                    ds.name(),
                    self.loss
                )));
            }
            if out != target {
                return Err(Error::shape(
                    "fit",
                    format!(
                        "model outputs {out:?} but dataset `{}` has targets of shape {target:?}",
                        ds.name()
                    ),
                ));
            }
            return Ok(());
        }
        if out != [ds.classes()] {
            return Err(Error::shape(
                "fit",
                format!(
                    "model outputs {out:?} but dataset `{}` has {} classes",
                    ds.name(),
                    ds.classes()
                ),
            ));
        }
        Ok(())
    }

    /// Uploads a batch: examples `[n, …input]` and targets (u32 labels
    /// for cross-entropy; for MSE a regression set's values, else one-hot
    /// f32 labels).
    fn upload(&self, batch: Batch) -> Result<(Tensor<B>, Tensor<B>, Vec<u32>)> {
        let Batch {
            images,
            labels,
            targets,
            len: n,
        } = batch;
        let mut dims = vec![n];
        dims.extend_from_slice(self.model.input_shape());
        let x = Tensor::from_host(HostData::F32(images), &dims, &self.backend)?;
        let y = match self.loss {
            Loss::MeanSquaredError if !targets.is_empty() => {
                let mut dims = vec![n];
                dims.extend(self.model.output_shape()?);
                Tensor::from_host(HostData::F32(targets), &dims, &self.backend)?
            }
            Loss::CategoricalCrossEntropy => {
                Tensor::from_host(HostData::U32(labels.clone()), &[n], &self.backend)?
            }
            Loss::MeanSquaredError => {
                let classes = self.model.output_shape()?.iter().product::<usize>();
                let mut onehot = vec![0f32; n * classes];
                for (i, &l) in labels.iter().enumerate() {
                    onehot[i * classes + l as usize] = 1.0;
                }
                Tensor::from_host(HostData::F32(onehot), &[n, classes], &self.backend)?
            }
        };
        Ok((x, y, labels))
    }

    /// The model's outputs for the loss, in f32 whatever the model computes
    /// in (the loss and its softmax run in f32).
    fn outputs(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let out = self.outputs_until(x, || false)?;
        Ok(out.expect("a forward pass with no stop condition completes"))
    }

    /// [`Trainer::outputs`], abandoned between layers when `stop` says so.
    fn outputs_until(&self, x: &Tensor<B>, stop: impl Fn() -> bool) -> Result<Option<Tensor<B>>> {
        let out = if self.loss.wants_logits() {
            self.model.forward_logits_until(x, stop)?
        } else {
            self.model.forward_until(x, stop)?
        };
        out.map(|o| o.cast(DType::F32)).transpose()
    }

    fn correct(out: &Tensor<B>, labels: &[u32]) -> Result<usize> {
        if labels.is_empty() {
            // A regression set: no classes to be right about.
            return Ok(0);
        }
        let pred = no_grad(|| out.argmax())?.to_vec_u32()?;
        Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count())
    }

    /// Trains for `cfg.epochs` epochs; evaluates on `validation` after each
    /// epoch if given. Returns the history (also appended to
    /// `cfg.history_path` as each epoch ends).
    pub fn fit(
        &mut self,
        train: &Dataset,
        validation: Option<&Dataset>,
        cfg: &FitConfig,
    ) -> Result<History> {
        self.run(train, validation, cfg, None)
    }

    /// Continues the run a checkpoint saved (its model and optimiser state
    /// already loaded into this trainer): the same data order, augmentation
    /// and dropout draws as if it had never stopped, so the weights and the
    /// history's losses and accuracies come out bit for bit those of an
    /// uninterrupted run. `cfg` must keep the checkpoint's seed, batch size
    /// and augmentation; the dataset must be the same (its fingerprint is
    /// checked). Returns the whole history, the checkpoint's epochs first.
    pub fn resume(
        &mut self,
        train: &Dataset,
        validation: Option<&Dataset>,
        cfg: &FitConfig,
        progress: &Progress,
    ) -> Result<History> {
        let mismatch = |what: &str, was: String, now: String| {
            Error::invalid(format!(
                "cannot resume: the checkpoint was trained with {what} {was}, this run has {now}"
            ))
        };
        if progress.seed != cfg.seed {
            return Err(mismatch(
                "seed",
                progress.seed.to_string(),
                cfg.seed.to_string(),
            ));
        }
        if progress.batch_size != cfg.batch_size {
            return Err(mismatch(
                "batch size",
                progress.batch_size.to_string(),
                cfg.batch_size.to_string(),
            ));
        }
        if progress.augment != cfg.augment.is_some() {
            return Err(mismatch(
                "augmentation",
                progress.augment.to_string(),
                cfg.augment.is_some().to_string(),
            ));
        }
        let precision = self.model.precision().name();
        if progress.precision != precision {
            return Err(mismatch(
                "precision",
                progress.precision.clone(),
                precision.to_string(),
            ));
        }
        let fingerprint = train.fingerprint();
        if progress.dataset_fingerprint != fingerprint {
            return Err(Error::invalid(format!(
                "cannot resume: the checkpoint was trained on `{}` ({}), this is `{}` ({fingerprint}) \
                 with {} examples: give the run's --dataset, --data and --limit",
                progress.dataset,
                progress.dataset_fingerprint,
                train.name(),
                train.len()
            )));
        }
        if cfg.epochs <= progress.epoch {
            return Err(Error::invalid(format!(
                "nothing to resume: the checkpoint has trained {} epochs and the run asks for {} in all \
                 (the epoch count is the whole run's: ask for more than {})",
                progress.epoch, cfg.epochs, progress.epoch
            )));
        }
        let batches = train.len().div_ceil(cfg.batch_size.max(1));
        if progress.batch >= batches {
            return Err(Error::invalid(format!(
                "cannot resume: the checkpoint is at batch {} of an epoch of {batches}",
                progress.batch
            )));
        }
        self.run(train, validation, cfg, Some(progress))
    }

    /// A checkpoint of the run at `(epoch, batch)`.
    #[allow(clippy::too_many_arguments)]
    fn checkpoint(
        &self,
        policy: &CheckpointPolicy,
        train: &Dataset,
        cfg: &FitConfig,
        epoch: usize,
        batch: usize,
        tally: &Tally,
        history: &History,
        scaler: Option<LossScaler>,
    ) -> Result<PathBuf> {
        let state = self.optimizer.state(&self.backend)?;
        let progress = Progress {
            epoch,
            batch,
            seed: cfg.seed,
            batch_size: cfg.batch_size,
            dataset: train.name().to_string(),
            dataset_fingerprint: train.fingerprint(),
            augment: cfg.augment.is_some(),
            optimizer: state.kind,
            optimizer_step: state.step,
            lr: state.lr,
            rng_positions: self.model.rng_positions(),
            partial: (tally.loss, tally.correct, tally.seen),
            history: history.epochs.clone(),
            precision: self.model.precision().name().to_string(),
            loss_scale: scaler,
        };
        checkpoint::save(
            &policy.dir,
            &self.model,
            self.optimizer.as_ref(),
            &self.backend,
            &progress,
            policy.keep,
        )
    }

    /// Stops a run at `stop`: saves a checkpoint there (if a policy is
    /// set) and returns the [`Error::Interrupted`] that says how to go on.
    #[allow(clippy::too_many_arguments)]
    fn interrupted(
        &mut self,
        stop: Stop,
        train: &Dataset,
        cfg: &FitConfig,
        tally: &Tally,
        history: &History,
        scaler: Option<LossScaler>,
    ) -> Result<Error> {
        self.model.set_training(false);
        let Stop {
            epoch,
            batch,
            batches,
        } = stop;
        let what = match &cfg.checkpoint {
            Some(policy) if !writes_files(cfg) => format!(
                "rank 0 writes the checkpoint to {} (epoch {epoch}, batch {batch} of {batches})",
                policy.dir.display()
            ),
            Some(policy) => {
                let at =
                    self.checkpoint(policy, train, cfg, epoch - 1, batch, tally, history, scaler)?;
                format!(
                    "checkpoint written to {} (epoch {epoch}, batch {batch} of {batches}); continue with --resume {} --epochs {}",
                    at.display(),
                    policy.dir.display(),
                    cfg.epochs
                )
            }
            None => "no checkpoint folder was set, nothing saved".to_string(),
        };
        Ok(Error::Interrupted(what))
    }

    fn run(
        &mut self,
        train: &Dataset,
        validation: Option<&Dataset>,
        cfg: &FitConfig,
        from: Option<&Progress>,
    ) -> Result<History> {
        let out = self.run_epochs(train, validation, cfg, from);
        // In inference mode however the run ended: an error mid-epoch left
        // dropout on for the next evaluate or predict.
        self.model.set_training(false);
        out
    }

    /// [`Trainer::run`]'s epochs.
    fn run_epochs(
        &mut self,
        train: &Dataset,
        validation: Option<&Dataset>,
        cfg: &FitConfig,
        from: Option<&Progress>,
    ) -> Result<History> {
        self.check_dataset(train)?;
        if let Some(v) = validation {
            self.check_dataset(v)?;
        }
        if train.is_empty() {
            return Err(Error::invalid(format!(
                "the training set `{}` has no examples: nothing to train on",
                train.name()
            )));
        }
        cfg.check()?;
        if cfg.augment.is_some() && train.example_shape().len() != 3 {
            return Err(Error::invalid(format!(
                "augmentation warps images of [channels, height, width]; dataset `{}` has examples of shape {:?}",
                train.name(),
                train.example_shape()
            )));
        }
        // Planned from the spec before the first batch is allocated.
        self.model.spec().memory(cfg.batch_size)?.check(
            self.model.name(),
            cfg.batch_size,
            kiln_nn::memory_limit()?,
        )?;
        // Batches are assembled in the waits of the backend's threads where
        // it lends them (a thread of the loader's own took a core from them
        // mid-op: the seed MLP's epoch on 2 cores, 0.0696 → 0.0619 s).
        let mut loader = DataLoader::new(Arc::new(train.clone()), cfg.batch_size)
            .on_idle_threads_of(&self.backend);
        if cfg.shuffle {
            loader = loader.shuffle(cfg.seed);
        }
        if let Some(a) = cfg.augment {
            loader = loader.augment(a);
        }
        let mut history = History {
            epochs: from.map(|p| p.history.clone()).unwrap_or_default(),
        };
        if let Some(p) = cfg.history_path.as_ref().filter(|_| writes_files(cfg)) {
            crate::history::write_records(p, &history.epochs)?;
        }
        let first = from.map_or(1, |p| p.epoch + 1);
        // f16 gradients need the loss scaled; the scaler continues from a
        // checkpoint's state.
        let mut scaler = self
            .model
            .precision()
            .needs_loss_scaling()
            .then(|| from.and_then(|p| p.loss_scale).unwrap_or(cfg.loss_scale));
        let meter = crate::observe::EnergyMeter::new();
        let dp = parallel(cfg);
        if let Some(d) = dp {
            let settings = format!(
                "dataset {} ({} examples, fingerprint {}), model {}, batch {}, seed {}, epochs {}, \
                 shuffle {}, augment {}, precision {}, optimiser {}, from {}, model seed {}",
                train.name(),
                train.len(),
                train.fingerprint(),
                self.model.name(),
                cfg.batch_size,
                cfg.seed,
                cfg.epochs,
                cfg.shuffle,
                cfg.augment.is_some(),
                self.model.precision().name(),
                self.optimizer.describe(),
                from.map_or("the start".to_string(), |p| format!(
                    "epoch {} batch {}",
                    p.epoch + 1,
                    p.batch
                )),
                self.model.seed()
            );
            d.start(&mut self.model, cfg.batch_size, &settings)?;
        }
        // Each stream's draws per example, to place the ranks' shards.
        let draws = dp
            .map(|_| self.model.rng_draws_per_example())
            .transpose()?
            .unwrap_or_default();
        // Rank 0 speaks for a distributed run.
        let verbosity = if writes_files(cfg) {
            cfg.verbosity
        } else {
            Verbosity::Silent
        };
        // The next epoch's batches, opened at this one's last step: its
        // first batches are built in the waits of that step (and of the
        // validation after it) instead of by the next epoch's first step,
        // which found them unbuilt — the seed MLP's second epoch waited
        // 4.8–5.1 ms for its first batch, a fresh allocation faulted in.
        let mut opened: Option<kiln_data::Batches> = None;
        for epoch in first..=cfg.epochs {
            let progress = EpochProgress::start(verbosity, epoch, cfg.epochs, loader.batches());
            let start = Instant::now();
            let mut comm_seconds = 0.0;
            let energy_start = meter.as_ref().and_then(|m| m.read());
            let mut tally = Tally::default();
            // A checkpoint taken mid-epoch resumes after its last batch.
            let skip = match from {
                Some(p) if p.epoch + 1 == epoch => {
                    (tally.loss, tally.correct, tally.seen) = p.partial;
                    p.batch
                }
                _ => 0,
            };
            if skip == 0 {
                if let Some(s) = scaler.as_mut() {
                    s.start_epoch();
                }
            }
            self.model.set_training(true);
            let batches = match opened.take() {
                Some(batches) if skip == 0 => batches,
                _ => loader.epoch_from(epoch as u64 - 1, skip),
            };
            for (done, batch) in batches.enumerate() {
                let done = skip + done + 1;
                if done == loader.batches() && epoch < cfg.epochs {
                    opened = Some(loader.epoch(epoch as u64));
                }
                let n = batch.len;
                // Where dropout's streams stand before this step, to give
                // its draws back if the step is abandoned.
                let rng_before = self.model.rng_positions();
                let abandon = |trainer: &mut Self| -> Result<Error> {
                    trainer.model.set_rng_positions(&rng_before)?;
                    let stop = Stop {
                        epoch,
                        batch: done - 1,
                        batches: loader.batches(),
                    };
                    trainer.interrupted(stop, train, cfg, &tally, &history, scaler)
                };
                // A distributed run's ranks each take a shard of the batch.
                let (batch, local) = match dp {
                    Some(d) => {
                        let rows = replicas::shard(n, d.rank(), d.world());
                        shard_streams(&self.model, &rng_before, &draws, 0, rows.start)?;
                        (batch.rows(rows.clone()), rows.len())
                    }
                    None => (batch, n),
                };
                // The step is abandoned, before its update, at the first
                // layer or graph node that finds the stop flag up; the ranks
                // of a distributed run stop together at the step's end.
                let stop_mid = || dp.is_none() && stopping(cfg);
                // Gradients go to the other ranks as the pass finishes them.
                let mut sync = dp.and_then(|d| d.sync(&self.model, local, n));
                let deliver = |sync: &mut Option<GradientSync<'_, B>>, id, g: &Tensor<B>| {
                    sync.as_mut().map_or(Ok(()), |s| s.deliver(id, g))
                };
                let (mut grads, local_loss, local_correct) = if local == 0 {
                    // An empty shard (a last batch smaller than the world).
                    (GradStore::default(), 0.0, 0)
                } else {
                    let (x, y, labels) = self.upload(batch)?;
                    let Some(out) = self.outputs_until(&x, stop_mid)? else {
                        return Err(abandon(self)?);
                    };
                    let loss = self.loss.compute(&out, &y)?;
                    let grads = match &scaler {
                        Some(s) => loss
                            .affine(s.scale, 0.0)?
                            .backward_with(stop_mid, |id, g| deliver(&mut sync, id, g))?,
                        None => loss.backward_with(stop_mid, |id, g| deliver(&mut sync, id, g))?,
                    };
                    let Some(grads) = grads else {
                        return Err(abandon(self)?);
                    };
                    let local_loss = f64::from(loss.to_scalar_f32()?);
                    // The graph is released at the end of this block, so
                    // parameters are updated in place, not copied.
                    (grads, local_loss, Self::correct(&out, &labels)?)
                };
                let mut step_stop = false;
                if let Some(d) = dp {
                    // Before any other collective: an overlapped step's
                    // reductions are still being made on the comm thread.
                    comm_seconds += d.finish(sync, &self.model, &mut grads, local, n)?;
                }
                let (batch_loss, correct) = match dp {
                    Some(d) => {
                        let at = Instant::now();
                        let t = d.totals(local_loss, local_correct, local, stopping(cfg))?;
                        comm_seconds += at.elapsed().as_secs_f64();
                        step_stop = t.stop;
                        if t.examples != n {
                            return Err(Error::invalid(format!(
                                "epoch {epoch}, step {done}: the ranks' batches hold {} examples together, \
                                 this rank's {n}: every rank must load the same dataset with the same \
                                 --batch-size, --seed and --limit",
                                t.examples
                            )));
                        }
                        (t.loss, t.correct)
                    }
                    None => (local_loss, local_correct),
                };
                if !batch_loss.is_finite() {
                    return Err(Error::invalid(format!(
                        "epoch {epoch}: the loss became {batch_loss}; lower the learning rate (now {})",
                        kiln_core::Number(self.optimizer.lr())
                    )));
                }
                let apply = match scaler.as_mut() {
                    Some(s) => {
                        let finite = grads.all_finite()?;
                        if finite {
                            grads.scale(1.0 / s.scale)?;
                        }
                        s.update(finite)?
                    }
                    None => true,
                };
                if apply {
                    if let Some(schedule) = &cfg.lr_schedule {
                        let step = (epoch - 1) * loader.batches() + done - 1;
                        self.optimizer.set_lr(schedule.at(step as u64));
                    }
                    self.optimizer.step(&mut self.model.params_mut(), &grads)?;
                }
                if let Some(d) = dp {
                    streams_past(&self.model, &rng_before, &draws, n)?;
                    d.after_step(&self.model, ((epoch - 1) * loader.batches() + done) as u64)?;
                }
                tally.add(batch_loss, correct, n);
                progress.update(
                    tally.loss(),
                    tally.accuracy(),
                    tally.seen as f64 / start.elapsed().as_secs_f64(),
                );
                if let Some(hook) = &cfg.on_step {
                    (hook.0)(&StepEnd {
                        epoch,
                        batch: done,
                        batches: loader.batches(),
                        loss: batch_loss,
                    });
                }
                if step_stop || (dp.is_none() && stopping(cfg)) {
                    let stop = Stop {
                        epoch,
                        batch: done,
                        batches: loader.batches(),
                    };
                    return Err(self.interrupted(stop, train, cfg, &tally, &history, scaler)?);
                }
            }
            self.model.set_training(false);
            self.backend.synchronize()?;
            let seconds = start.elapsed().as_secs_f64();
            let energy_joules = meter
                .as_ref()
                .zip(energy_start)
                .and_then(|(m, from)| m.read().map(|to| m.joules(&from, &to)));
            // Shared among the ranks of a distributed run.
            let val = validation
                .map(|v| self.evaluate_shared(v, cfg.batch_size.max(256), dp))
                .transpose()?;
            let record = EpochRecord {
                epoch,
                loss: tally.loss(),
                accuracy: tally.accuracy(),
                val_loss: val.map(|v| v.loss),
                val_accuracy: val.map(|v| v.accuracy),
                lr: f64::from(self.optimizer.lr()),
                seconds,
                images_per_sec: tally.seen as f64 / seconds.max(1e-9),
                peak_rss_bytes: crate::observe::peak_rss_bytes(),
                energy_joules,
                precision: self.model.precision().name().to_string(),
                loss_scale: scaler.map(|s| f64::from(s.scale)),
                skipped_steps: scaler.map(|s| s.skipped_this_epoch),
                processes: dp.map(DataParallel::world),
                comm_seconds: dp.map(|_| comm_seconds),
            };
            progress.finish(&record);
            if let Some(p) = cfg.history_path.as_ref().filter(|_| writes_files(cfg)) {
                History::append_jsonl(p, &record)?;
            }
            let control = cfg
                .on_epoch
                .as_ref()
                .map_or(crate::EpochControl::Continue, |h| h.call(&record));
            let last = epoch == cfg.epochs || control == crate::EpochControl::Stop;
            history.epochs.push(record);
            let policy = cfg.checkpoint.as_ref().filter(|_| writes_files(cfg));
            if let Some(policy) = policy.filter(|p| p.every > 0) {
                if epoch % policy.every == 0 || last {
                    self.checkpoint(
                        policy,
                        train,
                        cfg,
                        epoch,
                        0,
                        &Tally::default(),
                        &history,
                        scaler,
                    )?;
                }
            }
            if control == crate::EpochControl::Stop {
                break;
            }
        }
        Ok(history)
    }

    /// Mean loss and accuracy over `ds`, without recording any graph.
    pub fn evaluate(&self, ds: &Dataset, batch_size: usize) -> Result<Evaluation> {
        if batch_size == 0 {
            return Err(Error::invalid(
                "batch size 0: evaluate at least one example per pass",
            ));
        }
        let tally = self.tally(ds, 0..ds.len(), batch_size)?;
        Ok(Evaluation {
            loss: tally.loss(),
            accuracy: tally.accuracy(),
            examples: tally.seen,
        })
    }

    /// Loss and correct predictions over examples `rows` of `ds`.
    fn tally(
        &self,
        ds: &Dataset,
        rows: std::ops::Range<usize>,
        batch_size: usize,
    ) -> Result<Tally> {
        self.check_dataset(ds)?;
        // Evaluation runs the model as inference does: no dropout.
        self.model.set_training(false);
        let _g = kiln_core::NoGradGuard::new();
        let order: Vec<u32> = (rows.start as u32..rows.end as u32).collect();
        let mut tally = Tally::default();
        for chunk in order.chunks(batch_size.max(1)) {
            let b = assemble(ds, chunk);
            let len = b.len;
            let (x, y, labels) = self.upload(b)?;
            let out = self.outputs(&x)?;
            let loss = f64::from(self.loss.compute(&out, &y)?.to_scalar_f32()?);
            tally.add(loss, Self::correct(&out, &labels)?, len);
        }
        Ok(tally)
    }

    /// [`Trainer::evaluate`], shared among the ranks of `dp` when given:
    /// each evaluates its shard of `ds`, and the totals are added.
    fn evaluate_shared(
        &self,
        ds: &Dataset,
        batch_size: usize,
        dp: Option<&DataParallel>,
    ) -> Result<Evaluation> {
        let Some(d) = dp else {
            return self.evaluate(ds, batch_size);
        };
        let part = self.tally(
            ds,
            replicas::shard(ds.len(), d.rank(), d.world()),
            batch_size,
        )?;
        let t = d.totals(part.loss(), part.correct, part.seen, false)?;
        Ok(Evaluation {
            loss: t.loss,
            accuracy: t.correct as f64 / t.examples.max(1) as f64,
            examples: t.examples,
        })
    }

    /// A classification report over `ds`: accuracy, top-`ks` accuracy,
    /// per-class precision / recall / F1 and the confusion matrix, without
    /// recording any graph. The first batch is also run once untimed, before
    /// the timed passes ([`ClassificationReport::forward_seconds`]).
    pub fn report(
        &self,
        ds: &Dataset,
        batch_size: usize,
        ks: &[usize],
    ) -> Result<ClassificationReport> {
        self.check_dataset(ds)?;
        if ds.target_shape().is_some() {
            return Err(Error::invalid(format!(
                "dataset `{}` has value targets: a classification report needs class labels (use evaluate for its loss)",
                ds.name()
            )));
        }
        self.model.set_training(false);
        let _g = kiln_core::NoGradGuard::new();
        let mut report = ClassificationReport::new(ds.name(), ds.class_names(), ks);
        let order: Vec<u32> = (0..ds.len() as u32).collect();
        for (i, chunk) in order.chunks(batch_size.max(1)).enumerate() {
            let (x, y, labels) = self.upload(assemble(ds, chunk))?;
            // The images in the type the model computes in, before the
            // timer: as a benchmark hands a bf16 model bf16 inputs.
            let x = match self.model.takes_tokens() {
                true => x,
                false => {
                    kiln_nn::precision::to_compute(&x, self.model.precision().compute_dtype())?
                }
            };
            if i == 0 {
                // One untimed pass first, as benchmarks warm up: a process's
                // first pass also faults in its buffers and wakes the thread
                // team (the seed MLP's first batch of 1,000 took 0.7–1.6 ms
                // on the 2-core Xeon, the next ones 0.3 ms — a third of the
                // forward time of a 10-batch test set).
                let start = std::time::Instant::now();
                self.outputs(&x)?;
                self.backend.synchronize()?;
                report.warmup_seconds = start.elapsed().as_secs_f64();
            }
            self.backend.synchronize()?;
            let start = std::time::Instant::now();
            let out = self.outputs(&x)?;
            self.backend.synchronize()?;
            report.forward_seconds += start.elapsed().as_secs_f64();
            let loss = f64::from(self.loss.compute(&out, &y)?.to_scalar_f32()?);
            report.add(&out.to_vec_f32()?, &labels, loss);
        }
        report.finish();
        Ok(report)
    }

    /// Class probabilities `[n, classes]` for `n` examples of pixels in
    /// `[0, 1]` ([`Sequential::predict`]).
    pub fn predict(&self, images: &[f32], n: usize) -> Result<Tensor<B>> {
        let mut dims = vec![n];
        dims.extend_from_slice(self.model.input_shape());
        let x = Tensor::from_host(HostData::F32(images.to_vec()), &dims, &self.backend)?;
        self.model.predict(&x)
    }
}
