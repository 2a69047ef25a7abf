//! Losses.
//!
//! ```
//! use kiln_core::{HostData, Tensor};
//! use kiln_cpu::CpuBackend;
//! use kiln_nn::Loss;
//!
//! let b = CpuBackend::reference();
//! // Two examples' logits over 3 classes, and their labels (u32).
//! let logits = Tensor::from_slice(&[0.0, 0.0, 0.0, 10.0, 0.0, 0.0], &[2, 3], &b)?;
//! let labels = Tensor::from_host(HostData::U32(vec![1, 0]), &[2], &b)?;
//! let l = Loss::CategoricalCrossEntropy.compute(&logits, &labels)?.to_scalar_f32()?;
//! // ln 3 for the undecided example, about 0 for the confident one; the mean of the two.
//! assert!((l - 3f32.ln() / 2.0).abs() < 1e-3);
//! let mse = Loss::MeanSquaredError.compute(&logits, &logits)?.to_scalar_f32()?;
//! assert_eq!(mse, 0.0);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use kiln_core::{Backend, DType, Error, Result, Tensor};
use serde::{Deserialize, Serialize};

/// A training objective, reduced to the batch mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Categorical cross-entropy on class indices, computed from logits with
    /// a fused softmax (numerically stable; a model ending in softmax hands
    /// over its logits instead, see [`crate::Sequential::forward_logits`]).
    CategoricalCrossEntropy,
    /// Mean squared error against targets of the output's shape.
    MeanSquaredError,
}

impl Loss {
    /// Whether the loss wants logits rather than probabilities.
    pub fn wants_logits(self) -> bool {
        self == Loss::CategoricalCrossEntropy
    }

    /// The mean loss of a batch: `output` are logits (cross-entropy) or
    /// predictions (MSE); `targets` are u32 class labels `[n]` or f32 values.
    pub fn compute<B: Backend>(self, output: &Tensor<B>, targets: &Tensor<B>) -> Result<Tensor<B>> {
        match self {
            Loss::CategoricalCrossEntropy => output.softmax_cross_entropy(targets),
            Loss::MeanSquaredError => {
                if targets.dtype() != DType::F32 || targets.dims() != output.dims() {
                    return Err(Error::shape(
                        "mean_squared_error",
                        format!(
                            "targets are {} {}, predictions {} f32",
                            targets.shape(),
                            targets.dtype(),
                            output.shape()
                        ),
                    ));
                }
                output.sub(targets)?.square()?.mean_all()
            }
        }
    }
}
