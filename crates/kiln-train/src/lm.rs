//! Training language models: iteration-based runs over a [`TextCorpus`]
//! with periodic evaluation, AdamW, clipping, a learning-rate schedule and
//! gradient accumulation, checkpoints that resume bit for bit.
//!
//! A run is a function of its settings: batch `i` of the training split is
//! drawn from the Philox stream of `(seed, i)` ([`TextCorpus::batch`]), the
//! rate of step `i` is the schedule's, and a checkpoint stores the weights,
//! the optimiser's moments, the dropout streams' positions and the history.
//!
//! ```
//! use kiln_cpu::CpuBackend;
//! use kiln_data::TextCorpus;
//! use kiln_nn::{Adam, GptConfig, Sequential};
//! use kiln_train::{LmFitConfig, LmTrainer, Verbosity};
//!
//! // A tiny GPT on a tiny corpus, for a few steps: the loop, not the prose.
//! let corpus = TextCorpus::from_text("abc", &"abcabcabd".repeat(20))?;
//! let b = CpuBackend::reference();
//! let cfg = GptConfig { n_layer: 1, n_head: 1, n_embd: 8, block_size: 8, ..GptConfig::char_small() };
//! let model = Sequential::from_spec(&cfg.spec(corpus.vocab().len())?, 1, &b)?;
//! let mut t = LmTrainer::new(model, Adam::new(1e-2)?, corpus.vocab().clone(), b)?;
//! let fit = LmFitConfig { iters: 20, batch_size: 4, eval_every: 10, eval_iters: 2, verbosity: Verbosity::Silent, ..LmFitConfig::default() };
//! let records = t.fit(&corpus, &fit)?;
//! assert_eq!(records.last().map(|r| r.iter), Some(20));
//! assert!(records[1].val_loss < records[0].val_loss + 0.5);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kiln_core::{no_grad, Backend, DType, DataError, Error, GradStore, HostData, Result, Tensor};
use kiln_data::text::{TextCorpus, TextSplit, Vocab};
use kiln_nn::{
    clip_grad_norm, Adam, AdamSettings, LrSchedule, Optimizer, OptimizerState, Precision,
    Sequential,
};
use serde::{Deserialize, Serialize};

use crate::data_parallel::{shard_streams, streams_past};
use crate::model_file::{self, SPEC_KEY};
use crate::observe::peak_rss_bytes;
use crate::Verbosity;
use kiln_dist::replicas;

/// The metadata key holding an LM checkpoint's [`LmProgress`] (JSON).
pub const LM_PROGRESS_KEY: &str = "kiln.lm_checkpoint";
/// The metadata key holding a language model's vocabulary (a JSON string
/// of its characters in token order), in model files and checkpoints.
pub const VOCAB_KEY: &str = "kiln.vocab";

/// Settings of [`LmTrainer::fit`].
#[derive(Clone, Debug)]
pub struct LmFitConfig {
    /// Optimiser steps in the whole run.
    pub iters: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed into one step (1: none).
    pub accumulate: usize,
    /// Seeds the batches (the weights are seeded when the model is built).
    pub seed: u64,
    /// Evaluate every this many steps (and after the last).
    pub eval_every: u64,
    /// Batches per evaluation, on each split.
    pub eval_iters: u64,
    /// The learning rate of each step.
    pub schedule: LrSchedule,
    /// Clip gradients to this global norm (`None`: no clipping).
    pub grad_clip: Option<f32>,
    /// What to print.
    pub verbosity: Verbosity,
    /// The run's JSON-lines history: written afresh once the run's checks
    /// have passed (with a resumed checkpoint's evaluations), then each
    /// evaluation's record appended. A run refused before it trains
    /// leaves the file as it was.
    pub history_path: Option<PathBuf>,
    /// Where checkpoints go and every how many steps (0: only when stopped).
    pub checkpoint: Option<LmCheckpointPolicy>,
    /// Set (by a signal handler) to stop: the step in flight is abandoned
    /// between ops, a checkpoint of the last completed step written (with
    /// a policy) and [`Error::Interrupted`] returned.
    pub stop: Option<Arc<AtomicBool>>,
    /// Data-parallel training with other processes (`None`: this process
    /// alone): each rank takes a contiguous shard of every micro-batch's
    /// sequences; gradients are averaged before clipping; a stop request
    /// ends every rank after the same step; rank 0 alone writes the
    /// history and checkpoints.
    pub distributed: Option<crate::DataParallel>,
}

