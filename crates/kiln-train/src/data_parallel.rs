//! Data-parallel training: the processes a run shares each batch with, and
//! what one step exchanges with them.
//!
//! Every rank walks the same seeded batch order; each takes a contiguous,
//! disjoint shard of every global batch ([`kiln_dist::replicas::shard`]),
//! computes its gradients, and the gradients are averaged — weighted by
//! each shard's share of the batch — before one identical optimiser step
//! everywhere. Rank 0's initial weights are broadcast first, so replicas
//! start equal and, as every rank applies the same averaged gradients to
//! the same weights, stay bit-identical ([`DataParallel::verify_replicas`]
//! checks it after every step). Rank 0 alone writes the history and the
//! checkpoints.

use std::sync::{Arc, OnceLock};

use kiln_core::{Backend, Error, GradStore, Result};
use kiln_dist::overlap::{CommThread, GradientSync};
use kiln_dist::{replicas, Collective};
use kiln_nn::Sequential;

/// How [`crate::Trainer::fit`] shares its work with other processes
/// ([`crate::FitConfig::distributed`]).
///
/// ```
/// use std::sync::Arc;
/// use kiln_train::{DataParallel, FitConfig};
///
/// let world = kiln_dist::connect(kiln_dist::Engine::Auto)?; // Local outside mpirun
/// let cfg = FitConfig {
///     distributed: Some(DataParallel::new(world).verify_replicas(true)),
///     ..FitConfig::default()
/// };
/// # let _ = cfg;
/// # Ok::<(), kiln_core::Error>(())
/// ```
#[derive(Clone)]
pub struct DataParallel {
    /// The processes, one replica each.
    pub collective: Arc<dyn Collective>,
    /// Gradient bytes per all-reduce call.
    pub bucket_bytes: usize,
    /// Check after every step that every rank holds the same weights
    /// (a digest of them broadcast from rank 0): a diverged replica is an
    /// error naming the step.
    pub verify: bool,
    /// Reduce each bucket as soon as the backward pass has finished its
    /// gradients, on a communication thread, while the pass goes on
    /// ([`kiln_dist::overlap`]); otherwise after the pass. Engines that sum
    /// the backend's own memory (NCCL) reduce after the pass either way:
    /// their sums are queued on the device's stream and do not hold up the
    /// host.
    pub overlap: bool,
    /// The communication thread of an overlapped run, started with the run.
    comm: Arc<OnceLock<CommThread>>,
}

impl DataParallel {
    /// Data parallelism over `collective`, with
    /// [`replicas::DEFAULT_BUCKET_BYTES`] buckets and no per-step check.
    pub fn new(collective: Arc<dyn Collective>) -> Self {
        DataParallel {
            collective,
            bucket_bytes: replicas::DEFAULT_BUCKET_BYTES,
            verify: false,
            overlap: true,
            comm: Arc::new(OnceLock::new()),
        }
    }

    /// With the all-reduces overlapped with the backward pass (the
    /// default) or after it.
    pub fn overlap(mut self, on: bool) -> Self {
        self.overlap = on;
        self
    }

    /// With all-reduce buckets of `bytes` (at least 4).
    pub fn bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_bytes = bytes.max(4);
        self
    }

    /// With (or without) the per-step replica check.
    pub fn verify_replicas(mut self, on: bool) -> Self {
        self.verify = on;
        self
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// The number of processes.
    pub fn world(&self) -> usize {
        self.collective.world()
    }
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("collective", &self.collective.describe())
            .field("rank", &self.rank())
            .field("bucket_bytes", &self.bucket_bytes)
            .field("verify", &self.verify)
            .field("overlap", &self.overlap)
            .finish()
    }
}

/// Where `model`'s random streams stand for a shard: `base` advanced past
/// `before` whole examples (earlier micro-batches of the step, drawn as one
/// process draws them) and then to the shard's `first` example of its
/// batch, given each stream's draws per example `per` (from
/// [`Sequential::rng_draws_per_example`]). A stream's position counts
/// Philox blocks of [`kiln_core::rng::UNIFORMS_PER_BLOCK`] uniforms, so the
/// shard starts `first × ⌈per / 4⌉` blocks on: exactly where one process
/// draws that example's numbers when `per` is a multiple of 4, and never on
/// another rank's numbers otherwise.
pub(crate) fn shard_streams<B: Backend>(
    model: &Sequential<B>,
    base: &[u64],
    per: &[u64],
    before: usize,
    first: usize,
) -> Result<()> {
    let blocks =
        |d: u64| d * before as u64 + first as u64 * d.div_ceil(kiln_core::rng::UNIFORMS_PER_BLOCK);
    move_streams(model, base, per, blocks)
}

/// Where `model`'s random streams stand after a batch of `examples`: as
/// one process's, whatever the shards drew (a layer advances its stream by
/// one position per number it draws).
pub(crate) fn streams_past<B: Backend>(
    model: &Sequential<B>,
    base: &[u64],
    per: &[u64],
    examples: usize,
) -> Result<()> {
    move_streams(model, base, per, |d| d * examples as u64)
}

