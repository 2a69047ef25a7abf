//! Evaluation metrics: a classification report (accuracy, top-k, per-class
//! and macro precision / recall / F1, the confusion matrix) and regression
//! errors (MSE, RMSE, MAE), with a readable text form and JSON.
//!
//! ```
//! use kiln_train::ClassificationReport;
//!
//! let mut r = ClassificationReport::new("toy", vec!["a".into(), "b".into()], &[1, 2]);
//! // Scores per example (any monotone scale) and labels.
//! r.add(&[0.9, 0.1, 0.2, 0.8, 0.6, 0.4], &[0, 1, 1], 0.5);
//! r.finish();
//! assert!((r.accuracy() - 2.0 / 3.0).abs() < 1e-12);
//! assert_eq!(r.confusion, [[1, 0], [1, 1]]);
//! assert_eq!(r.class(1).recall, 0.5);
//! assert_eq!(r.top_k[1], (2, 1.0)); // with two classes, top-2 always hits
//! # Ok::<(), kiln_core::Error>(())
//! ```

use serde::{Deserialize, Serialize};

/// What a classifier did on a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport {
    /// The dataset's name.
    pub dataset: String,
    /// Class names, in label order.
    pub classes: Vec<String>,
    /// Examples evaluated.
    pub examples: usize,
    /// Mean loss per example.
    pub loss: f64,
    /// `confusion[t][p]`: examples of true class `t` predicted as `p`.
    pub confusion: Vec<Vec<u64>>,
    /// `(k, fraction)`: how often the label is among the `k` most probable classes.
    pub top_k: Vec<(usize, f64)>,
    /// Seconds the model's forward passes took, up to the device's results
    /// being ready ([`crate::Trainer::report`] measures them, after one
    /// untimed warm-up pass over the first batch; 0 for a report built by
    /// hand). The rest of an evaluation — batches of bytes made f32 (and
    /// cast to bf16 or f16 for a model computing in one), the loss, this
    /// report's counts — is not in it, so `examples / forward_seconds` is
    /// the model's own steady inference rate.
    #[serde(default)]
    pub forward_seconds: f64,
    /// Seconds the untimed warm-up pass took (its forward pass over the
    /// first batch; 0 for a report built by hand): not in
    /// `forward_seconds`, and for a caller timing the whole evaluation, the
    /// time that was not evaluation.
    #[serde(default)]
    pub warmup_seconds: f64,
}

/// Precision, recall and F1 of one class (or their macro average).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassScores {
    /// Of the examples predicted as the class, the fraction that are.
    pub precision: f64,
    /// Of the class's examples, the fraction predicted as it.
    pub recall: f64,
    /// The harmonic mean of the two (0 when both are 0).
    pub f1: f64,
    /// The class's examples.
    pub support: u64,
}

impl ClassificationReport {
    /// An empty report for `classes`.
    pub fn new(dataset: &str, classes: Vec<String>, ks: &[usize]) -> Self {
        let c = classes.len();
        ClassificationReport {
            dataset: dataset.to_string(),
            classes,
            examples: 0,
            loss: 0.0,
            confusion: vec![vec![0; c]; c],
            top_k: ks.iter().map(|&k| (k, 0.0)).collect(),
            forward_seconds: 0.0,
            warmup_seconds: 0.0,
        }
    }

    /// Adds a batch: each example's class scores (`scores[i·c..(i+1)·c]`,
    /// any monotone scale) and label, and the batch's mean loss.
    pub fn add(&mut self, scores: &[f32], labels: &[u32], batch_loss: f64) {
        let c = self.classes.len().max(1);
        let before = self.examples as f64;
        for (row, &label) in scores.chunks_exact(c).zip(labels) {
            let label = label as usize;
            // The first maximum, NaN counting as maximal (as argmax).
            let pred = row.iter().enumerate().fold(0, |b, (j, &v)| {
                if !row[b].is_nan() && (v.is_nan() || v > row[b]) {
                    j
                } else {
                    b
                }
            });
            if label < c {
                self.confusion[label][pred] += 1;
                // Rank of the label in argmax's order: the classes that
                // score higher, or as high at a lower index (NaN highest),
                // so that top-1 is exactly the accuracy, ties included.
                let l = row[label];
                let ahead = |(j, &v): &(usize, &f32)| match (v.is_nan(), l.is_nan()) {
                    (true, true) => *j < label,
                    (true, false) => true,
                    (false, true) => false,
                    (false, false) => v > l || (v == l && *j < label),
                };
                let rank = row.iter().enumerate().filter(ahead).count();
                for (k, hits) in &mut self.top_k {
                    if rank < *k {
                        *hits += 1.0;
                    }
                }
            }
            self.examples += 1;
        }
        let n = labels.len() as f64;
        self.loss = (self.loss * before + batch_loss * n) / (before + n).max(1.0);
    }

