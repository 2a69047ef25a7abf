//! `Trainer`: fit, evaluate and predict.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kiln_core::{no_grad, Backend, DType, Error, HostData, Result, Tensor};
use kiln_data::{loader::assemble, DataLoader, Dataset};
use kiln_nn::{Loss, Optimizer, Sequential};

use crate::progress::EpochProgress;
use crate::{EpochRecord, History, Verbosity};

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
    /// Append each epoch's record to this JSON-lines file.
    pub history_path: Option<PathBuf>,
    /// Random affine augmentation of the training images, if any.
    pub augment: Option<kiln_data::Augment>,
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
        }
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

    /// Uploads a batch: images `[n, 1, rows, cols]` and targets (u32 labels
    /// for cross-entropy, one-hot f32 for MSE).
    fn upload(
        &self,
        images: Vec<f32>,
        labels: Vec<u32>,
        n: usize,
    ) -> Result<(Tensor<B>, Tensor<B>, Vec<u32>)> {
        let mut dims = vec![n];
        dims.extend_from_slice(self.model.input_shape());
        let x = Tensor::from_host(HostData::F32(images), &dims, &self.backend)?;
        let y = match self.loss {
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

    fn outputs(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        if self.loss.wants_logits() {
            self.model.forward_logits(x)
        } else {
            self.model.forward(x)
        }
    }

    fn correct(out: &Tensor<B>, labels: &[u32]) -> Result<usize> {
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
        self.check_dataset(train)?;
        if let Some(v) = validation {
            self.check_dataset(v)?;
        }
        if cfg.batch_size == 0 {
            return Err(Error::invalid("batch size must be at least 1"));
        }
        let mut loader = DataLoader::new(Arc::new(train.clone()), cfg.batch_size);
        if cfg.shuffle {
            loader = loader.shuffle(cfg.seed);
        }
        if let Some(a) = cfg.augment {
            loader = loader.augment(a);
        }
        let mut history = History::default();
        for epoch in 1..=cfg.epochs {
            let progress = EpochProgress::start(cfg.verbosity, epoch, cfg.epochs, loader.batches());
            let start = Instant::now();
            let mut tally = Tally::default();
            self.model.set_training(true);
            for batch in loader.epoch(epoch as u64 - 1) {
                let n = batch.len;
                let (x, y, labels) = self.upload(batch.images, batch.labels, n)?;
                let out = self.outputs(&x)?;
                let loss = self.loss.compute(&out, &y)?;
                let grads = loss.backward()?;
                let batch_loss = f64::from(loss.to_scalar_f32()?);
                if !batch_loss.is_finite() {
                    return Err(Error::invalid(format!(
                        "epoch {epoch}: the loss became {batch_loss}; lower the learning rate (now {})",
                        self.optimizer.lr()
                    )));
                }
                let correct = Self::correct(&out, &labels)?;
                // Release the graph so parameters are updated in place, not copied.
                drop((out, loss, x));
                self.optimizer.step(&mut self.model.params_mut(), &grads)?;
                tally.add(batch_loss, correct, n);
                progress.update(
                    tally.loss(),
                    tally.accuracy(),
                    tally.seen as f64 / start.elapsed().as_secs_f64(),
                );
            }
            self.model.set_training(false);
            self.backend.synchronize()?;
            let seconds = start.elapsed().as_secs_f64();
            let val = validation
                .map(|v| self.evaluate(v, cfg.batch_size.max(256)))
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
            };
            progress.finish(&record);
            if let Some(p) = &cfg.history_path {
                History::append_jsonl(p, &record)?;
            }
            history.epochs.push(record);
        }
        Ok(history)
    }

    /// Mean loss and accuracy over `ds`, without recording any graph.
    pub fn evaluate(&self, ds: &Dataset, batch_size: usize) -> Result<Evaluation> {
        self.check_dataset(ds)?;
        let _g = kiln_core::NoGradGuard::new();
        let order: Vec<u32> = (0..ds.len() as u32).collect();
        let mut tally = Tally::default();
        for chunk in order.chunks(batch_size.max(1)) {
            let b = assemble(ds, chunk);
            let (x, y, labels) = self.upload(b.images, b.labels, b.len)?;
            let out = self.outputs(&x)?;
            let loss = f64::from(self.loss.compute(&out, &y)?.to_scalar_f32()?);
            tally.add(loss, Self::correct(&out, &labels)?, b.len);
        }
        Ok(Evaluation {
            loss: tally.loss(),
            accuracy: tally.accuracy(),
            examples: tally.seen,
        })
    }

    /// Class probabilities `[n, classes]` for `n` examples of pixels in `[0, 1]`.
    pub fn predict(&self, images: &[f32], n: usize) -> Result<Tensor<B>> {
        let _g = kiln_core::NoGradGuard::new();
        let mut dims = vec![n];
        dims.extend_from_slice(self.model.input_shape());
        let x = Tensor::from_host(HostData::F32(images.to_vec()), &dims, &self.backend)?;
        let out = self.model.forward(&x)?;
        if self.model.ends_in_softmax() || out.dtype() != DType::F32 {
            Ok(out)
        } else {
            out.softmax()
        }
    }
}
