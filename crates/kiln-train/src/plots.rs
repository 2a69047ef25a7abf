//! Plots of a run: training curves (loss and accuracy, training against
//! validation) and the confusion matrix, each as SVG and PNG, drawn with
//! `plotters`.
//!
//! Laying out text needs a TrueType font (for both formats): the first of
//! [`FONT_PATHS`] found (Debian's `fonts-dejavu-core` provides one).
//! Without one no plot is drawn and [`Written::skipped`] says why — a run
//! never fails for want of a font.
//!
//! ```
//! use kiln_train::{plots, EpochRecord};
//!
//! let history: Vec<EpochRecord> = (1..=3)
//!     .map(|e| EpochRecord { loss: 1.0 / e as f64, accuracy: 0.3 * e as f64, ..EpochRecord::new(e) })
//!     .collect();
//! let dir = tempfile::tempdir().unwrap();
//! let w = plots::training_curves(&history, &dir.path().join("curves"))?;
//! // The SVG always; the PNG when a font is installed (else `skipped` says why).
//! assert!(w.files.iter().any(|f| f.extension().is_some_and(|e| e == "svg")));
//! assert!(w.files.iter().all(|f| std::fs::metadata(f).unwrap().len() > 0));
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_core::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::{ClassificationReport, EpochRecord};

/// Where PNG text's font is looked for, in order.
pub const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// The files a plot call wrote, and why any PNG was not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Why the plots were skipped, if they were.
    pub skipped: Option<String>,
}

/// Registers the PNG font once; `Err` says why there is none.
fn font() -> std::result::Result<(), String> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = FONT_PATHS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                "no plots: they need a TrueType font for their text (apt-get install fonts-dejavu-core)"
                    .to_string()
            })?;
        let bytes = std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))?;
        // plotters keeps fonts for the whole process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a usable TrueType font"))
    })
    .clone()
}

fn plot_error(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("drawing {what} to {}: {e}", path.display()))
}

/// The training curves of `history` (loss and accuracy, with validation
/// where recorded) to `stem.svg` and `stem.png`.
pub fn training_curves(history: &[EpochRecord], stem: &Path) -> Result<Written> {
    if history.is_empty() {
        return Err(Error::invalid("no epochs to plot"));
    }
    let mut written = Written::default();
    if let Err(why) = font() {
        written.skipped = Some(why);
        return Ok(written);
    }
    let svg = stem.with_extension("svg");
    {
        let root = SVGBackend::new(&svg, (1000, 420)).into_drawing_area();
        curves(&root, history).map_err(|e| plot_error("training curves", &svg, e))?;
        root.present()
            .map_err(|e| plot_error("training curves", &svg, e))?;
    }
    written.files.push(svg);
    let png = stem.with_extension("png");
    {
        let root = BitMapBackend::new(&png, (1000, 420)).into_drawing_area();
        curves(&root, history).map_err(|e| plot_error("training curves", &png, e))?;
        root.present()
            .map_err(|e| plot_error("training curves", &png, e))?;
    }
    written.files.push(png);
    Ok(written)
}

fn curves<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    history: &[EpochRecord],
) -> std::result::Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, 2));
    let epochs = history.len() as f64;
    type Pick = fn(&EpochRecord) -> (f64, Option<f64>);
    let series: [(&str, Pick); 2] = [
        ("loss", |r| (r.loss, r.val_loss)),
        ("accuracy", |r| (r.accuracy, r.val_accuracy)),
    ];
    for (panel, (name, pick)) in panels.iter().zip(series) {
        let points: Vec<(f64, f64, Option<f64>)> = history
            .iter()
            .map(|r| {
                let (t, v) = pick(r);
                (r.epoch as f64, t, v)
            })
            .collect();
        draw_panel(panel, name, "epoch", &points, 0.5..epochs + 0.5)?;
    }
    Ok(())
}

