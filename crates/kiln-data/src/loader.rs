//! Batching: seeded shuffling, and the next batches assembled while the
//! model trains on the current one — on a thread of the loader's own, or
//! in the waits of a backend's threads between ops.
//!
//! ```
//! use std::sync::Arc;
//! use kiln_data::{DataLoader, Dataset, Split};
//!
//! let ds = Arc::new(Dataset::bundled_sample(Split::Test)?);
//! let loader = DataLoader::new(Arc::clone(&ds), 500).shuffle(7);
//! assert_eq!(loader.batches(), 4);
//! // The same seed and epoch give the same order, on a worker thread ahead of training.
//! assert_eq!(loader.order(0), loader.order(0));
//! assert_ne!(loader.order(0), loader.order(1));
//! let first = loader.epoch(0).next().unwrap();
//! assert_eq!((first.len, first.images.len()), (500, 500 * 784));
//! assert!(first.images.iter().all(|&p| (0.0..=1.0).contains(&p)), "pixels / 255");
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;

use kiln_core::rng::Philox;
use kiln_core::{Backend, IdleWork};

use crate::{Augment, Dataset};

/// One batch, ready to upload: pixels scaled to `[0, 1]` (an f32
/// dataset's features as they are).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `len × pixels` f32 values, row-major.
    pub images: Vec<f32>,
    /// `len` class labels (empty for a regression set).
    pub labels: Vec<u32>,
    /// `len ×` the target shape's values (empty for a classification set).
    pub targets: Vec<f32>,
    /// Number of examples.
    pub len: usize,
}

impl Batch {
    /// An empty batch of `len` examples of `ds`, with room for them (filled
    /// by [`extend`]).
    fn for_examples(ds: &Dataset, len: usize) -> Batch {
        Batch {
            images: Vec::with_capacity(len * ds.pixels()),
            labels: Vec::with_capacity(len),
            targets: Vec::new(),
            len,
        }
    }

    /// Examples `rows` of the batch (a data-parallel rank's shard).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Batch {
        let n = self.len.max(1);
        let slice = |v: &[f32]| {
            let per = v.len() / n;
            v[rows.start * per..rows.end * per].to_vec()
        };
        Batch {
            images: slice(&self.images),
            labels: self.labels.get(rows.clone()).unwrap_or_default().to_vec(),
            targets: slice(&self.targets),
            len: rows.len(),
        }
    }
}

/// Turns a dataset into batches, in a seeded order, ahead of training: on
/// a thread of its own, or in the waits of a backend's threads
/// ([`DataLoader::on_idle_threads_of`]).
#[derive(Clone, Debug)]
pub struct DataLoader {
    dataset: Arc<Dataset>,
    batch_size: usize,
    shuffle_seed: Option<u64>,
    prefetch: usize,
    augment: Option<Augment>,
    lender: Option<Lender>,
}

/// Offers an epoch's work to a backend's threads ([`Backend::lend_idle_threads`]).
#[derive(Clone)]
struct Lender(Arc<dyn Fn(Weak<dyn IdleWork>) -> bool + Send + Sync>);

impl std::fmt::Debug for Lender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lender")
    }
}

impl DataLoader {
    /// Batches of `batch_size` (the last may be smaller), in dataset order.
    pub fn new(dataset: Arc<Dataset>, batch_size: usize) -> Self {
        DataLoader {
            dataset,
            batch_size: batch_size.max(1),
            shuffle_seed: None,
            prefetch: 2,
            augment: None,
            lender: None,
        }
    }

    /// Applies a random affine warp to every training image (see
    /// [`Augment`]), ahead of training, as batches are assembled.
    pub fn augment(mut self, augment: Augment) -> Self {
        self.augment = Some(augment);
        self
    }