impl Default for LmFitConfig {
    fn default() -> Self {
        LmFitConfig {
            iters: 2000,
            batch_size: 12,
            accumulate: 1,
            seed: 1337,
            eval_every: 250,
            eval_iters: 20,
            schedule: LrSchedule::WarmupCosine {
                peak: 1e-3,
                min: 1e-4,
                warmup: 100,
                decay: 2000,
            },
            grad_clip: Some(1.0),
            verbosity: Verbosity::Auto,
            history_path: None,
            checkpoint: None,
            stop: None,
            distributed: None,
        }
    }
}

impl LmFitConfig {
    /// Checks the numbers, with errors that say what to change.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(m));
        if self.iters == 0 || self.iters > 1 << 40 {
            return bad(format!("--iters {} must be 1 to 2⁴⁰", self.iters));
        }
        if self.batch_size == 0 || self.batch_size > 1 << 16 {
            return bad(format!(
                "--batch-size {} must be 1 to 65536",
                self.batch_size
            ));
        }
        if self.accumulate == 0 || self.accumulate > 1 << 12 {
            return bad(format!(
                "--accumulate {} must be 1 to 4096",
                self.accumulate
            ));
        }
        if self.eval_every == 0 {
            return bad("--eval-every must be at least 1".into());
        }
        if self.eval_iters == 0 || self.eval_iters > 1 << 20 {
            return bad(format!("--eval-iters {} must be 1 to 2²⁰", self.eval_iters));
        }
        if let Some(c) = self.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!(
                    "--grad-clip {} must be finite and positive",
                    kiln_core::Number(c)
                ));
            }
        }
        self.schedule.check()
    }
}

/// When [`LmTrainer::fit`] writes checkpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LmCheckpointPolicy {
    /// The folder they go to.
    pub dir: PathBuf,
    /// Every this many steps (0: only when interrupted).
    pub every: u64,
    /// How many to keep (the newest).
    pub keep: usize,
}

/// One evaluation of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LmRecord {
    /// Steps completed.
    pub iter: u64,
    /// Mean loss (nats per token) on `eval_iters` training batches.
    pub train_loss: f64,
    /// Mean loss on `eval_iters` validation batches.
    pub val_loss: f64,
    /// Mean loss of the steps since the previous evaluation.
    pub step_loss: f64,
    /// The learning rate of the last step.
    pub lr: f64,
    /// Training seconds since the previous evaluation (evaluation excluded).
    pub seconds: f64,
    /// Steps per second over those seconds.
    pub iters_per_sec: f64,
    /// Training tokens per second over those seconds.
    pub tokens_per_sec: f64,
    /// The process's peak resident memory, in bytes.
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
    /// The precision trained in.
    pub precision: String,
    /// The processes a data-parallel run trained on (absent when alone).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub processes: Option<usize>,
    /// Seconds of those steps this rank spent exchanging gradients and step
    /// totals with the others (data-parallel runs only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub comm_seconds: Option<f64>,
}

/// Where an LM run stands, and what it must match to continue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LmProgress {
    /// Steps completed.
    pub iter: u64,
    /// The run's length.
    pub iters: u64,
    /// The batch seed.
    pub seed: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per step.
    pub accumulate: usize,
    /// The corpus' name.
    pub dataset: String,
    /// The corpus' fingerprint.
    pub dataset_fingerprint: String,
    /// The optimiser's kind.
    pub optimizer: String,
    /// Optimiser steps taken.
    pub optimizer_step: u64,
    /// The last learning rate.
    pub lr: f32,
    /// Positions of the model's dropout streams.
    pub rng_positions: Vec<u64>,
    /// Sum and count of the step losses since the last evaluation.
    pub partial: (f64, u64),
    /// The evaluations so far.
    pub history: Vec<LmRecord>,
    /// The precision trained in.
    pub precision: String,
    /// What shapes every update: the schedule, AdamW's settings and the
    /// clipping norm (`None` in checkpoints written before they were
    /// recorded; a resume of one takes the settings it is given).
    #[serde(default)]
    pub update: Option<LmUpdate>,
}

/// The settings that shape an LM run's every update, recorded in its
/// checkpoints: a resume with others would not continue the run (a
/// different `--lr` moves the whole schedule).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LmUpdate {
    /// The learning-rate schedule.
    pub schedule: LrSchedule,
    /// The optimiser's settings besides its rate.
    pub adam: AdamSettings,
    /// Gradient clipping by global norm.
    pub grad_clip: Option<f32>,
}