/// One chart of `name` against `x_desc`: the training series in blue and,
/// where every point has one, the validation series in red.
fn draw_panel<DB: DrawingBackend>(
    panel: &DrawingArea<DB, Shift>,
    name: &str,
    x_desc: &str,
    points: &[(f64, f64, Option<f64>)],
    x: std::ops::Range<f64>,
) -> std::result::Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let values = points
        .iter()
        .flat_map(|&(_, t, v)| std::iter::once(t).chain(v));
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    // No finite value at all: an axis around 0.
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
    let mut chart = ChartBuilder::on(panel)
        .caption(name, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x, value_axis(lo, hi))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|e| format!("{e:.0}"))
        .y_desc(name)
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|&(e, t, _)| (e, t)),
            BLUE.stroke_width(2),
        ))
        .map_err(err)?
        .label("training")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(2)));
    if points.iter().all(|p| p.2.is_some()) {
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|&(e, _, v)| (e, v.unwrap_or(f64::NAN))),
                RED.stroke_width(2),
            ))
            .map_err(err)?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// The value axis for finite values from `lo` to `hi`, padded by a tenth of
/// their span, and finite with a finite span whatever they are: plotters
/// searches for tick marks without end on an infinite range, which
/// values near f64's limits (a diverged run's 1.7e308 loss) would
/// otherwise make. Values beyond ±f64::MAX/4 lie off the axis.
fn value_axis(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let limit = f64::MAX / 4.0;
    let (lo, hi) = (lo.clamp(-limit, limit), hi.clamp(-limit, limit));
    // At least a thousandth of the values' size: 1e-3 added to 4e307 is
    // no padding at all.
    let pad = ((hi - lo) * 0.1)
        .max(1e-3)
        .max(lo.abs().max(hi.abs()) * 1e-3);
    (lo - pad)..(hi + pad)
}

/// A language model's loss curves (`history`'s evaluations: training and
/// validation loss against the iteration) to `stem.svg` and `stem.png`.
pub fn lm_curves(history: &[crate::lm::LmRecord], stem: &Path) -> Result<Written> {
    if history.is_empty() {
        return Err(Error::invalid("no evaluations to plot"));
    }
    let mut written = Written::default();
    if let Err(why) = font() {
        written.skipped = Some(why);
        return Ok(written);
    }
    let points: Vec<(f64, f64, Option<f64>)> = history
        .iter()
        .map(|r| (r.iter as f64, r.train_loss, Some(r.val_loss)))
        .collect();
    let last = points.last().map_or(1.0, |p| p.0).max(1.0);
    let svg = stem.with_extension("svg");
    {
        let root = SVGBackend::new(&svg, (700, 420)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| plot_error("loss curves", &svg, e))?;
        draw_panel(&root, "loss", "iteration", &points, 0.0..last)
            .map_err(|e| plot_error("loss curves", &svg, e))?;
        root.present()
            .map_err(|e| plot_error("loss curves", &svg, e))?;
    }
    written.files.push(svg);
    let png = stem.with_extension("png");
    {
        let root = BitMapBackend::new(&png, (700, 420)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| plot_error("loss curves", &png, e))?;
        draw_panel(&root, "loss", "iteration", &points, 0.0..last)
            .map_err(|e| plot_error("loss curves", &png, e))?;
        root.present()
            .map_err(|e| plot_error("loss curves", &png, e))?;
    }
    written.files.push(png);
    Ok(written)
}

/// The confusion matrix of `report` as a heat map with counts, to
/// `stem.svg` and `stem.png`.
pub fn confusion_matrix(report: &ClassificationReport, stem: &Path) -> Result<Written> {
    let mut written = Written::default();
    if let Err(why) = font() {
        written.skipped = Some(why);
        return Ok(written);
    }
    let svg = stem.with_extension("svg");
    {
        let root = SVGBackend::new(&svg, (720, 680)).into_drawing_area();
        heat(&root, report).map_err(|e| plot_error("the confusion matrix", &svg, e))?;
        root.present()
            .map_err(|e| plot_error("the confusion matrix", &svg, e))?;
    }
    written.files.push(svg);
    let png = stem.with_extension("png");
    {
        let root = BitMapBackend::new(&png, (720, 680)).into_drawing_area();
        heat(&root, report).map_err(|e| plot_error("the confusion matrix", &png, e))?;
        root.present()
            .map_err(|e| plot_error("the confusion matrix", &png, e))?;
    }
    written.files.push(png);
    Ok(written)
}

