//! Slow paths: calls a backend ran on something slower than the op's fast
//! kernel, counted so that they are never silent.
//!
//! A SIMD kernel set handles the common case of each op (contiguous
//! operands of one float type) and sends the rest — a transposed view, a
//! mixed-dtype pair, a reduction over middle axes — to its scalar loops. A
//! device backend may run an op it lacks on the host. The results are as
//! right as the fast path's, but a model that hits one in its inner loop
//! can run ten times slower with nothing to say why. So every backend that
//! has such paths counts them with a [`SlowPaths`] and reports them through
//! [`Backend::slow_paths`](crate::Backend::slow_paths); `kiln bench` and
//! `kiln train` print them, and with `KILN_LOG=slow-paths` (or
//! `KILN_LOG=debug`) the first call of each kind is logged to stderr as it
//! happens.
//!
//! ```
//! use kiln_core::slow_path::SlowPaths;
//!
//! let counts = SlowPaths::new("mydevice");
//! counts.record("binary", "strided operand");
//! counts.record("binary", "strided operand");
//! let seen = counts.snapshot();
//! assert_eq!(seen[0].calls, 2);
//! assert_eq!(seen[0].to_string(), "binary: 2 calls (strided operand)");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How many calls of one op took one slow path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SlowPath {
    /// The op: the [`Backend`](crate::Backend) method's name, or a finer
    /// one (the CUDA backend names unary and binary ops, e.g. `exp`).
    pub op: String,
    /// Why it was slow, e.g. `strided operand`, `mixed dtypes`, `ran on
    /// the CPU`.
    pub reason: String,
    /// Calls so far.
    pub calls: u64,
}

impl fmt::Display for SlowPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.calls == 1 { "" } else { "s" };
        write!(f, "{}: {} call{s} ({})", self.op, self.calls, self.reason)
    }
}

/// The calls in `after` that are not in `before` (counts subtracted; kinds
/// with no new calls left out): what one stretch of work added.
pub fn since(before: &[SlowPath], after: &[SlowPath]) -> Vec<SlowPath> {
    after
        .iter()
        .filter_map(|a| {
            let old = before
                .iter()
                .find(|b| b.op == a.op && b.reason == a.reason)
                .map_or(0, |b| b.calls);
            (a.calls > old).then(|| SlowPath {
                calls: a.calls - old,
                ..a.clone()
            })
        })
        .collect()
}

/// The words `KILN_LOG` may hold, comma-separated.
pub const LOG_TOPICS: &[&str] = &["slow-paths", "debug"];

/// `KILN_LOG` (empty when unset) and its words, each with whether it is
/// one of [`LOG_TOPICS`].
fn log_words() -> Result<(String, Vec<(String, bool)>)> {
    let v = crate::env::setting("KILN_LOG")?.unwrap_or_default();
    let words = v
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(|w| (w.to_string(), LOG_TOPICS.contains(&w)))
        .collect();
    Ok((v, words))
}

/// Checks `KILN_LOG` (backends call this when they are built, so a
/// misspelt topic is an error rather than a silence).
pub fn check_log_env() -> Result<()> {
    let (v, words) = log_words()?;
    match words.into_iter().find(|(_, known)| !known) {
        Some((w, _)) => Err(Error::invalid(format!(
            "KILN_LOG={v:?}: `{w}` is not a log topic; expected a comma-separated list of {}",
            LOG_TOPICS.join(", ")
        ))),
        None => Ok(()),
    }
}

/// A thread-safe count of slow-path calls, shared by clones (a backend and
/// its clones count into one).
#[derive(Clone, Debug)]
pub struct SlowPaths {
    who: Arc<str>,
    log: bool,
    counts: Arc<Mutex<BTreeMap<(&'static str, &'static str), u64>>>,
}

impl SlowPaths {
    /// An empty count for backend `who` (named in log lines). Logging is on
    /// when `KILN_LOG` names `slow-paths` or `debug` (comma-separated; a
    /// backend reports a word it does not know when it is built, through
    /// [`check_log_env`]).
    pub fn new(who: &str) -> Self {
        // A word it does not know is refused where the backend is built
        // (`check_log_env`), not here: the words it knows still count.
        let log = log_words().is_ok_and(|(_, words)| {
            words
                .iter()
                .any(|(w, known)| *known && matches!(w.as_str(), "slow-paths" | "debug"))
        });
        SlowPaths {
            who: who.into(),
            log,
            counts: Arc::default(),
        }
    }

    /// Counts one call of `op` that took the slow path `reason`; logs the
    /// first of its kind when logging is on.
    pub fn record(&self, op: &'static str, reason: &'static str) {
        let first = {
            let mut counts = self.lock();
            let n = counts.entry((op, reason)).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first && self.log {
            eprintln!(
                "kiln[{}]: {op} took a slow path ({reason}); further calls are counted \
                 (Backend::slow_paths, `kiln bench`)",
                self.who
            );
        }
    }

    /// Every kind seen so far, in op order.
    pub fn snapshot(&self) -> Vec<SlowPath> {
        self.lock()
            .iter()
            .map(|(&(op, reason), &calls)| SlowPath {
                op: op.into(),
                reason: reason.into(),
                calls,
            })
            .collect()
    }

    /// Sets every count back to zero (for all clones).
    pub fn reset(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(&'static str, &'static str), u64>> {
        // A panic elsewhere cannot leave a count half-written.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_counts_and_since_subtracts() {
        let a = SlowPaths::new("t");
        let b = a.clone();
        a.record("unary", "strided operand");
        let before = b.snapshot();
        b.record("unary", "strided operand");
        b.record("reduce", "max/min reduction");
        let added = since(&before, &a.snapshot());
        assert_eq!(
            added,
            vec![
                SlowPath {
                    op: "reduce".into(),
                    reason: "max/min reduction".into(),
                    calls: 1
                },
                SlowPath {
                    op: "unary".into(),
                    reason: "strided operand".into(),
                    calls: 1
                },
            ]
        );
        a.reset();
        assert!(b.snapshot().is_empty());
    }
}