impl LmProgress {
    /// Checks that the fields are in range and agree (a tampered or
    /// corrupted checkpoint is refused, not trained on).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("checkpoint progress: {m}")));
        if self.iter > self.iters || self.batch_size == 0 || self.accumulate == 0 {
            return bad(format!(
                "step {} of {}, batch {} × {}",
                self.iter, self.iters, self.batch_size, self.accumulate
            ));
        }
        let (sum, n) = self.partial;
        if !sum.is_finite() || sum < 0.0 || n > self.iter {
            return bad(format!("a partial loss sum of {sum} over {n} steps"));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("learning rate {}", self.lr));
        }
        kiln_nn::optim::check_steps(self.optimizer_step).or_else(|e| bad(e.to_string()))?;
        // One optimiser step per step of the run (micro-batches summed).
        if self.optimizer_step != self.iter {
            return bad(format!(
                "optimizer step {} at step {} (they move together)",
                self.optimizer_step, self.iter
            ));
        }
        if let Some(u) = &self.update {
            u.schedule.check().or_else(|e| bad(e.to_string()))?;
            let a = u.adam;
            if !((0.0..1.0).contains(&a.beta1)
                && (0.0..1.0).contains(&a.beta2)
                && a.eps.is_finite()
                && a.eps > 0.0
                && a.weight_decay.is_finite()
                && a.weight_decay >= 0.0
                && u.grad_clip.is_none_or(|c| c.is_finite() && c > 0.0))
            {
                return bad(format!("update settings {u:?}"));
            }
        }
        if self
            .history
            .iter()
            .any(|r| !(r.train_loss.is_finite() && r.val_loss.is_finite()) || r.iter > self.iter)
        {
            return bad("a history record out of range".into());
        }
        Ok(())
    }
}

/// Trains a token model (a [`Sequential`] starting with an Embedding and
/// ending in logits) on a [`TextCorpus`].
pub struct LmTrainer<B: Backend> {
    model: Sequential<B>,
    optimizer: Adam<B>,
    backend: B,
    vocab: Vocab,
    progress: Option<LmProgress>,
}

/// The usual rule for which parameters weight decay applies to: the
/// matrices of dense and attention layers (names ending in `weight`), not
/// biases, norms or embedding tables.
pub fn decay_mask<B: Backend>(model: &Sequential<B>) -> Vec<bool> {
    model
        .named_params()
        .iter()
        .map(|(name, _)| name.ends_with("weight"))
        .collect()
}

impl<B: Backend> LmTrainer<B> {
    /// A trainer for `model` (which must read token ids) over `vocab`.
    pub fn new(model: Sequential<B>, optimizer: Adam<B>, vocab: Vocab, backend: B) -> Result<Self> {
        if !model.takes_tokens() {
            return Err(Error::invalid(format!(
                "model `{}` does not read token ids: a language model starts with an Embedding layer",
                model.name()
            )));
        }
        let out = model.output_shape()?;
        if out.last() != Some(&vocab.len()) {
            return Err(Error::invalid(format!(
                "model `{}` predicts {:?} per position; the corpus has {} tokens",
                model.name(),
                out,
                vocab.len()
            )));
        }
        let mask = decay_mask(&model);
        Ok(LmTrainer {
            model,
            optimizer: optimizer.with_decay_mask(mask),
            backend,
            vocab,
            progress: None,
        })
    }

    /// Continues the run `checkpoint` holds (a file, or the newest in a
    /// folder): the model, the optimiser's state and where the run stood.
    /// `optimizer` must be of the checkpoint's kind.
    pub fn resume(path: &Path, optimizer: Adam<B>, backend: B) -> Result<Self> {
        let file = newest_checkpoint(path)?;
        let bytes = kiln_core::files::read(&file, "checkpoint")?;
        let named = |e: Error| match e {
            Error::InvalidArgument(msg) => Error::Data {
                path: file.clone(),
                source: DataError::Invalid(msg),
            },
            other => other,
        };
        let (model, state, progress, vocab) = from_bytes(&bytes, &backend).map_err(named)?;
        let mut optimizer = optimizer;
        optimizer
            .load_state(&state, &model.params())
            .map_err(named)?;
        let mut t = LmTrainer::new(model, optimizer, vocab, backend)?;
        t.progress = Some(progress);
        Ok(t)
    }

    /// Sets the type the model computes in (f32 or bf16; f16 is refused
    /// by [`LmTrainer::fit`]).
    pub fn set_precision(&mut self, precision: Precision) {
        self.model.set_precision(precision);
    }