fn heat<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    r: &ClassificationReport,
) -> std::result::Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let n = r.classes.len();
    let title = format!(
        "{}: confusion matrix (accuracy {:.2}%)",
        r.dataset,
        100.0 * r.accuracy()
    );
    // Segmented axes: one band per class, labels at the bands' centres.
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(120)
        // A segmented `0..k` has k + 1 bands: `0..n − 1` gives the n classes.
        .build_cartesian_2d(
            (0..n.saturating_sub(1)).into_segmented(),
            (0..n.saturating_sub(1)).into_segmented(),
        )
        .map_err(err)?;
    let names = r.classes.clone();
    let centre = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) if *i < n => Some(*i),
        _ => None,
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("predicted")
        .y_desc("true")
        .x_labels(n)
        .y_labels(n)
        .x_label_formatter(&|v| centre(v).map_or(String::new(), |i| i.to_string()))
        .y_label_formatter(&|v| {
            // Row 0 at the top.
            centre(v).map_or(String::new(), |i| {
                let row = n.saturating_sub(1 + i);
                format!("{row} {}", names.get(row).map_or("", |s| s.as_str()))
            })
        })
        .draw()
        .map_err(err)?;
    let max = r
        .confusion
        .iter()
        .flatten()
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let cells = || {
        r.confusion
            .iter()
            .enumerate()
            .flat_map(move |(t, row)| row.iter().enumerate().map(move |(p, &v)| (n - 1 - t, p, v)))
    };
    chart
        .draw_series(cells().map(|(y, p, v)| {
            let shade = 1.0 - 0.85 * (v as f64 / max).sqrt();
            let color = RGBColor((255.0 * shade) as u8, (255.0 * shade) as u8, 255);
            Rectangle::new(
                [
                    (SegmentValue::Exact(p), SegmentValue::Exact(y)),
                    (SegmentValue::Exact(p + 1), SegmentValue::Exact(y + 1)),
                ],
                color.filled(),
            )
        }))
        .map_err(err)?;
    chart
        .draw_series(cells().map(|(y, p, v)| {
            let light = (v as f64 / max) > 0.5;
            let style = ("sans-serif", 13)
                .into_font()
                .color(if light { &WHITE } else { &BLACK })
                .pos(Pos::new(HPos::Center, VPos::Center));
            Text::new(
                v.to_string(),
                (SegmentValue::CenterOf(p), SegmentValue::CenterOf(y)),
                style,
            )
        }))
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::value_axis;

    #[test]
    fn the_value_axis_is_finite_with_a_finite_span_for_any_finite_values() {
        for (lo, hi) in [
            (0.5, 2.5),
            (1.0, 1.0),
            (0.1, 1.7e308),
            (-1.7e308, 2.0),
            (-f64::MAX, f64::MAX),
            (f64::MAX, f64::MAX),
        ] {
            let r = value_axis(lo, hi);
            assert!(
                r.start.is_finite() && r.end.is_finite() && (r.end - r.start).is_finite(),
                "{lo}..{hi} gave {r:?}"
            );
            assert!(r.start < r.end, "{lo}..{hi} gave {r:?}");
        }
        // Ordinary values keep their tenth of padding.
        let r = value_axis(1.0, 2.0);
        assert!(
            (r.start - 0.9).abs() < 1e-12 && (r.end - 2.1).abs() < 1e-12,
            "{r:?}"
        );
    }
}
