//! Progress output: a live bar on a terminal, one line per epoch otherwise.
//!
//! ```
//! use kiln_train::{FitConfig, Verbosity};
//!
//! // A bar on a terminal, a line per epoch otherwise (and always without the
//! // `progress` feature); `Json` prints each epoch's record as one JSON line.
//! assert_eq!(FitConfig::default().verbosity, Verbosity::Auto);
//! let quiet = FitConfig { verbosity: Verbosity::Silent, ..FitConfig::default() };
//! assert_eq!(quiet.verbosity, Verbosity::Silent);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::io::IsTerminal;

use crate::EpochRecord;
use bar::Bar;

/// Live bars (indicatif), with the `progress` feature.
#[cfg(feature = "progress")]
mod bar {
    use std::time::Duration;

    pub(crate) use indicatif::ProgressBar as Bar;
    use indicatif::{ProgressDrawTarget, ProgressStyle};

    /// A bar of `len` steps drawn on standard output with `template`.
    pub(crate) fn start(len: u64, template: &str, prefix: &str, position: u64) -> Option<Bar> {
        let bar = Bar::with_draw_target(Some(len), ProgressDrawTarget::stdout());
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(prefix.to_string());
        bar.set_position(position);
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(bar)
    }
}

/// No bars without the `progress` feature: a type with no values, so every
/// place that would draw one is the line-printing path.
#[cfg(not(feature = "progress"))]
mod bar {
    /// A bar that cannot exist.
    pub(crate) enum Bar {}

    impl Bar {
        pub(crate) fn set_message(&self, _: String) {
            match *self {}
        }
        pub(crate) fn inc(&self, _: u64) {
            match *self {}
        }
        pub(crate) fn set_position(&self, _: u64) {
            match *self {}
        }
        pub(crate) fn println(&self, _: String) {
            match *self {}
        }
        pub(crate) fn finish_and_clear(&self) {
            match *self {}
        }
    }

    /// Never a bar.
    pub(crate) fn start(_: u64, _: &str, _: &str, _: u64) -> Option<Bar> {
        None
    }
}

/// How much `fit` prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verbosity {
    /// Nothing.
    Silent,
    /// A bar per epoch on a terminal; a line per epoch otherwise.
    #[default]
    Auto,
    /// A line per epoch, even on a terminal.
    Lines,
    /// One JSON object (the epoch's record) per line.
    Json,
}

/// The progress display of one epoch.
pub(crate) struct EpochProgress {
    bar: Option<Bar>,
    lines: bool,
    json: bool,
    prefix: String,
}

impl EpochProgress {
    pub(crate) fn start(verbosity: Verbosity, epoch: usize, epochs: usize, batches: usize) -> Self {
        let prefix = format!(
            "epoch {epoch:>width$}/{epochs}",
            width = epochs.to_string().len()
        );
        let tty = std::io::stdout().is_terminal();
        let bar = (verbosity == Verbosity::Auto && tty)
            .then(|| {
                bar::start(
                    batches as u64,
                    "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
                    &prefix,
                    0,
                )
            })
            .flatten();
        match verbosity {
            Verbosity::Auto if bar.is_some() => EpochProgress {
                bar,
                lines: false,
                json: false,
                prefix,
            },
            Verbosity::Silent => EpochProgress {
                bar: None,
                lines: false,
                json: false,
                prefix,
            },
            Verbosity::Json => EpochProgress {
                bar: None,
                lines: false,
                json: true,
                prefix,
            },
            _ => EpochProgress {
                bar: None,
                lines: true,
                json: false,
                prefix,
            },
        }
    }

    pub(crate) fn update(&self, loss: f64, accuracy: f64, images_per_sec: f64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "loss {loss:.4} acc {accuracy:.4} {images_per_sec:>8.0} img/s"
            ));
            bar.inc(1);
        }
    }

    pub(crate) fn finish(self, r: &EpochRecord) {
        let mut line = format!("{} loss {:.4} acc {:.4}", self.prefix, r.loss, r.accuracy);
        if let (Some(vl), Some(va)) = (r.val_loss, r.val_accuracy) {
            line += &format!(" val_loss {vl:.4} val_acc {va:.4}");
        }
        if let (Some(scale), Some(skipped)) = (r.loss_scale, r.skipped_steps) {
            line += &format!(" loss_scale {scale} skipped {skipped}");
        }
        line += &format!(" {:.2}s {:.0} img/s", r.seconds, r.images_per_sec);
        if let (Some(n), Some(comm)) = (r.processes, r.comm_seconds) {
            line += &format!(" ({n} processes, {comm:.2}s communicating)");
        }
        if let Some(rss) = r.peak_rss_bytes {
            line += &format!(" {:.0} MiB peak", rss as f64 / (1 << 20) as f64);
        }
        line += &match r.energy_joules {
            Some(j) => format!(" {j:.1} J"),
            None => " energy n/a".to_string(),
        };
        if self.json {
            println!(
                "{}",
                serde_json::to_string(r).expect("a record always serialises")
            );
            return;
        }
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
            println!("{line}");
        } else if self.lines {
            println!("{line}");
        }
    }
}

/// The progress display of an iteration-based (language-model) run: a bar
/// over the steps on a terminal, one line per evaluation otherwise.
pub(crate) struct IterProgress {
    bar: Option<Bar>,
    lines: bool,
    json: bool,
    width: usize,
    iters: u64,
}

impl IterProgress {
    pub(crate) fn start(verbosity: Verbosity, done: u64, iters: u64) -> Self {
        let tty = std::io::stdout().is_terminal();
        let width = iters.to_string().len();
        let mut p = IterProgress {
            bar: None,
            lines: matches!(verbosity, Verbosity::Lines | Verbosity::Auto),
            json: verbosity == Verbosity::Json,
            width,
            iters,
        };
        if verbosity == Verbosity::Auto && tty {
            p.bar = bar::start(
                iters,
                "iter [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
                "",
                done,
            );
        }
        p
    }

    pub(crate) fn update(&self, iter: u64, loss: f64, tokens_per_sec: f64) {
        if let Some(bar) = &self.bar {
            let rss = crate::observe::peak_rss_bytes().map_or(String::new(), |b| {
                format!(" {:.0} MiB", b as f64 / (1 << 20) as f64)
            });
            bar.set_message(format!("loss {loss:.4} {tokens_per_sec:>7.0} tok/s{rss}"));
            bar.set_position(iter);
        }
    }

    pub(crate) fn record(&self, r: &crate::lm::LmRecord) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string(r).expect("a record always serialises")
            );
            return;
        }
        let mut line = format!(
            "iter {:>w$}/{} train_loss {:.4} val_loss {:.4} lr {:.2e} {:.2} it/s {:.0} tok/s",
            r.iter,
            self.iters,
            r.train_loss,
            r.val_loss,
            r.lr,
            r.iters_per_sec,
            r.tokens_per_sec,
            w = self.width
        );
        if let (Some(n), Some(comm)) = (r.processes, r.comm_seconds) {
            line += &format!(" ({n} processes, {comm:.2}s communicating)");
        }
        if let Some(rss) = r.peak_rss_bytes {
            line += &format!(" {:.0} MiB peak", rss as f64 / (1 << 20) as f64);
        }
        match &self.bar {
            Some(bar) => bar.println(line),
            None if self.lines => println!("{line}"),
            None => {}
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