    /// Turns the top-k hit counts into fractions (call once, after the last batch).
    pub fn finish(&mut self) {
        let n = self.examples.max(1) as f64;
        for (_, hits) in &mut self.top_k {
            *hits /= n;
        }
    }

    /// The fraction of examples whose top class is the label.
    pub fn accuracy(&self) -> f64 {
        let right: u64 = (0..self.classes.len()).map(|i| self.confusion[i][i]).sum();
        right as f64 / self.examples.max(1) as f64
    }

    /// Scores of class `c`.
    pub fn class(&self, c: usize) -> ClassScores {
        let tp = self.confusion[c][c] as f64;
        let predicted: u64 = self.confusion.iter().map(|row| row[c]).sum();
        let support: u64 = self.confusion[c].iter().sum();
        let ratio = |a: f64, b: u64| if b == 0 { 0.0 } else { a / b as f64 };
        let (precision, recall) = (ratio(tp, predicted), ratio(tp, support));
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        ClassScores {
            precision,
            recall,
            f1,
            support,
        }
    }

    /// The unweighted mean of the classes' scores.
    pub fn macro_average(&self) -> ClassScores {
        let c = self.classes.len().max(1) as f64;
        let all: Vec<ClassScores> = (0..self.classes.len()).map(|i| self.class(i)).collect();
        ClassScores {
            precision: all.iter().map(|s| s.precision).sum::<f64>() / c,
            recall: all.iter().map(|s| s.recall).sum::<f64>() / c,
            f1: all.iter().map(|s| s.f1).sum::<f64>() / c,
            support: all.iter().map(|s| s.support).sum(),
        }
    }

    /// The report as JSON, with the per-class and macro scores spelled out.
    pub fn to_json(&self) -> String {
        let per_class: Vec<_> = (0..self.classes.len())
            .map(|i| (self.classes[i].clone(), self.class(i)))
            .collect();
        serde_json::to_string_pretty(&serde_json::json!({
            "dataset": self.dataset,
            "examples": self.examples,
            "loss": self.loss,
            "accuracy": self.accuracy(),
            "forward_seconds": self.forward_seconds,
            "warmup_seconds": self.warmup_seconds,
            "top_k": self.top_k.iter().map(|(k, v)| serde_json::json!({"k": k, "accuracy": v})).collect::<Vec<_>>(),
            "per_class": per_class.iter().map(|(n, s)| serde_json::json!({"class": n, "precision": s.precision, "recall": s.recall, "f1": s.f1, "support": s.support})).collect::<Vec<_>>(),
            "macro": self.macro_average(),
            "classes": self.classes,
            "confusion": self.confusion,
        }))
        .expect("a report always serialises")
    }

    /// A readable report: summary, per-class table, confusion matrix.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} examples of {}: accuracy {:.2}%, loss {:.4}",
            self.examples,
            self.dataset,
            100.0 * self.accuracy(),
            self.loss
        );
        for (k, v) in &self.top_k {
            out += &format!(", top-{k} {:.2}%", 100.0 * v);
        }
        let w = self
            .classes
            .iter()
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(5)
            .max(9);
        out += &format!("\n\n{:<w$}  precision  recall     f1  support\n", "class");
        for (i, name) in self.classes.iter().enumerate() {
            let s = self.class(i);
            out += &format!(
                "{name:<w$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}\n",
                s.precision, s.recall, s.f1, s.support
            );
        }
        let m = self.macro_average();
        out += &format!(
            "{:<w$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}\n",
            "macro avg", m.precision, m.recall, m.f1, m.support
        );
        out += "\nconfusion matrix (rows: true class, columns: predicted)\n";
        let cw = self
            .confusion
            .iter()
            .flatten()
            .map(|v| v.to_string().len())
            .max()
            .unwrap_or(1)
            .max(3);
        out += &format!("{:<w$} ", "");
        for j in 0..self.classes.len() {
            out += &format!(" {j:>cw$}");
        }
        out.push('\n');
        for (i, row) in self.confusion.iter().enumerate() {
            out += &format!(
                "{:<w$} ",
                format!("{i} {}", self.classes[i])
                    .chars()
                    .take(w)
                    .collect::<String>()
            );
            for v in row {
                out += &format!(" {v:>cw$}");
            }
            out.push('\n');
        }
        out
    }
}

