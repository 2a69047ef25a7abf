//! The record of a training run, one JSON object per epoch.
//!
//! ```
//! use kiln_train::History;
//!
//! // One JSON object per epoch, one per line (`history.jsonl` beside a run).
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("history.jsonl");
//! let line = r#"{"epoch":1,"loss":0.5,"accuracy":0.8,"lr":0.001,"seconds":2.0,"images_per_sec":30000.0}"#;
//! std::fs::write(&path, format!("{line}\n")).unwrap();
//! let h = History::read_jsonl(&path)?;
//! let last = h.last().unwrap();
//! assert_eq!((last.epoch, last.accuracy, last.precision.as_str()), (1, 0.8, "f32"));
//! History::append_jsonl(&path, last)?;
//! assert_eq!(History::read_jsonl(&path)?.epochs.len(), 2);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::io::Write;
use std::path::Path;

use kiln_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// What one epoch measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's examples.
    pub loss: f64,
    /// Training accuracy over the epoch's examples (0 for a regression set).
    pub accuracy: f64,
    /// Validation loss, if a validation set was given.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    /// Validation accuracy, if a validation set was given.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_accuracy: Option<f64>,
    /// Learning rate during the epoch.
    pub lr: f64,
    /// Wall-clock seconds of the training pass (validation excluded).
    pub seconds: f64,
    /// Training examples per second.
    pub images_per_sec: f64,
    /// The process's peak resident memory at the epoch's end, in bytes
    /// (`null` where the platform does not report it).
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
    /// Energy the CPU packages used during the training pass, in joules
    /// (`null` where the machine exposes no RAPL counters).
    #[serde(default)]
    pub energy_joules: Option<f64>,
    /// The precision the epoch was trained in (`f32`, `bf16`, `f16`).
    #[serde(default = "default_precision")]
    pub precision: String,
    /// The loss scale at the epoch's end (f16 training only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss_scale: Option<f64>,
    /// Steps skipped in the epoch because a scaled gradient overflowed
    /// (f16 training only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub skipped_steps: Option<u64>,
    /// The processes a data-parallel run trained on (absent when alone).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub processes: Option<usize>,
    /// Seconds of the training pass this rank spent exchanging gradients
    /// and step totals with the others (data-parallel runs only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub comm_seconds: Option<f64>,
}

/// What records and checkpoints from before mixed precision were trained in.
impl EpochRecord {
    /// A record of epoch `epoch` with zero losses, accuracy, rate and
    /// times, f32 precision and no optional measurements: a start for
    /// tests and examples (`fit` fills every field).
    pub fn new(epoch: usize) -> Self {
        EpochRecord {
            epoch,
            loss: 0.0,
            accuracy: 0.0,
            val_loss: None,
            val_accuracy: None,
            lr: 0.0,
            seconds: 0.0,
            images_per_sec: 0.0,
            peak_rss_bytes: None,
            energy_joules: None,
            precision: default_precision(),
            loss_scale: None,
            skipped_steps: None,
            processes: None,
            comm_seconds: None,
        }
    }
}

pub(crate) fn default_precision() -> String {
    "f32".to_string()
}

/// Every epoch of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// The epochs, in order.
    pub epochs: Vec<EpochRecord>,
}

impl History {
    /// The last epoch, if any.
    pub fn last(&self) -> Option<&EpochRecord> {
        self.epochs.last()
    }

    /// Appends one record as a JSON line to `path` (creating it).
    pub fn append_jsonl(path: &Path, record: &EpochRecord) -> Result<()> {
        append_record(path, record)
    }

    /// Reads a JSON-lines history file.
    pub fn read_jsonl(path: &Path) -> Result<Self> {
        Ok(History {
            epochs: read_records(path, "an epoch record")?,
        })
    }
}

/// Appends `record` as one JSON line to `path` (creating it).
pub(crate) fn append_record<T: Serialize>(path: &Path, record: &T) -> Result<()> {
    let line = serde_json::to_string(record).map_err(|e| Error::invalid(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// `records` as a JSON-lines file at `path`, written atomically: where a
/// run's history starts, before its records are appended.
pub(crate) fn write_records<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text += &serde_json::to_string(r).map_err(|e| Error::invalid(e.to_string()))?;
        text.push('\n');
    }
    crate::model_file::write_atomic(path, text.as_bytes())
}

/// The records of a JSON-lines history file (blank lines skipped); a line
/// that is not `what` is an error naming the file and the line.
pub(crate) fn read_records<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
) -> Result<Vec<T>> {
    parse_records(
        &kiln_core::files::read_to_string(path, "history")?,
        path,
        what,
    )
}

/// A run's history, either kind: what `kiln plot` draws.
#[derive(Clone, Debug, PartialEq)]
pub enum Curves {
    /// An image model's: a record per epoch.
    Epochs(Vec<EpochRecord>),
    /// A language model's: a record per evaluation.
    Evaluations(Vec<crate::LmRecord>),
}

/// Reads a history file of either kind, once: its first record says
/// which (a language model's records count steps, `iter`).
pub fn read_curves(path: &Path) -> Result<Curves> {
    let text = kiln_core::files::read_to_string(path, "history")?;
    let lm = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .is_some_and(|v| v.get("iter").is_some());
    Ok(match lm {
        true => Curves::Evaluations(parse_records(
            &text,
            path,
            "a language model's evaluation record",
        )?),
        false => Curves::Epochs(parse_records(&text, path, "an epoch record")?),
    })
}

/// [`read_records`] on the file's text.
fn parse_records<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
    what: &str,
) -> Result<Vec<T>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                Error::invalid(format!("{}:{}: not {what}: {e}", path.display(), i + 1))
            })
        })
        .collect()
}
