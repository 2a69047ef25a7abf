//! `x + f(x)`: the residual connection transformer blocks are made of.
//!
//! ```
//! use kiln_core::Tensor;
//! use kiln_cpu::CpuBackend;
//! use kiln_nn::{ActivationSpec, Initializer, LayerSpec, ModelSpec};
//!
//! // x + f(x): with f a Dense layer whose weights start at zero, the block is the identity.
//! let b = CpuBackend::reference();
//! let f = LayerSpec::Dense { units: 3, activation: ActivationSpec::Linear, kernel_init: Initializer::Zeros, bias: true };
//! let model = ModelSpec::new("res", [3]).push(LayerSpec::Residual { layers: vec![f] }).build(1, &b)?;
//! let x = Tensor::from_slice(&[1.0, -2.0, 3.0], &[1, 3], &b)?;
//! assert_eq!(model.forward(&x)?.to_vec_f32()?, [1.0, -2.0, 3.0]);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use kiln_core::{Backend, Result, Tensor, Var};

use crate::decode::DecodeState;
use crate::layers::Layer;
use crate::spec::LayerSpec;

/// `x + f(x)`, where `f` is a stack of layers that keeps the shape (a
/// pre-norm transformer block is two: layer norm → attention, and layer
/// norm → MLP). Its parameters, dropout streams and training switch are
/// those of the layers inside, in order.
pub struct Residual<B: Backend> {
    layers: Vec<Box<dyn Layer<B>>>,
}

impl<B: Backend> Residual<B> {
    /// The residual around `layers` (built by [`crate::Sequential`]).
    pub fn new(layers: Vec<Box<dyn Layer<B>>>) -> Self {
        Residual { layers }
    }

    /// The layers of `f`.
    pub fn layers(&self) -> &[Box<dyn Layer<B>>] {
        &self.layers
    }
}

impl<B: Backend> Layer<B> for Residual<B> {
    fn kind(&self) -> &'static str {
        "Residual"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let out = self
            .layers
            .iter()
            .try_fold(input.to_vec(), |s, l| l.output_shape(&s))?;
        if out != input {
            return Err(kiln_core::Error::shape(
                "Residual",
                format!("the layers inside turn {input:?} into {out:?}; they must keep the shape"),
            ));
        }
        Ok(out)
    }
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        self.forward_with(x, None)
    }
    fn forward_with(&self, x: &Tensor<B>, table: Option<&Var<B>>) -> Result<Tensor<B>> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward_with(&h, table)?;
        }
        x.add(&h)
    }
    fn decode(
        &self,
        x: &Tensor<B>,
        table: Option<&Var<B>>,
        state: &mut DecodeState<B>,
    ) -> Result<Tensor<B>> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.decode(&h, table, state)?;
        }
        x.add(&h)
    }
    fn params(&self) -> Vec<&Var<B>> {
        self.layers.iter().flat_map(|l| l.params()).collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Var<B>> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.params_mut())
            .collect()
    }
    fn param_names(&self) -> Vec<String> {
        crate::sequential::param_names(&self.layers)
    }
    fn set_training(&self, training: bool) {
        for l in &self.layers {
            l.set_training(training);
        }
    }
    fn rng_draws_per_example(&self, input: &[usize]) -> Vec<u64> {
        let mut shape = input.to_vec();
        let mut draws = Vec::new();
        for l in &self.layers {
            draws.extend(l.rng_draws_per_example(&shape));
            match l.output_shape(&shape) {
                Ok(next) => shape = next,
                Err(_) => break,
            }
        }
        draws
    }
    fn rng_positions(&self) -> Vec<u64> {
        self.layers.iter().flat_map(|l| l.rng_positions()).collect()
    }
    fn set_rng_positions(&self, positions: &[u64]) -> usize {
        let mut used = 0;
        for l in &self.layers {
            used += l.set_rng_positions(&positions[used..]);
        }
        used
    }
    fn spec(&self) -> LayerSpec {
        LayerSpec::Residual {
            layers: self.layers.iter().map(|l| l.spec()).collect(),
        }
    }
}
