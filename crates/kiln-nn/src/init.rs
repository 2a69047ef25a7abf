//! Weight initialisers, drawing from the backend's counter-based RNG.
//!
//! ```
//! use kiln_cpu::CpuBackend;
//! use kiln_nn::Initializer;
//!
//! let b = CpuBackend::reference();
//! // A 784 → 64 kernel, Glorot uniform: |w| ≤ √(6 / (784 + 64)).
//! let w = Initializer::GlorotUniform.init(&[784, 64], 784, 64, 42, 0, &b)?;
//! let limit = (6.0f32 / (784.0 + 64.0)).sqrt();
//! assert!(w.to_vec_f32()?.iter().all(|v| v.abs() <= limit));
//! // The same seed and offset draw the same weights, on any backend.
//! let again = Initializer::GlorotUniform.init(&[784, 64], 784, 64, 42, 0, &b)?;
//! assert_eq!(w.to_vec_f32()?, again.to_vec_f32()?);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use kiln_core::{Backend, DType, Distribution, Result, Tensor};
use serde::{Deserialize, Serialize};

/// How a weight tensor starts out. `fan_in`/`fan_out` are a dense kernel's
/// input and output sizes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Initializer {
    /// All zeros (biases).
    Zeros,
    /// Glorot/Xavier uniform: U(−l, l) with l = √(6 / (fan_in + fan_out)) (Keras' default).
    GlorotUniform,
    /// He uniform: U(−l, l) with l = √(6 / fan_in).
    HeUniform,
    /// He normal: N(0, 2 / fan_in).
    HeNormal,
    /// N(0, std²) whatever the fans — GPT-2's 0.02 for every weight, and
    /// 0.02/√(2·layers) for the projections into the residual stream. In a
    /// TOML spec: `kernel_init = { normal = { std = 0.02 } }`.
    Normal {
        /// The standard deviation, finite and positive.
        std: f32,
    },
}

impl Initializer {
    /// A tensor of shape `dims` drawn for the given fans, from the Philox
    /// stream `(seed, offset)`.
    pub fn init<B: Backend>(
        self,
        dims: &[usize],
        fan_in: usize,
        fan_out: usize,
        seed: u64,
        offset: u64,
        backend: &B,
    ) -> Result<Tensor<B>> {
        let (fi, fo) = (fan_in.max(1) as f64, fan_out.max(1) as f64);
        let dist = match self {
            Initializer::Zeros => return Tensor::zeros(dims, DType::F32, backend),
            Initializer::GlorotUniform => {
                let l = (6.0 / (fi + fo)).sqrt();
                Distribution::Uniform { low: -l, high: l }
            }
            Initializer::HeUniform => {
                let l = (6.0 / fi).sqrt();
                Distribution::Uniform { low: -l, high: l }
            }
            Initializer::HeNormal => Distribution::Normal {
                mean: 0.0,
                std: (2.0 / fi).sqrt(),
            },
            Initializer::Normal { std } => {
                if !(std.is_finite() && std > 0.0) {
                    return Err(kiln_core::Error::invalid(format!(
                        "normal initialiser: std {std} must be finite and positive"
                    )));
                }
                Distribution::Normal {
                    mean: 0.0,
                    std: f64::from(std),
                }
            }
        };
        Tensor::random(dims, dist, DType::F32, seed, offset, backend)
    }
}