/// Sets each stream to its `base` plus `advance` of its draws per example.
fn move_streams<B: Backend>(
    model: &Sequential<B>,
    base: &[u64],
    per: &[u64],
    advance: impl Fn(u64) -> u64,
) -> Result<()> {
    let at: Vec<u64> = base.iter().zip(per).map(|(b, &d)| b + advance(d)).collect();
    model.set_rng_positions(&at)
}

/// One step's totals over every rank.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepTotals {
    /// Mean loss per example over the global batch.
    pub loss: f64,
    /// Correct predictions in the global batch.
    pub correct: usize,
    /// Examples in the global batch.
    pub examples: usize,
    /// Whether any rank was asked to stop.
    pub stop: bool,
}

impl DataParallel {
    /// Checks what a run needs before its first step — a batch to split,
    /// and the same data and settings on every rank (`settings` says
    /// them) — and broadcasts rank 0's weights.
    pub(crate) fn start<B: Backend>(
        &self,
        model: &mut Sequential<B>,
        batch_size: usize,
        settings: &str,
    ) -> Result<()> {
        // Agreed first: a rank that stops here stops every rank with it.
        replicas::agree(
            self.collective.as_ref(),
            "training data or settings",
            settings,
        )?;
        if batch_size < self.world() {
            return Err(Error::invalid(format!(
                "batch size {batch_size} cannot be split over {} processes: give each at least one example",
                self.world()
            )));
        }
        replicas::broadcast_params(self.collective.as_ref(), &mut model.params_mut())?;
        if self.overlap && self.comm.get().is_none() {
            let thread = CommThread::start(Arc::clone(&self.collective))?;
            // A clone of this configuration may have started one first.
            let _ = self.comm.set(thread);
        }
        Ok(())
    }

    /// A step's gradient average to feed from its backward pass
    /// ([`GradientSync::deliver`]), when the run overlaps them and the
    /// engine reduces host memory; `None` to average after the pass with
    /// [`DataParallel::average`]. `examples` of the `global` batch are
    /// this rank's.
    pub(crate) fn sync<'a, B: Backend>(
        &'a self,
        model: &Sequential<B>,
        examples: usize,
        global: usize,
    ) -> Option<GradientSync<'a, B>> {
        let comm = self.comm.get().filter(|_| self.overlap)?;
        let params = model.params();
        let in_place = params
            .iter()
            .any(|p| self.collective.reduces_storage(&**p.as_tensor().storage()));
        if in_place {
            return None;
        }
        let weight = examples as f32 / global.max(1) as f32;
        Some(GradientSync::begin(
            comm,
            &params,
            weight,
            self.bucket_bytes,
        ))
    }

    /// Averages `grads` over the ranks: through `sync` when the step was
    /// overlapped, else after the pass; returns the seconds this thread
    /// waited for it.
    pub(crate) fn finish<B: Backend>(
        &self,
        sync: Option<GradientSync<'_, B>>,
        model: &Sequential<B>,
        grads: &mut GradStore<B>,
        examples: usize,
        global: usize,
    ) -> Result<f64> {
        match sync {
            Some(s) => Ok(s.finish(grads)?.seconds),
            None => self.average(model, grads, examples, global),
        }
    }

    /// Adds up a step's loss (this rank's mean over `examples`), correct
    /// count and stop request over every rank — one small all-reduce.
    pub(crate) fn totals(
        &self,
        loss: f64,
        correct: usize,
        examples: usize,
        stop: bool,
    ) -> Result<StepTotals> {
        // An empty shard contributes nothing, whatever its "mean" is.
        let sum = if examples == 0 {
            0.0
        } else {
            loss * examples as f64
        };
        let mut t = [
            sum,
            correct as f64,
            examples as f64,
            f64::from(u8::from(stop)),
        ];
        self.collective.all_reduce_sum_f64(&mut t)?;
        Ok(StepTotals {
            loss: t[0] / t[2].max(1.0),
            correct: t[1] as usize,
            examples: t[2] as usize,
            stop: t[3] > 0.0,
        })
    }

    /// Averages `grads` over the ranks after the backward pass, this rank's
    /// weighted by its share of the global batch; returns the seconds it
    /// took.
    fn average<B: Backend>(
        &self,
        model: &Sequential<B>,
        grads: &mut GradStore<B>,
        examples: usize,
        global: usize,
    ) -> Result<f64> {
        let weight = examples as f32 / global.max(1) as f32;
        let synced = replicas::average_gradients(
            self.collective.as_ref(),
            &model.params(),
            grads,
            weight,
            self.bucket_bytes,
        )?;
        Ok(synced.seconds)
    }

    /// After an update: the replica check, when asked for.
    pub(crate) fn after_step<B: Backend>(&self, model: &Sequential<B>, step: u64) -> Result<()> {
        if self.verify {
            replicas::check_replicas(self.collective.as_ref(), &model.params(), step)?;
        }
        Ok(())
    }
}
