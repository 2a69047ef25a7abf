//! Progress output: a live bar on a terminal, one line per epoch otherwise.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::EpochRecord;

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
    bar: Option<ProgressBar>,
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
        match verbosity {
            Verbosity::Auto if tty => {
                let bar = ProgressBar::with_draw_target(
                    Some(batches as u64),
                    ProgressDrawTarget::stdout(),
                );
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(prefix.clone());
                bar.enable_steady_tick(Duration::from_millis(200));
                EpochProgress {
                    bar: Some(bar),
                    lines: false,
                    json: false,
                    prefix,
                }
            }
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