    /// Shuffles every epoch: the order of epoch `e` is a Fisher–Yates
    /// permutation drawn from Philox stream `(seed, e)`, so it depends only
    /// on the seed and the epoch — a resumed run sees the same order.
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.shuffle_seed = Some(seed);
        self
    }

    /// How many batches may be prepared ahead (default 2).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }

    /// Assembles the batches in the waits of `backend`'s threads between
    /// its ops, where the backend lends them
    /// ([`Backend::lend_idle_threads`]; a CPU backend on several threads
    /// does), instead of on a thread of the loader's own, which would take
    /// a core from them mid-op. The batches are the same either way; what
    /// no lent thread has started when it is wanted is assembled by the
    /// thread that asks for it. Augmented epochs keep their own thread
    /// (a warp takes long enough to hold up the backend's next op).
    pub fn on_idle_threads_of<B: Backend>(mut self, backend: &B) -> Self {
        let backend = backend.clone();
        self.lender = Some(Lender(Arc::new(move |work| {
            backend.lend_idle_threads(work)
        })));
        self
    }

    /// Number of batches per epoch.
    pub fn batches(&self) -> usize {
        self.dataset.len().div_ceil(self.batch_size)
    }

    /// The dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The example order of `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.dataset.len() as u32).collect();
        if let Some(seed) = self.shuffle_seed {
            Philox::new(seed, epoch).shuffle(&mut order);
        }
        order
    }

    /// The batches of `epoch`, assembled ahead of use.
    pub fn epoch(&self, epoch: u64) -> Batches {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` after the first `skip` (to resume mid-epoch):
    /// the same batches, with the same augmentation, as the full epoch's.
    pub fn epoch_from(&self, epoch: u64, skip: usize) -> Batches {
        let mut order = self.order(epoch);
        order.drain(..(skip.saturating_mul(self.batch_size)).min(order.len()));
        let ahead = Arc::new(Ahead {
            dataset: Arc::clone(&self.dataset),
            batches: order.len().div_ceil(self.batch_size),
            order,
            batch_size: self.batch_size,
            epoch,
            augment: self.augment,
            depth: self.prefetch,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let lent = self.augment.is_none()
            && self.lender.as_ref().is_some_and(|l| {
                let weak: Weak<dyn IdleWork> = Arc::downgrade(&ahead) as Weak<dyn IdleWork>;
                (l.0)(weak)
            });
        // Where no thread can be started, the consumer builds every batch.
        let worker = (!lent)
            .then(|| {
                let ahead = Arc::clone(&ahead);
                std::thread::Builder::new()
                    .name("kiln-loader".into())
                    .spawn(move || ahead.run_until_done())
                    .ok()
            })
            .flatten();
        Batches {
            ahead,
            next: 0,
            worker,
        }
    }
}

/// Values (pixels) per unit of work: a unit is as many whole examples as
/// hold about this many (20 MNIST images, a few microseconds), so that a
/// lent thread is soon free for its backend's next op.
const UNIT_VALUES: usize = 1 << 14;

/// One epoch's batches in the making, shared by the consumer ([`Batches`])
/// and whoever assembles them: the loader's thread or a backend's lent
/// threads. One batch is built at a time, a unit of examples per call, in
/// the epoch's order; at most `depth` finished batches wait.
struct Ahead {
    dataset: Arc<Dataset>,
    order: Vec<u32>,
    batch_size: usize,
    batches: usize,
    epoch: u64,
    augment: Option<Augment>,
    depth: usize,
    state: Mutex<State>,
    /// Signalled when a batch is finished, taken, or set down between units.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Batches handed to the consumer.
    taken: usize,
    /// The next batch nobody has started.
    next: usize,
    /// The batch being built, while no thread holds it.
    open: Option<Partial>,
    /// Whether a thread holds the batch being built.
    busy: bool,
    /// Finished batches, in order, not yet taken.
    done: std::collections::VecDeque<Batch>,
    /// Set when the consumer is gone: nothing more is built.
    stopped: bool,
    /// Whether building panicked: nothing more is built, and the consumer
    /// gets the panic, then an error for every later batch.
    failed: Failed,
}

/// Whether an epoch's building failed.
#[derive(Default)]
enum Failed {
    #[default]
    No,
    /// A panic on a lent or loader thread, not yet resumed on the consumer's.
    Pending(Box<dyn std::any::Any + Send>),
    /// The consumer has had the panic.
    Resumed,
}

/// A batch in the making: its first `filled` examples, in order.
struct Partial {
    index: usize,
    filled: usize,
    batch: Batch,
}

impl Ahead {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The examples of batch `index`.
    fn indices(&self, index: usize) -> &[u32] {
        let start = index * self.batch_size;
        &self.order[start..(start + self.batch_size).min(self.order.len())]
    }

    /// Takes the batch to build next, if there is one and room for it,
    /// and marks it held.
    fn claim(&self, st: &mut State) -> Option<Partial> {
        if st.busy || st.stopped || !matches!(st.failed, Failed::No) {
            return None;
        }
        let part = st.open.take().or_else(|| {
            (st.next < self.batches && st.next < st.taken + self.depth).then(|| {
                st.next += 1;
                let len = self.indices(st.next - 1).len();
                Partial {
                    index: st.next - 1,
                    filled: 0,
                    batch: Batch::for_examples(&self.dataset, len),
                }
            })
        })?;
        st.busy = true;
        Some(part)
    }

    /// Adds up to `units` units of examples to `part` (without the lock),
    /// fewer once `wanted()` says the thread is wanted elsewhere (at least
    /// one example each call, so the batch always advances).
    fn extend(&self, part: &mut Partial, units: usize, wanted: &dyn Fn() -> bool) {
        let indices = self.indices(part.index);
        let px = self.dataset.pixels();
        let from = part.filled;
        let per_unit = (UNIT_VALUES / px.max(1)).max(1);
        let to = indices
            .len()
            .min(from.saturating_add(per_unit.saturating_mul(units)));
        let to = extend(&self.dataset, indices, from..to, &mut part.batch, wanted);
        part.filled = to;
        if let Some(a) = &self.augment {
            warp(
                &self.dataset,
                a,
                self.epoch,
                &indices[from..to],
                &mut part.batch.images[from * px..],
            );
        }
    }

    /// Sets `part` down after a unit: finished, or open for the next one.
    fn set_down(&self, st: &mut State, part: Partial) {
        st.busy = false;
        if part.filled >= part.batch.len {
            st.done.push_back(part.batch);
        } else {
            st.open = Some(part);
        }
        self.changed.notify_all();
    }

    /// One unit of the building (ended early once `wanted()`), with a
    /// panic kept for the consumer.
    fn build_unit(&self, units: usize, wanted: &dyn Fn() -> bool) -> bool {
        let Some(mut part) = self.claim(&mut self.lock()) else {
            return false;
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.extend(&mut part, units, wanted)
        }));
        let mut st = self.lock();
        match result {
            Ok(()) => self.set_down(&mut st, part),
            Err(p) => {
                st.busy = false;
                st.failed = Failed::Pending(p);
                self.changed.notify_all();
            }
        }
        true
    }

    /// The loader thread's life: build while there is room, wait for the
    /// consumer otherwise, until every batch is built or the consumer is
    /// gone.
    fn run_until_done(&self) {
        loop {
            if self.build_unit(usize::MAX, &|| false) {
                continue;
            }
            let mut st = self.lock();
            loop {
                let finished = st.next >= self.batches && st.open.is_none() && !st.busy;
                if st.stopped || !matches!(st.failed, Failed::No) || finished {
                    return;
                }
                let room = st.open.is_some() || st.next < st.taken + self.depth;
                if room && !st.busy {
                    break;
                }
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Batch `index` (the next the consumer takes): finished, finished
    /// here if nobody holds it, or waited for.
    fn take(&self, index: usize) -> Option<Batch> {
        let mut st = self.lock();
        loop {
            // Batches finished before a failure are given first.
            if let Some(batch) = st.done.pop_front() {
                st.taken = index + 1;
                self.changed.notify_all();
                return Some(batch);
            }
            match std::mem::replace(&mut st.failed, Failed::Resumed) {
                Failed::No => st.failed = Failed::No,
                Failed::Pending(p) => {
                    drop(st);
                    std::panic::resume_unwind(p);
                }
                Failed::Resumed => {
                    drop(st);
                    panic!(
                        "an earlier batch of this epoch failed to assemble (its panic was \
                         reported): the epoch's later batches cannot be given in order"
                    );
                }
            }
            if index >= self.batches {
                return None;
            }
            if let Some(mut part) = self.claim(&mut st) {
                drop(st);
                let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.extend(&mut part, usize::MAX, &|| false)
                }));
                st = self.lock();
                if let Err(p) = built {
                    st.busy = false;
                    st.failed = Failed::Resumed;
                    self.changed.notify_all();
                    drop(st);
                    std::panic::resume_unwind(p);
                }
                self.set_down(&mut st, part);
                continue;
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl IdleWork for Ahead {
    fn run_one(&self) -> bool {
        self.build_unit(1, &|| false)
    }

    /// A unit of 20 MNIST images took 6.8 µs on average on a lent helper
    /// of the 2-core Zen 4 (cache misses on the shuffled examples), and
    /// the op that came meanwhile waited for it: the unit stops at the
    /// next example boundary instead.
    fn run_one_unless(&self, wanted: &dyn Fn() -> bool) -> bool {
        self.build_unit(1, wanted)
    }
}

/// Replaces each assembled image by its augmented version (every channel
/// warped by the example's transform).
fn warp(ds: &Dataset, a: &Augment, epoch: u64, indices: &[u32], images: &mut [f32]) {
    // Only images are warped (the trainer refuses augmentation otherwise).
    let &[c, h, w] = ds.example_shape() else {
        return;
    };
    let px = ds.pixels().max(1);
    let mut plane = vec![0f32; h * w];
    for (&i, image) in indices.iter().zip(images.chunks_exact_mut(px)) {
        let t = a.transform(epoch, u64::from(i), h, w);
        for ch in image.chunks_exact_mut((h * w).max(1)).take(c) {
            t.apply(ch, h, w, &mut plane);
            ch.copy_from_slice(&plane);
        }
    }
}

/// How many examples ahead [`assemble`] asks for an example's bytes: one
/// measured 10.8 µs a batch, two to six 10.1 µs, eight 10.4 µs.
const PREFETCH_AHEAD: usize = 2;

/// Gathers examples `indices` into one batch.
pub fn assemble(ds: &Dataset, indices: &[u32]) -> Batch {
    let mut batch = Batch::for_examples(ds, indices.len());
    extend(ds, indices, 0..indices.len(), &mut batch, &|| false);
    batch
}

/// Appends examples `indices[range]` to `batch`, or those up to the first
/// example boundary after `wanted()` says to stop (at least one); returns
/// the end of the examples appended.
fn extend(
    ds: &Dataset,
    indices: &[u32],
    range: std::ops::Range<usize>,
    batch: &mut Batch,
    wanted: &dyn Fn() -> bool,
) -> usize {
    // A shuffled batch's examples are far apart in the set: each one's
    // bytes are asked for two examples ahead of their conversion, so the
    // cache misses overlap the arithmetic (a Fashion-MNIST batch of 128
    // in shuffled order: 16.7 → 10.1 µs; 7.7 µs in the set's order).
    let ahead = |j: usize| indices.get(j + PREFETCH_AHEAD).copied();
    for &i in &indices[range.start..(range.start + PREFETCH_AHEAD).min(indices.len())] {
        ds.prefetch_example(i as usize);
    }
    for j in range.clone() {
        if j > range.start && wanted() {
            return j;
        }
        if let Some(next) = ahead(j) {
            ds.prefetch_example(next as usize);
        }
        let i = indices[j] as usize;
        ds.extend_with_example(i, &mut batch.images);
        batch.labels.extend(ds.labels().get(i));
        batch.targets.extend_from_slice(ds.targets(i));
    }
    range.end
}

/// The batches of one epoch; dropping it stops their assembly.
pub struct Batches {
    ahead: Arc<Ahead>,
    next: usize,
    worker: Option<JoinHandle<()>>,
}

impl Iterator for Batches {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        let batch = self.ahead.take(self.next)?;
        self.next += 1;
        Some(batch)
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        self.ahead.lock().stopped = true;
        self.ahead.changed.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Split;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    fn sample() -> Arc<Dataset> {
        Arc::new(Dataset::bundled_sample(Split::Test).expect("the bundled sample"))
    }

    /// Lends to a thread of its own that runs the work's units for as long
    /// as the work lives, counting them; the thread is sent to `joins`.
    fn eager(units: &Arc<AtomicUsize>, joins: std::sync::mpsc::Sender<JoinHandle<()>>) -> Lender {
        lender(units, joins, false)
    }

    /// As [`eager`]; with `wanted`, every unit is told at once that the
    /// thread is wanted elsewhere.
    fn lender(
        units: &Arc<AtomicUsize>,
        joins: std::sync::mpsc::Sender<JoinHandle<()>>,
        wanted: bool,
    ) -> Lender {
        let units = Arc::clone(units);
        let joins = Mutex::new(joins);
        Lender(Arc::new(move |work: Weak<dyn IdleWork>| {
            let units = Arc::clone(&units);
            let handle = std::thread::spawn(move || {
                while let Some(w) = work.upgrade() {
                    let ran = match wanted {
                        true => w.run_one_unless(&|| true),
                        false => w.run_one(),
                    };
                    if ran {
                        units.fetch_add(1, SeqCst);
                    } else {
                        drop(w);
                        std::thread::yield_now();
                    }
                }
            });
            joins.lock().unwrap().send(handle).unwrap();
            true
        }))
    }

    /// Waits until `done`, for at most ten seconds.
    fn wait_for(done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn lent_threads_and_the_consumer_assemble_the_same_batches() {
        let ds = sample();
        let plain = DataLoader::new(Arc::clone(&ds), 96).shuffle(3);
        let want: Vec<Batch> = plain.epoch_from(1, 2).collect();
        assert_eq!(want.len(), 2000usize.div_ceil(96) - 2);
        let with = |lender| DataLoader {
            lender: Some(lender),
            ..plain.clone()
        };
        // Built in units on a lent thread, ahead of the consumer, who
        // builds what it finds unstarted.
        let (units, (tx, rx)) = (Arc::new(AtomicUsize::new(0)), std::sync::mpsc::channel());
        let mut epoch = with(eager(&units, tx)).epoch_from(1, 2);
        let mut got: Vec<Batch> = epoch.next().into_iter().collect();
        // The two batches the prefetch allows are built ahead, in units of
        // at most 20 images: five or more units each, whichever thread
        // started them (whole batches would be one unit each).
        wait_for(|| {
            let st = epoch.ahead.lock();
            st.next == 3 && st.done.len() == 2
        });
        wait_for(|| units.load(SeqCst) >= 10);
        assert!(units.load(SeqCst) >= 10, "{} units", units.load(SeqCst));
        assert_eq!(epoch.ahead.lock().done.len(), 2);
        got.extend(epoch);
        assert_eq!(got, want);
        rx.recv().unwrap().join().unwrap();
        // Lent threads that never come: the consumer builds every batch.
        assert_eq!(
            with(Lender(Arc::new(|_| true)))
                .epoch_from(1, 2)
                .collect::<Vec<_>>(),
            want
        );
        // Refused: the loader's own thread.
        assert_eq!(
            with(Lender(Arc::new(|_| false)))
                .epoch_from(1, 2)
                .collect::<Vec<_>>(),
            want
        );
    }

    #[test]
    fn a_unit_wanted_elsewhere_ends_at_its_first_example_and_the_batches_are_the_same() {
        let plain = DataLoader::new(sample(), 96).shuffle(4);
        let want: Vec<Batch> = plain.epoch(0).collect();
        let (units, (tx, rx)) = (Arc::new(AtomicUsize::new(0)), std::sync::mpsc::channel());
        let mut epoch = DataLoader {
            lender: Some(lender(&units, tx, true)),
            ..plain
        }
        .epoch(0);
        // The two batches the prefetch allows, an example per unit.
        wait_for(|| epoch.ahead.lock().done.len() == 2);
        assert_eq!(epoch.ahead.lock().done.len(), 2);
        assert!(units.load(SeqCst) >= 2 * 96, "{} units", units.load(SeqCst));
        let got: Vec<Batch> = epoch.by_ref().collect();
        assert_eq!(got, want);
        drop(epoch);
        rx.recv().unwrap().join().unwrap();
    }

    #[test]
    fn the_next_epoch_opened_before_this_one_ends_is_built_ahead_and_in_its_own_order() {
        // What the trainer does at an epoch's last step: the next epoch's
        // first batches are built on the lent threads while this one's
        // last batch is still in use.
        let plain = DataLoader::new(sample(), 300).shuffle(5);
        let want: Vec<Vec<Batch>> = (0..2).map(|e| plain.epoch(e).collect()).collect();
        let (units, (tx, rx)) = (Arc::new(AtomicUsize::new(0)), std::sync::mpsc::channel());
        let loader = DataLoader {
            lender: Some(eager(&units, tx)),
            ..plain
        };
        let mut first = loader.epoch(0);
        let mut got: Vec<Batch> = first.by_ref().take(want[0].len() - 1).collect();
        let second = loader.epoch(1);
        wait_for(|| second.ahead.lock().done.len() == 2);
        assert_eq!(second.ahead.lock().done.len(), 2, "built ahead");
        got.extend(first.by_ref());
        assert_eq!(got, want[0]);
        drop(first);
        got = second.collect();
        assert_eq!(got, want[1]);
        // Each epoch's lent work ended with it.
        for _ in 0..2 {
            rx.recv().unwrap().join().unwrap();
        }
    }

    #[test]
    fn lent_threads_build_no_further_ahead_than_the_prefetch_and_stop_with_the_epoch() {
        let (units, (tx, rx)) = (Arc::new(AtomicUsize::new(0)), std::sync::mpsc::channel());
        let loader = DataLoader {
            lender: Some(eager(&units, tx)),
            ..DataLoader::new(sample(), 100).prefetch(3)
        };
        let mut epoch = loader.epoch(0);
        assert_eq!(epoch.next().map(|b| b.len), Some(100));
        wait_for(|| epoch.ahead.lock().done.len() == 3);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let st = epoch.ahead.lock();
        assert_eq!((st.taken, st.next, st.done.len()), (1, 4, 3));
        drop(st);
        // Dropping the epoch ends the lent work: the lending thread returns.
        drop(epoch);
        rx.recv().unwrap().join().unwrap();
    }

    #[test]
    fn a_batch_that_fails_to_build_reaches_the_consumer_then_ends_the_epoch() {
        for own_thread in [false, true] {
            let mut order: Vec<u32> = (0..300).collect();
            // Past the set's 2,000 examples: assembling it panics.
            order[150] = 5000;
            let ahead = Arc::new(Ahead {
                dataset: sample(),
                batches: 3,
                order,
                batch_size: 100,
                epoch: 0,
                augment: None,
                depth: 2,
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            });
            let worker = own_thread.then(|| {
                let ahead = Arc::clone(&ahead);
                std::thread::spawn(move || ahead.run_until_done())
            });
            let mut epoch = Batches {
                ahead,
                next: 0,
                worker,
            };
            // The batch before the failure, then the failure (expected
            // panics), then an error for every later batch.
            assert_eq!(epoch.next().map(|b| b.len), Some(100));
            let failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| epoch.next()));
            let text = |p: Box<dyn std::any::Any + Send>| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            };
            let message = text(failure.expect_err("the failing batch panics"));
            assert!(message.contains("range"), "{message}");
            let later = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| epoch.next()));
            let message = text(later.expect_err("later batches fail too"));
            assert!(message.contains("earlier batch"), "{message}");
        }
    }

    #[test]
    fn augmented_epochs_keep_their_own_thread() {
        let asked = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&asked);
        let augment = Augment {
            rotation_degrees: 10.0,
            width_shift: 0.1,
            height_shift: 0.1,
            zoom: 0.1,
            seed: 4,
        };
        let plain = DataLoader::new(sample(), 500).shuffle(1).augment(augment);
        let lent = DataLoader {
            lender: Some(Lender(Arc::new(move |_| {
                counted.fetch_add(1, SeqCst);
                true
            }))),
            ..plain.clone()
        };
        assert_eq!(
            lent.epoch(2).collect::<Vec<_>>(),
            plain.epoch(2).collect::<Vec<_>>()
        );
        assert_eq!(asked.load(SeqCst), 0);
    }
}
