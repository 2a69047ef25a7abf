//! Numeric precision of a model's computation.
//!
//! Mixed precision keeps the *master* weights (and the optimiser's state) in
//! f32 and runs the forward and backward passes in a reduced type: each
//! parameterised layer casts its weights to the type of its input, so
//! activations, GEMM and convolution inputs and the gradients flowing
//! between layers are f16 or bf16, while every kernel accumulates in f32.
//! The cast back to f32 happens in the graph (the gradient of a cast is the
//! cast of the gradient), so the optimiser sees f32 gradients of the f32
//! weights. The loss is computed in f32 from logits cast up.
//!
//! ```
//! use kiln_core::DType;
//! use kiln_cpu::CpuBackend;
//! use kiln_nn::{ModelSpec, Precision};
//!
//! let p: Precision = "bf16".parse()?;
//! assert_eq!(p.compute_dtype(), DType::BF16);
//! assert!(!p.needs_loss_scaling() && Precision::F16.needs_loss_scaling());
//! assert!("f8".parse::<Precision>().is_err());
//! // Weights stay f32; the model computes in bf16.
//! let mut model = ModelSpec::mlp().build(1, &CpuBackend::reference())?;
//! model.set_precision(p);
//! assert_eq!(model.params()[0].dtype(), DType::F32);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;

use kiln_core::{Backend, DType, Error, Result, Tensor, Var};

/// The type a model computes in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 activations and GEMM inputs, f32 master weights. bf16 has f32's
    /// exponent range, so gradients need no loss scaling.
    Bf16,
    /// f16 activations and GEMM inputs, f32 master weights. f16 gradients
    /// underflow below 6·10⁻⁸, so training scales the loss (dynamically).
    F16,
}

impl Precision {
    /// Every precision, in the order `--precision` lists them.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::F16];

    /// The element type of activations and GEMM inputs.
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// Whether training in this precision needs loss scaling to keep small
    /// gradients from flushing to zero.
    pub fn needs_loss_scaling(self) -> bool {
        self == Precision::F16
    }

    /// The name `--precision` takes (`f32`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown precision `{s}`; expected one of f32, bf16, f16"
                ))
            })
    }
}

/// `x` in the model's compute type (a cast node in the graph if it differs).
pub fn to_compute<B: Backend>(x: &Tensor<B>, dtype: DType) -> Result<Tensor<B>> {
    if x.dtype() == dtype {
        Ok(x.clone())
    } else {
        x.cast(dtype)
    }
}

/// A parameter as the layer uses it on input `x`: cast to `x`'s type, so
/// a reduced-precision input makes the layer compute in that type while the
/// (f32) parameter receives an f32 gradient.
pub fn param_for<B: Backend>(p: &Var<B>, x: &Tensor<B>) -> Result<Tensor<B>> {
    to_compute(&p.as_tensor(), x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
        let e = "fp8".parse::<Precision>().unwrap_err().to_string();
        assert!(
            e.contains("unknown precision `fp8`") && e.contains("bf16"),
            "{e}"
        );
        assert_eq!(Precision::Bf16.compute_dtype(), DType::BF16);
        assert!(Precision::F16.needs_loss_scaling() && !Precision::Bf16.needs_loss_scaling());
    }
}