    /// The model.
    pub fn model(&self) -> &Sequential<B> {
        &self.model
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Where a resumed run stood (`None` for a fresh one).
    pub fn progress(&self) -> Option<&LmProgress> {
        self.progress.as_ref()
    }

    /// The context length the model was built for.
    fn block(&self) -> usize {
        self.model.input_shape()[0]
    }

    /// Mean next-token loss of `batch` sequences of tokens `x` against `y`
    /// (both `batch·block` long), as a scalar tensor (in the graph).
    fn loss(
        &self,
        x: Vec<u32>,
        y: Vec<u32>,
        batch: usize,
        stop: &impl Fn() -> bool,
    ) -> Result<Option<Tensor<B>>> {
        let block = self.block();
        let xs = Tensor::from_host(HostData::U32(x), &[batch, block], &self.backend)?;
        let ys = Tensor::from_host(HostData::U32(y), &[batch * block], &self.backend)?;
        let Some(logits) = self.model.forward_logits_until(&xs, stop)? else {
            return Ok(None);
        };
        let v = self.vocab.len();
        logits
            .reshape(&[batch * block, v])?
            .cast(DType::F32)?
            .softmax_cross_entropy(&ys)
            .map(Some)
    }

    /// Mean loss over `iters` batches of `split` (no gradients, no dropout),
    /// batch `i` drawn from `(seed, first + i)`.
    pub fn evaluate(
        &self,
        corpus: &TextCorpus,
        split: TextSplit,
        batch: usize,
        seed: u64,
        first: u64,
        iters: u64,
    ) -> Result<f64> {
        let sum = self.evaluate_part(corpus, split, batch, (seed, first, iters), 0, 1)?;
        Ok(sum / iters.max(1) as f64)
    }

    /// The summed loss of the batches `(seed, first + i)`, `i < iters`, that
    /// fall to `rank` of `world` (every `world`-th, from `rank`).
    fn evaluate_part(
        &self,
        corpus: &TextCorpus,
        split: TextSplit,
        batch: usize,
        (seed, first, iters): (u64, u64, u64),
        rank: usize,
        world: usize,
    ) -> Result<f64> {
        self.model.set_training(false);
        let mut sum = 0.0;
        for i in (rank as u64..iters).step_by(world.max(1)) {
            let (x, y) = corpus.batch(split, batch, self.block(), seed, first + i)?;
            let l = no_grad(|| self.loss(x, y, batch, &|| false))?
                .expect("an evaluation is never stopped");
            sum += f64::from(l.to_scalar_f32()?);
        }
        Ok(sum)
    }

    /// [`LmTrainer::evaluate`] shared among the ranks of `dp`: each takes
    /// every `world`-th batch, and the sums are added.
    fn evaluate_shared(
        &self,
        corpus: &TextCorpus,
        split: TextSplit,
        batch: usize,
        draws: (u64, u64, u64),
        dp: Option<&crate::DataParallel>,
    ) -> Result<f64> {
        let Some(d) = dp else {
            return self.evaluate(corpus, split, batch, draws.0, draws.1, draws.2);
        };
        let mut sum = [self.evaluate_part(corpus, split, batch, draws, d.rank(), d.world())?];
        d.collective.all_reduce_sum_f64(&mut sum)?;
        Ok(sum[0] / draws.2.max(1) as f64)
    }

    /// Trains for `cfg.iters` steps (from where a resumed run stood),
    /// evaluating every `cfg.eval_every` steps and after the last. Returns
    /// the evaluations.
    pub fn fit(&mut self, corpus: &TextCorpus, cfg: &LmFitConfig) -> Result<Vec<LmRecord>> {
        cfg.check()?;
        corpus.check_block(self.block())?;
        if corpus.vocab() != &self.vocab {
            return Err(Error::invalid(format!(
                "the corpus `{}` has a vocabulary of {} characters, the model {} (a model trains and resumes on the corpus it was built for)",
                corpus.name(),
                corpus.vocab().len(),
                self.vocab.len()
            )));
        }
        let precision = self.model.precision();
        if precision == Precision::F16 {
            return Err(Error::invalid(
                "language models train in f32 or bf16 (f16 needs loss scaling, which the LM loop does not do); use --precision bf16",
            ));
        }
        let update = LmUpdate {
            schedule: cfg.schedule,
            adam: self.optimizer.settings(),
            grad_clip: cfg.grad_clip,
        };
        let mut progress = match self.progress.take() {
            Some(mut p) => {
                check_resume(&p, corpus, cfg, precision, &update)?;
                p.update = Some(update);
                p
            }
            None => LmProgress {
                iter: 0,
                iters: cfg.iters,
                seed: cfg.seed,
                batch_size: cfg.batch_size,
                accumulate: cfg.accumulate,
                dataset: corpus.name().to_string(),
                dataset_fingerprint: corpus.fingerprint(),
                optimizer: String::new(),
                optimizer_step: 0,
                lr: cfg.schedule.at(0),
                rng_positions: Vec::new(),
                partial: (0.0, 0),
                history: Vec::new(),
                precision: precision.name().to_string(),
                update: Some(update),
            },
        };
        let stop_flag = cfg.stop.clone();
        let stopping = move || stop_flag.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        let dp = cfg.distributed.as_ref().filter(|d| d.world() > 1);
        // Rank 0 speaks and writes for a distributed run.
        let lead = dp.is_none_or(|d| d.rank() == 0);
        if let Some(path) = cfg.history_path.as_ref().filter(|_| lead) {
            crate::history::write_records(path, &progress.history)?;
        }
        if let Some(d) = dp {
            let settings = format!(
                "corpus {} (fingerprint {}), model {} (seed {}), batch {}×{}, seed {}, iters {}, from step {}, precision {}",
                corpus.name(),
                corpus.fingerprint(),
                self.model.name(),
                self.model.seed(),
                cfg.batch_size,
                cfg.accumulate,
                cfg.seed,
                cfg.iters,
                progress.iter,
                precision.name()
            );
            d.start(&mut self.model, cfg.batch_size, &settings)?;
        }
        // Mid-step stops: alone only (ranks stop together at a step's end).
        let stop_mid = || dp.is_none() && stopping();
        // Each stream's draws per sequence, to place the ranks' shards.
        let draws = dp
            .map(|_| self.model.rng_draws_per_example())
            .transpose()?
            .unwrap_or_default();
        let verbosity = if lead {
            cfg.verbosity
        } else {
            Verbosity::Silent
        };
        // The optimiser steps outside `self` while the step closure borrows it.
        let mut optimizer = std::mem::replace(&mut self.optimizer, Adam::new(1.0)?);
        let tokens_per_step = (cfg.batch_size * cfg.accumulate * self.block()) as f64;
        let mut bar = crate::progress::IterProgress::start(verbosity, progress.iter, cfg.iters);
        let mut clock = Instant::now();
        let mut trained = 0.0f64;
        let mut since = 0u64;
        let mut comm = 0.0f64;
        let result = (|| -> Result<()> {
            while progress.iter < cfg.iters {
                let it = progress.iter;
                let lr = cfg.schedule.at(it);
                optimizer.set_lr(lr);
                self.model.set_training(true);
                let drawn = self.model.rng_positions();
                let mut grads = GradStore::default();
                let mut step_loss = 0.0;
                // A distributed run's ranks each take a shard of the sequences.
                let rows = match dp {
                    Some(d) => replicas::shard(cfg.batch_size, d.rank(), d.world()),
                    None => 0..cfg.batch_size,
                };
                // The last micro-batch's pass hands each gradient, summed
                // with the earlier ones', to the other ranks as it ends.
                let mut sync = dp.and_then(|d| d.sync(&self.model, rows.len(), cfg.batch_size));
                for micro in 0..cfg.accumulate {
                    let index = it * cfg.accumulate as u64 + micro as u64;
                    let (mut x, mut y) = corpus.batch(
                        TextSplit::Train,
                        cfg.batch_size,
                        self.block(),
                        cfg.seed,
                        index,
                    )?;
                    if dp.is_some() {
                        // Past the step's earlier micro-batches, then to this
                        // rank's first sequence in this one.
                        let before = micro * cfg.batch_size;
                        shard_streams(&self.model, &drawn, &draws, before, rows.start)?;
                        let block = self.block();
                        x = x[rows.start * block..rows.end * block].to_vec();
                        y = y[rows.start * block..rows.end * block].to_vec();
                    }
                    let Some(loss) = self.loss(x, y, rows.len(), &stop_mid)? else {
                        self.model.set_rng_positions(&drawn)?;
                        return Err(Error::Interrupted(String::new()));
                    };
                    step_loss += f64::from(loss.to_scalar_f32()?) / cfg.accumulate as f64;
                    let loss = if cfg.accumulate > 1 {
                        loss.affine(1.0 / cfg.accumulate as f32, 0.0)?
                    } else {
                        loss
                    };
                    let last = micro + 1 == cfg.accumulate;
                    let delivered = last && sync.is_some();
                    let g = loss.backward_with(stop_mid, |id, g| match sync.as_mut() {
                        Some(s) if last => match grads.get_id(id) {
                            Some(earlier) => s.deliver(id, &earlier.add(g)?),
                            None => s.deliver(id, g),
                        },
                        _ => Ok(()),
                    })?;
                    let Some(g) = g else {
                        self.model.set_rng_positions(&drawn)?;
                        return Err(Error::Interrupted(String::new()));
                    };
                    if !delivered {
                        grads.accumulate(g)?;
                    }
                }
                let mut step_stop = false;
                if let Some(d) = dp {
                    let at = Instant::now();
                    // Before any other collective: an overlapped step's
                    // reductions are still being made on the comm thread.
                    d.finish(sync, &self.model, &mut grads, rows.len(), cfg.batch_size)?;
                    let t = d.totals(step_loss, 0, rows.len(), stopping())?;
                    (step_loss, step_stop) = (t.loss, t.stop);
                    comm += at.elapsed().as_secs_f64();
                }
                if !step_loss.is_finite() {
                    return Err(Error::invalid(format!(
                        "the loss became {step_loss} at step {}: lower the learning rate, or clip gradients (--grad-clip)",
                        it + 1
                    )));
                }
                if let Some(max) = cfg.grad_clip {
                    let params = self.model.params();
                    clip_grad_norm(&mut grads, &params, max)?;
                }
                optimizer.step(&mut self.model.params_mut(), &grads)?;
                if let Some(d) = dp {
                    streams_past(&self.model, &drawn, &draws, cfg.accumulate * cfg.batch_size)?;
                    d.after_step(&self.model, it + 1)?;
                }
                progress.iter += 1;
                progress.lr = lr;
                progress.partial.0 += step_loss;
                progress.partial.1 += 1;
                since += 1;
                bar.update(
                    progress.iter,
                    step_loss,
                    since as f64 * tokens_per_step
                        / (trained + clock.elapsed().as_secs_f64()).max(1e-9),
                );
                let done = progress.iter == cfg.iters;
                if progress.iter.is_multiple_of(cfg.eval_every) || done {
                    trained += clock.elapsed().as_secs_f64();
                    let round = progress.history.len() as u64;
                    let first = round * cfg.eval_iters;
                    // Shared among the ranks of a distributed run.
                    let train_loss = self.evaluate_shared(
                        corpus,
                        TextSplit::Train,
                        cfg.batch_size,
                        (cfg.seed ^ 0x5eed_e7a1, first, cfg.eval_iters),
                        dp,
                    )?;
                    let val_loss = self.evaluate_shared(
                        corpus,
                        TextSplit::Val,
                        cfg.batch_size,
                        (cfg.seed, first, cfg.eval_iters),
                        dp,
                    )?;
                    let (sum, n) = progress.partial;
                    let record = LmRecord {
                        iter: progress.iter,
                        train_loss,
                        val_loss,
                        step_loss: sum / n.max(1) as f64,
                        lr: f64::from(lr),
                        seconds: trained,
                        iters_per_sec: since as f64 / trained.max(1e-9),
                        tokens_per_sec: since as f64 * tokens_per_step / trained.max(1e-9),
                        peak_rss_bytes: peak_rss_bytes(),
                        precision: precision.name().to_string(),
                        processes: dp.map(crate::DataParallel::world),
                        comm_seconds: dp.map(|_| comm),
                    };
                    bar.record(&record);
                    comm = 0.0;
                    if let Some(path) = cfg.history_path.as_ref().filter(|_| lead) {
                        append_jsonl(path, &record)?;
                    }
                    progress.history.push(record);
                    progress.partial = (0.0, 0);
                    trained = 0.0;
                    since = 0;
                    clock = Instant::now();
                }
                if let Some(policy) = cfg.checkpoint.as_ref().filter(|_| lead) {
                    if policy.every > 0 && (progress.iter.is_multiple_of(policy.every) || done) {
                        self.save_checkpoint(policy, &optimizer, &mut progress)?;
                    }
                }
                if (step_stop || (dp.is_none() && stopping())) && !done {
                    return Err(Error::Interrupted(String::new()));
                }
            }
            Ok(())
        })();
        bar.finish();
        let outcome = match result {
            Err(Error::Interrupted(_)) => {
                let at = match &cfg.checkpoint {
                    Some(policy) if !lead => format!(
                        "stopped after step {}; rank 0 writes the checkpoint to {}",
                        progress.iter,
                        policy.dir.display()
                    ),
                    Some(policy) => {
                        let path = self.save_checkpoint(policy, &optimizer, &mut progress)?;
                        format!(
                            "stopped after step {}; resume with --resume {}",
                            progress.iter,
                            path.display()
                        )
                    }
                    None => format!(
                        "stopped after step {} (no checkpoint folder was set)",
                        progress.iter
                    ),
                };
                Err(Error::Interrupted(at))
            }
            other => other,
        };
        self.optimizer = optimizer;
        let history = progress.history.clone();
        self.progress = Some(progress);
        outcome.map(|()| history)
    }

    fn save_checkpoint(
        &self,
        policy: &LmCheckpointPolicy,
        optimizer: &Adam<B>,
        progress: &mut LmProgress,
    ) -> Result<PathBuf> {
        let state = optimizer.state(&self.backend)?;
        progress.optimizer = state.kind.clone();
        progress.optimizer_step = state.step;
        progress.rng_positions = self.model.rng_positions();
        std::fs::create_dir_all(&policy.dir).map_err(|e| {
            Error::io(
                format!("creating the checkpoint folder {}", policy.dir.display()),
                e,
            )
        })?;
        let tensors: Vec<(String, Vec<usize>, HostData)> = state
            .slots
            .into_iter()
            .map(|(slot, pos, data)| (format!("optimizer.{slot}.{pos}"), vec![data.len()], data))
            .collect();
        let mut meta = self.metadata();
        let json = serde_json::to_string(&*progress)
            .map_err(|e| Error::invalid(format!("serialising checkpoint progress: {e}")))?;
        meta.insert(LM_PROGRESS_KEY.to_string(), json);
        let path = policy
            .dir
            .join(format!("ckpt-{:09}.safetensors", progress.iter));
        model_file::save_with(&path, &self.model, &meta, &tensors)?;
        let files = crate::checkpoint::list(&policy.dir)?;
        for old in &files[..files.len().saturating_sub(policy.keep.max(1))] {
            std::fs::remove_file(old)
                .map_err(|e| Error::io(format!("removing old checkpoint {}", old.display()), e))?;
        }
        Ok(path)
    }

    /// The metadata a model file of this model carries: its vocabulary.
    pub fn metadata(&self) -> HashMap<String, String> {
        let chars: String = self.vocab.chars().iter().collect();
        let mut meta = HashMap::new();
        meta.insert(
            VOCAB_KEY.to_string(),
            serde_json::to_string(&chars).expect("a string always serialises"),
        );
        meta
    }

    /// Saves the model and its vocabulary to `path` (atomically).
    pub fn save_model(&self, path: &Path) -> Result<()> {
        model_file::save(path, &self.model, &self.metadata())
    }
}

/// The vocabulary a model file or checkpoint stores under [`VOCAB_KEY`].
pub fn vocab_of(metadata: &HashMap<String, String>) -> Result<Vocab> {
    let json = metadata.get(VOCAB_KEY).ok_or_else(|| {
        Error::invalid(format!(
            "no `{VOCAB_KEY}` metadata: not a language model (train one with --model gpt)"
        ))
    })?;
    let chars: String = serde_json::from_str(json)
        .map_err(|e| Error::invalid(format!("the model's vocabulary: {e}")))?;
    Vocab::from_chars(chars.chars().collect())
}

/// The vocabulary in a language model's `metadata` ([`vocab_of`]), which
/// must have a character for every token `model` predicts: a file whose
/// vocabulary was edited or cut would otherwise decode some tokens as
/// U+FFFD, or fail only when an extra character is used.
///
/// ```
/// use std::collections::HashMap;
/// use kiln_cpu::CpuBackend;
/// use kiln_nn::{GptConfig, Sequential};
/// use kiln_train::lm::{vocab_for, VOCAB_KEY};
///
/// let b = CpuBackend::reference();
/// let cfg = GptConfig { n_layer: 1, n_head: 1, n_embd: 8, block_size: 8, ..GptConfig::char_small() };
/// let model = Sequential::from_spec(&cfg.spec(3)?, 1, &b)?;
/// let meta = |chars: &str| HashMap::from([(VOCAB_KEY.to_string(), format!("{chars:?}"))]);
/// assert_eq!(vocab_for(&model, &meta("abc"))?.len(), 3);
/// let e = vocab_for(&model, &meta("ab")).unwrap_err().to_string();
/// assert!(e.contains("2 characters but it predicts 3 tokens"), "{e}");
/// # Ok::<(), kiln_core::Error>(())
/// ```
pub fn vocab_for<B: Backend>(
    model: &Sequential<B>,
    metadata: &HashMap<String, String>,
) -> Result<Vocab> {
    let vocab = vocab_of(metadata)?;
    let tokens = model.output_shape()?.last().copied().unwrap_or(0);
    if vocab.len() != tokens {
        return Err(Error::invalid(format!(
            "the model's vocabulary has {} characters but it predicts {tokens} tokens: \
             the file was edited or damaged; use the run's own model.safetensors",
            vocab.len()
        )));
    }
    Ok(vocab)
}

/// Whether `path` (a checkpoint file, or a folder: its newest) is a
/// language-model checkpoint; a file that cannot be read is an error.
pub fn is_lm_checkpoint(path: &Path) -> Result<bool> {
    let file = newest_checkpoint(path)?;
    Ok(model_file::read_metadata(&file, "checkpoint")?
        .is_some_and(|m| m.contains_key(LM_PROGRESS_KEY)))
}

/// The progress an LM checkpoint holds (`path` a file, or a folder: its
/// newest) — its run's corpus, length, batch and seed — read from the
/// metadata alone and checked as a resume checks it, so that a caller can
/// default its settings to the run's before loading the model.
pub fn checkpoint_progress(path: &Path) -> Result<LmProgress> {
    let file = newest_checkpoint(path)?;
    let json = model_file::read_metadata(&file, "checkpoint")?
        .and_then(|mut m| m.remove(LM_PROGRESS_KEY))
        .ok_or_else(|| {
            Error::invalid(format!(
                "{}: no `{LM_PROGRESS_KEY}` metadata: not a language-model checkpoint",
                file.display()
            ))
        })?;
    let progress: LmProgress = serde_json::from_str(&json)
        .map_err(|e| Error::invalid(format!("{}: checkpoint progress: {e}", file.display())))?;
    progress
        .validate()
        .map_err(|e| Error::invalid(format!("{}: {e}", file.display())))?;
    Ok(progress)
}

fn newest_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        crate::checkpoint::list(path)?.pop().ok_or_else(|| {
            Error::invalid(format!(
                "{} holds no checkpoint (ckpt-*.safetensors); train with --checkpoint-every N first",
                path.display()
            ))
        })
    } else {
        Ok(path.to_path_buf())
    }
}

