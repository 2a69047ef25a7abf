//! Batching: seeded shuffling and a background thread that assembles the
//! next batches while the model trains on the current one.
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

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use kiln_core::rng::Philox;

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

/// Turns a dataset into batches, in a seeded order, on a worker thread.
#[derive(Clone, Debug)]
pub struct DataLoader {
    dataset: Arc<Dataset>,
    batch_size: usize,
    shuffle_seed: Option<u64>,
    prefetch: usize,
    augment: Option<Augment>,
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
        }
    }

    /// Applies a random affine warp to every training image (see
    /// [`Augment`]), on the worker thread, as batches are assembled.
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

    /// How many batches the worker may prepare ahead (default 2).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
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

    /// The batches of `epoch`, assembled on a background thread.
    pub fn epoch(&self, epoch: u64) -> Batches {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` after the first `skip` (to resume mid-epoch):
    /// the same batches, with the same augmentation, as the full epoch's.
    pub fn epoch_from(&self, epoch: u64, skip: usize) -> Batches {
        let (tx, rx) = sync_channel(self.prefetch);
        let ds = Arc::clone(&self.dataset);
        let mut order = self.order(epoch);
        order.drain(..(skip.saturating_mul(self.batch_size)).min(order.len()));
        let bs = self.batch_size;
        let augment = self.augment;
        let worker = std::thread::Builder::new()
            .name("kiln-loader".into())
            .spawn(move || {
                for chunk in order.chunks(bs) {
                    let mut batch = assemble(&ds, chunk);
                    if let Some(a) = &augment {
                        warp(&ds, a, epoch, chunk, &mut batch.images);
                    }
                    if tx.send(batch).is_err() {
                        return; // the consumer stopped early
                    }
                }
            })
            .expect("spawning the data-loader thread");
        Batches {
            rx,
            worker: Some(worker),
        }
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

/// Gathers examples `indices` into one batch.
pub fn assemble(ds: &Dataset, indices: &[u32]) -> Batch {
    let px = ds.pixels();
    let mut images = Vec::with_capacity(indices.len() * px);
    let mut labels = Vec::with_capacity(indices.len());
    let mut targets = Vec::new();
    for &i in indices {
        let i = i as usize;
        ds.extend_with_example(i, &mut images);
        labels.extend(ds.labels().get(i));
        targets.extend_from_slice(ds.targets(i));
    }
    Batch {
        images,
        labels,
        targets,
        len: indices.len(),
    }
}

/// The batches of one epoch; dropping it stops the worker.
pub struct Batches {
    rx: Receiver<Batch>,
    worker: Option<JoinHandle<()>>,
}

impl Iterator for Batches {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        self.rx.recv().ok()
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // Unblock the worker (its send fails once the receiver is gone), then join it.
        let (_, dummy) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, dummy));
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
