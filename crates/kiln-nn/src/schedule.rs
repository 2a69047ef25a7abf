//! Learning-rate schedules, and clipping gradients by their global norm:
//! the training-loop pieces every model can use.

use kiln_core::{Backend, Error, GradStore, Result, Var};

/// A learning rate as a function of the optimiser step.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LrSchedule {
    /// The same rate at every step.
    Constant(f32),
    /// Linear warm-up then cosine decay (GPT training, as nanoGPT): step
    /// `i` (from 0) gets `peak·(i+1)/(warmup+1)` while `i < warmup`, then
    /// `min + ½(1 + cos(π·r))·(peak − min)` with `r = (i − warmup)/(decay
    /// − warmup)`, and `min` after `decay` steps.
    WarmupCosine {
        /// The rate at the end of the warm-up.
        peak: f32,
        /// The rate the decay ends at (nanoGPT: peak / 10).
        min: f32,
        /// Warm-up steps.
        warmup: u64,
        /// The step the decay reaches `min` (usually the run's length).
        decay: u64,
    },
}

impl LrSchedule {
    /// Checks the numbers: finite rates with 0 ≤ min ≤ peak, peak > 0, and
    /// warm-up ≤ decay.
    pub fn check(&self) -> Result<()> {
        match *self {
            LrSchedule::Constant(lr) if lr.is_finite() && lr > 0.0 => Ok(()),
            LrSchedule::WarmupCosine {
                peak,
                min,
                warmup,
                decay,
            } if peak.is_finite()
                && peak > 0.0
                && min.is_finite()
                && (0.0..=peak).contains(&min)
                && warmup <= decay =>
            {
                Ok(())
            }
            other => Err(Error::invalid(format!(
                "learning-rate schedule {other:?}: rates must be finite with 0 ≤ min ≤ peak, peak > 0, and warm-up ≤ decay steps"
            ))),
        }
    }

    /// The rate at step `i` (0-based).
    ///
    /// ```
    /// use kiln_nn::LrSchedule;
    /// let s = LrSchedule::WarmupCosine { peak: 1e-3, min: 1e-4, warmup: 100, decay: 2000 };
    /// assert!((s.at(0) - 1e-3 / 101.0).abs() < 1e-9);
    /// assert_eq!(s.at(100), 1e-3);
    /// assert!((s.at(1050) - 5.5e-4).abs() < 1e-7); // half-way down the cosine
    /// assert_eq!(s.at(5000), 1e-4);
    /// ```
    pub fn at(&self, i: u64) -> f32 {
        match *self {
            LrSchedule::Constant(lr) => lr,
            LrSchedule::WarmupCosine {
                peak,
                min,
                warmup,
                decay,
            } => {
                if i < warmup {
                    return (f64::from(peak) * (i + 1) as f64 / (warmup + 1) as f64) as f32;
                }
                if i >= decay {
                    return min;
                }
                let r = (i - warmup) as f64 / (decay - warmup).max(1) as f64;
                let coeff = 0.5 * (1.0 + (std::f64::consts::PI * r).cos());
                (f64::from(min) + coeff * f64::from(peak - min)) as f32
            }
        }
    }
}

/// Scales the gradients of `params` so that their global norm is at most
/// `max_norm` (as `torch.nn.utils.clip_grad_norm_`: by `max_norm/(norm +
/// 1e-6)` when the norm exceeds it) and returns the norm before clipping.
/// The norm is summed in parameter order, so it is reproducible bit for bit.
pub fn clip_grad_norm<B: Backend>(
    grads: &mut GradStore<B>,
    params: &[&Var<B>],
    max_norm: f32,
) -> Result<f32> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::invalid(format!(
            "the gradient-norm limit must be finite and positive, got {max_norm}"
        )));
    }
    let ids: Vec<_> = params.iter().map(|p| p.id()).collect();
    let norm = grads.global_norm(&ids)?;
    if norm > max_norm {
        grads.scale(max_norm / (norm + 1e-6))?;
    }
    Ok(norm)
}
