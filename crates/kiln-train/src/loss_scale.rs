//! Dynamic loss scaling for f16 training.
//!
//! f16 gradients underflow below 2⁻²⁴ ≈ 6·10⁻⁸, where many of a network's
//! gradients live. Multiplying the loss by a scale `S` before the backward
//! pass multiplies every gradient by `S`, lifting them into f16's range; the
//! f32 master gradients are divided by `S` again before the optimiser step.
//! Too large a scale overflows: then some gradient is ±∞ or NaN, the step
//! is skipped (the weights and the optimiser state are untouched) and `S`
//! is halved. After [`GROWTH_INTERVAL`] finite steps in a row `S` doubles,
//! so the scale tracks the largest one that does not overflow.
//!
//! ```
//! use kiln_train::LossScaler;
//!
//! let mut s = LossScaler::default();
//! let start = s.scale;
//! // A step with non-finite gradients is skipped and the scale halves.
//! assert!(!s.update(false)?);
//! assert_eq!(s.scale, start / 2.0);
//! assert_eq!(s.skipped_this_epoch, 1);
//! // Finite steps are applied.
//! assert!(s.update(true)?);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use kiln_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// The first scale, 2¹⁶ (as PyTorch's `GradScaler`).
pub const INITIAL_SCALE: f32 = 65536.0;
/// Finite steps in a row after which the scale doubles.
pub const GROWTH_INTERVAL: u32 = 2000;
/// The largest scale (f16's largest finite value is 65504; a gradient
/// scaled past 2²⁴ overflows f16 wherever it is ≥ 2⁻⁸).
pub const MAX_SCALE: f32 = 16_777_216.0;
/// Below this the gradients are not finite at any useful scale: training
/// has diverged, and [`LossScaler::update`] reports it instead of skipping
/// every step in silence.
pub const MIN_SCALE: f32 = 1.0 / 16_777_216.0;

/// The scaler's state; saved in checkpoints so a resumed run scales (and
/// skips) exactly as an uninterrupted one.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f32,
    /// Finite steps since the scale last changed.
    pub good_steps: u32,
    /// Steps skipped in the current epoch.
    pub skipped_this_epoch: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: INITIAL_SCALE,
            good_steps: 0,
            skipped_this_epoch: 0,
        }
    }
}

impl LossScaler {
    /// Records a step whose gradients were (`finite`) or were not all
    /// finite, adjusting the scale. Returns whether the step should be
    /// applied. An error when the scale falls below [`MIN_SCALE`].
    pub fn update(&mut self, finite: bool) -> Result<bool> {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= GROWTH_INTERVAL {
                self.scale = (self.scale * 2.0).min(MAX_SCALE);
                self.good_steps = 0;
            }
            return Ok(true);
        }
        self.good_steps = 0;
        self.skipped_this_epoch += 1;
        self.scale *= 0.5;
        if self.scale < MIN_SCALE {
            return Err(Error::invalid(format!(
                "f16 training diverged: the gradients are not finite even with the loss scaled by {:e}; \
                 lower the learning rate or train with --precision bf16 or f32",
                self.scale * 2.0
            )));
        }
        Ok(false)
    }

    /// Starts counting skipped steps for a new epoch.
    pub fn start_epoch(&mut self) {
        self.skipped_this_epoch = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_skips_a_run_of_finite_steps_doubles() {
        let mut s = LossScaler::default();
        assert!(!s.update(false).unwrap());
        assert!(!s.update(false).unwrap());
        assert_eq!(s.scale, INITIAL_SCALE / 4.0);
        assert_eq!(s.skipped_this_epoch, 2);
        for i in 1..GROWTH_INTERVAL {
            assert!(s.update(true).unwrap());
            assert_eq!(s.good_steps, i);
        }
        assert!(s.update(true).unwrap());
        assert_eq!((s.scale, s.good_steps), (INITIAL_SCALE / 2.0, 0));
        // An overflow resets the run of good steps.
        s.update(true).unwrap();
        s.update(false).unwrap();
        assert_eq!((s.scale, s.good_steps), (INITIAL_SCALE / 4.0, 0));
        s.start_epoch();
        assert_eq!(s.skipped_this_epoch, 0);
    }

    #[test]
    fn the_scale_is_capped_and_a_collapse_is_an_error() {
        let mut s = LossScaler {
            scale: MAX_SCALE,
            good_steps: GROWTH_INTERVAL - 1,
            skipped_this_epoch: 0,
        };
        s.update(true).unwrap();
        assert_eq!(s.scale, MAX_SCALE);
        let mut s = LossScaler::default();
        let err = (0..100)
            .find_map(|_| s.update(false).err())
            .expect("the scale must not shrink forever");
        assert!(err.to_string().contains("f16 training diverged"), "{err}");
    }
}