/// Parses an LM checkpoint: model, optimiser state, progress, vocabulary.
fn from_bytes<B: Backend>(
    bytes: &[u8],
    backend: &B,
) -> Result<(Sequential<B>, OptimizerState, LmProgress, Vocab)> {
    let loaded = model_file::from_bytes_with_extra(bytes, backend, "optimizer.")?;
    let json = loaded.metadata.get(LM_PROGRESS_KEY).ok_or_else(|| {
        Error::invalid(format!(
            "no `{LM_PROGRESS_KEY}` metadata: not a language-model checkpoint (it has `{SPEC_KEY}`{})",
            if loaded.metadata.contains_key(crate::checkpoint::PROGRESS_KEY) {
                ", and is an image model's checkpoint"
            } else {
                " only: a model file"
            }
        ))
    })?;
    let progress: LmProgress = serde_json::from_str(json)
        .map_err(|e| Error::invalid(format!("checkpoint progress: {e}")))?;
    progress.validate()?;
    let vocab = vocab_for(&loaded.model, &loaded.metadata)?;
    let slots = crate::checkpoint::optimizer_slots(loaded.extra)?;
    let state = OptimizerState {
        kind: progress.optimizer.clone(),
        step: progress.optimizer_step,
        lr: progress.lr.max(f32::MIN_POSITIVE),
        slots,
    };
    let mut model = loaded.model;
    model.set_rng_positions(&progress.rng_positions)?;
    model.set_precision(progress.precision.parse()?);
    Ok((model, state, progress, vocab))
}