/// Errors of a regression: mean squared, its root, mean absolute.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegressionReport {
    /// Mean squared error.
    pub mse: f64,
    /// Root of the mean squared error.
    pub rmse: f64,
    /// Mean absolute error.
    pub mae: f64,
    /// Values compared.
    pub count: usize,
}

/// Compares predictions with targets, element by element (in f64).
pub fn regression(predicted: &[f32], target: &[f32]) -> RegressionReport {
    let n = predicted.len().min(target.len());
    let (mut sq, mut abs) = (0f64, 0f64);
    for (&p, &t) in predicted.iter().zip(target) {
        let d = f64::from(p) - f64::from(t);
        sq += d * d;
        abs += d.abs();
    }
    let mse = sq / n.max(1) as f64;
    RegressionReport {
        mse,
        rmse: mse.sqrt(),
        mae: abs / n.max(1) as f64,
        count: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_match_a_hand_computed_confusion_matrix() {
        let mut r =
            ClassificationReport::new("t", vec!["a".into(), "b".into(), "c".into()], &[1, 2]);
        // Labels a, a, b, b, c, c; predictions a, b, b, b, a, c.
        let scores = [
            [0.9, 0.1, 0.0],
            [0.2, 0.7, 0.1],
            [0.1, 0.8, 0.1],
            [0.3, 0.6, 0.1],
            [0.5, 0.1, 0.4],
            [0.1, 0.2, 0.7],
        ];
        let flat: Vec<f32> = scores.iter().flatten().copied().collect();
        r.add(&flat, &[0, 0, 1, 1, 2, 2], 0.5);
        r.finish();
        assert_eq!(
            r.confusion,
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 1]]
        );
        assert!((r.accuracy() - 4.0 / 6.0).abs() < 1e-12);
        let a = r.class(0);
        assert!((a.precision - 0.5).abs() < 1e-12 && (a.recall - 0.5).abs() < 1e-12);
        let b = r.class(1);
        assert!((b.precision - 2.0 / 3.0).abs() < 1e-12 && (b.recall - 1.0).abs() < 1e-12);
        assert!((b.f1 - 0.8).abs() < 1e-12);
        let c = r.class(2);
        assert!((c.precision - 1.0).abs() < 1e-12 && (c.recall - 0.5).abs() < 1e-12);
        let m = r.macro_average();
        assert!((m.precision - (0.5 + 2.0 / 3.0 + 1.0) / 3.0).abs() < 1e-12);
        // Top-2: the second example's label (a, 0.2) ranks second: a hit;
        // the fifth's (c, 0.4) ranks second: a hit. All six are in the top 2.
        assert_eq!(r.top_k, vec![(1, 4.0 / 6.0), (2, 1.0)]);
        assert!(r.render().contains("macro avg"));
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["confusion"][2][0], 1);
    }

    #[test]
    fn ties_rank_as_argmax_breaks_them_so_top_1_is_the_accuracy() {
        // An all-zero model: every score ties. Argmax picks class 0, so only
        // the label-0 examples are hits, at top-1 as in the accuracy.
        let names: Vec<String> = (0..4).map(|i| i.to_string()).collect();
        let mut r = ClassificationReport::new("t", names, &[1, 2, 4]);
        r.add(&[0.0; 16], &[0, 1, 2, 3], 0.0);
        // NaN counts as the maximum, first NaN first.
        r.add(&[0.5, f32::NAN, 0.9, f32::NAN], &[3], 0.0);
        r.add(&[0.5, f32::NAN, 0.9, f32::NAN], &[1], 0.0);
        r.finish();
        assert!((r.accuracy() - 2.0 / 6.0).abs() < 1e-12);
        assert_eq!(r.top_k[0], (1, r.accuracy()));
        // Label 1 of the all-zero rows ranks second; label 3 of the NaN row too.
        assert_eq!(r.top_k[1], (2, 4.0 / 6.0));
        assert_eq!(r.top_k[2], (4, 1.0));
    }

    #[test]
    fn regression_errors() {
        let r = regression(&[1.0, 2.0, 4.0], &[1.0, 3.0, 2.0]);
        assert!((r.mse - 5.0 / 3.0).abs() < 1e-12);
        assert!((r.mae - 1.0).abs() < 1e-12);
        assert!((r.rmse - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
