//! Callbacks at the end of each epoch: a closure that sees the epoch's
//! record and may stop the run ([`EpochHook`]), and Keras' early stopping
//! built on it ([`EarlyStopping`]). (A closure after every step is
//! [`crate::StepHook`]; a learning-rate schedule is
//! [`crate::FitConfig::lr_schedule`]; checkpoints are
//! [`crate::CheckpointPolicy`].)
//!
//! ```
//! use kiln_train::{EarlyStopping, EpochControl, EpochHook, EpochRecord, Monitor};
//!
//! // Stop once the validation loss has not improved by 0.01 for 2 epochs.
//! let hook = EarlyStopping::new(Monitor::ValLoss, 2, 0.01).hook();
//! let epoch = |epoch, val_loss| EpochRecord {
//!     epoch,
//!     val_loss: Some(val_loss),
//!     ..EpochRecord::new(epoch)
//! };
//! assert_eq!(hook.call(&epoch(1, 0.50)), EpochControl::Continue);
//! assert_eq!(hook.call(&epoch(2, 0.40)), EpochControl::Continue); // best so far
//! assert_eq!(hook.call(&epoch(3, 0.395)), EpochControl::Continue); // not by 0.01: 1 epoch
//! assert_eq!(hook.call(&epoch(4, 0.41)), EpochControl::Stop); // 2 epochs without
//! ```

use std::sync::{Arc, Mutex};

use crate::EpochRecord;

/// What an [`EpochHook`] decides after an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochControl {
    /// Train the next epoch.
    Continue,
    /// End the run after this epoch (its record and any checkpoint are
    /// written first).
    Stop,
}

/// A function [`crate::Trainer::fit`] calls after each epoch's record is
/// complete (validation included) ([`crate::FitConfig::on_epoch`]). In a
/// distributed run every rank calls it with the same record, so a
/// deterministic hook decides the same everywhere.
#[derive(Clone)]
pub struct EpochHook(Arc<dyn Fn(&EpochRecord) -> EpochControl + Send + Sync>);

impl EpochHook {
    /// Wraps `f`.
    pub fn new(f: impl Fn(&EpochRecord) -> EpochControl + Send + Sync + 'static) -> Self {
        EpochHook(Arc::new(f))
    }

    /// Calls it.
    pub fn call(&self, record: &EpochRecord) -> EpochControl {
        (self.0)(record)
    }
}

impl std::fmt::Debug for EpochHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochHook(..)")
    }
}

/// The number [`EarlyStopping`] watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Monitor {
    /// Validation loss (lower is better); needs a validation set.
    ValLoss,
    /// Validation accuracy (higher is better); needs a validation set.
    ValAccuracy,
    /// Training loss (lower is better).
    Loss,
    /// Training accuracy (higher is better).
    Accuracy,
}

impl Monitor {
    /// The record's value, oriented so that lower is better.
    fn value(self, r: &EpochRecord) -> Option<f64> {
        match self {
            Monitor::ValLoss => r.val_loss,
            Monitor::ValAccuracy => r.val_accuracy.map(|a| -a),
            Monitor::Loss => Some(r.loss),
            Monitor::Accuracy => Some(-r.accuracy),
        }
    }
}

/// Keras' `EarlyStopping`: stop when the monitored number has not
/// improved on its best by more than `min_delta` for `patience`
/// consecutive epochs. An epoch whose record lacks the number (no
/// validation set) or holds NaN counts as not improving.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EarlyStopping {
    /// What to watch.
    pub monitor: Monitor,
    /// Epochs without improvement tolerated.
    pub patience: usize,
    /// The least change that counts as an improvement (≥ 0).
    pub min_delta: f64,
}

impl EarlyStopping {
    /// Stops after `patience` epochs without an improvement over
    /// `min_delta` in `monitor`.
    pub fn new(monitor: Monitor, patience: usize, min_delta: f64) -> Self {
        EarlyStopping {
            monitor,
            patience,
            min_delta: if min_delta.is_finite() {
                min_delta.abs()
            } else {
                0.0
            },
        }
    }

    /// The hook that applies it (its own best value and count of epochs
    /// without improvement; one hook per run).
    pub fn hook(self) -> EpochHook {
        let state: Mutex<(Option<f64>, usize)> = Mutex::new((None, 0));
        EpochHook::new(move |r| {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            let value = self.monitor.value(r).filter(|v| !v.is_nan());
            match (value, s.0) {
                (Some(v), best) if best.is_none_or(|b| v < b - self.min_delta) => {
                    *s = (Some(v), 0);
                }
                _ => s.1 += 1,
            }
            if s.1 >= self.patience.max(1) {
                EpochControl::Stop
            } else {
                EpochControl::Continue
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(loss: f64, val_accuracy: Option<f64>) -> EpochRecord {
        EpochRecord {
            loss,
            val_accuracy,
            ..EpochRecord::new(1)
        }
    }

    #[test]
    fn accuracy_counts_up_as_better_and_missing_values_do_not_improve() {
        let hook = EarlyStopping::new(Monitor::ValAccuracy, 2, 0.0).hook();
        assert_eq!(hook.call(&record(1.0, Some(0.5))), EpochControl::Continue);
        assert_eq!(hook.call(&record(1.0, Some(0.6))), EpochControl::Continue);
        assert_eq!(hook.call(&record(1.0, None)), EpochControl::Continue);
        assert_eq!(hook.call(&record(1.0, Some(0.6))), EpochControl::Stop);
        let nan = EarlyStopping::new(Monitor::Loss, 1, 0.0).hook();
        assert_eq!(nan.call(&record(f64::NAN, None)), EpochControl::Stop);
    }
}