/// A resumed run must continue the same run.
fn check_resume(
    p: &LmProgress,
    corpus: &TextCorpus,
    cfg: &LmFitConfig,
    precision: Precision,
    update: &LmUpdate,
) -> Result<()> {
    let differs = |what: &str, was: String, now: String| {
        Err(Error::invalid(format!(
            "the checkpoint's run used {what} {was}, this one {now}: resume with the same settings"
        )))
    };
    if p.dataset_fingerprint != corpus.fingerprint() {
        if p.dataset == corpus.name() {
            return Err(Error::invalid(format!(
                "the corpus {} has changed since the checkpoint (its text's fingerprint was {}, now {}): \
                 resume on the text the run started with",
                p.dataset,
                p.dataset_fingerprint,
                corpus.fingerprint()
            )));
        }
        return differs("the corpus", p.dataset.clone(), corpus.name().to_string());
    }
    if (p.seed, p.batch_size, p.accumulate) != (cfg.seed, cfg.batch_size, cfg.accumulate) {
        return differs(
            "seed/batch/accumulate",
            format!("{}/{}/{}", p.seed, p.batch_size, p.accumulate),
            format!("{}/{}/{}", cfg.seed, cfg.batch_size, cfg.accumulate),
        );
    }
    if p.iters != cfg.iters {
        return differs("--iters", p.iters.to_string(), cfg.iters.to_string());
    }
    if p.precision != precision.name() {
        return differs(
            "precision",
            p.precision.clone(),
            precision.name().to_string(),
        );
    }
    if let Some(was) = &p.update {
        if was.schedule != update.schedule {
            return differs(
                "the learning-rate schedule",
                format!("{:?}", was.schedule),
                format!("{:?}", update.schedule),
            );
        }
        if was.adam != update.adam {
            return differs(
                "the optimiser",
                format!("{:?}", was.adam),
                format!("{:?}", update.adam),
            );
        }
        if was.grad_clip != update.grad_clip {
            return differs(
                "gradient clipping",
                format!("{:?}", was.grad_clip),
                format!("{:?}", update.grad_clip),
            );
        }
    }
    Ok(())
}

/// Reads a language model's JSON-lines history (as [`append_jsonl`]
/// writes it).
pub fn read_jsonl(path: &Path) -> Result<Vec<LmRecord>> {
    crate::history::read_records(path, "a language model's evaluation record")
}

/// Appends `record` to the JSON-lines history at `path`.
pub fn append_jsonl(path: &Path, record: &LmRecord) -> Result<()> {
    crate::history::append_record(path, record)
}
