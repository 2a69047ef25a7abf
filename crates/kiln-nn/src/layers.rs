//! Layers: the pieces a [`crate::Sequential`] is made of.

use kiln_core::{Activation, Backend, Error, Result, Tensor, Var};

use crate::spec::{ActivationSpec, LayerSpec};
use crate::Initializer;

/// A layer of a sequential model. Shapes exclude the batch dimension.
pub trait Layer<B: Backend>: Send + Sync {
    /// The layer's type, as summaries print it (`Dense`).
    fn kind(&self) -> &'static str;

    /// The output shape of one example, or an error if `input` does not fit.
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>>;

    /// Applies the layer to a batch.
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>>;

    /// The layer's trainable parameters, in a fixed order.
    fn params(&self) -> Vec<&Var<B>> {
        Vec::new()
    }

    /// The same parameters, mutable.
    fn params_mut(&mut self) -> Vec<&mut Var<B>> {
        Vec::new()
    }

    /// Names of the parameters, matching [`Layer::params`].
    fn param_names(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// The description this layer was built from.
    fn spec(&self) -> LayerSpec;

    /// Whether the layer's output is a softmax (so a loss that fuses
    /// softmax can ask for [`Layer::forward_logits`] instead).
    fn ends_in_softmax(&self) -> bool {
        false
    }

    /// The output before the final softmax, for layers that end in one;
    /// the plain output otherwise.
    fn forward_logits(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        self.forward(x)
    }
}

/// Collapses every dimension but the batch.
#[derive(Debug, Default)]
pub struct Flatten;

impl<B: Backend> Layer<B> for Flatten {
    fn kind(&self) -> &'static str {
        "Flatten"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(vec![input.iter().product()])
    }
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        x.flatten_from(1)
    }
    fn spec(&self) -> LayerSpec {
        LayerSpec::Flatten
    }
}

/// A parameter-free elementwise layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nonlinearity {
    /// max(x, 0)
    Relu,
    /// Logistic sigmoid.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
    /// Softmax over the last axis.
    Softmax,
}

impl<B: Backend> Layer<B> for Nonlinearity {
    fn kind(&self) -> &'static str {
        match self {
            Nonlinearity::Relu => "ReLU",
            Nonlinearity::Sigmoid => "Sigmoid",
            Nonlinearity::Tanh => "Tanh",
            Nonlinearity::Softmax => "Softmax",
        }
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(input.to_vec())
    }
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        match self {
            Nonlinearity::Relu => x.relu(),
            Nonlinearity::Sigmoid => x.sigmoid(),
            Nonlinearity::Tanh => x.tanh(),
            Nonlinearity::Softmax => x.softmax(),
        }
    }
    fn spec(&self) -> LayerSpec {
        match self {
            Nonlinearity::Relu => LayerSpec::Relu,
            Nonlinearity::Sigmoid => LayerSpec::Sigmoid,
            Nonlinearity::Tanh => LayerSpec::Tanh,
            Nonlinearity::Softmax => LayerSpec::Softmax,
        }
    }
    fn ends_in_softmax(&self) -> bool {
        *self == Nonlinearity::Softmax
    }
    fn forward_logits(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        if *self == Nonlinearity::Softmax {
            Ok(x.clone())
        } else {
            self.forward(x)
        }
    }
}

/// A fully connected layer `act(x·W + b)`, one fused GEMM (softmax, which is
/// not an elementwise epilogue, runs after it).
pub struct Dense<B: Backend> {
    weight: Var<B>,
    bias: Var<B>,
    activation: ActivationSpec,
    kernel_init: Initializer,
}

impl<B: Backend> Dense<B> {
    /// A layer from `inputs` to `units` features, weights drawn from the
    /// Philox stream `(seed, offset)`, bias zero.
    pub fn new(
        inputs: usize,
        units: usize,
        activation: ActivationSpec,
        kernel_init: Initializer,
        seed: u64,
        offset: u64,
        backend: &B,
    ) -> Result<Self> {
        if units == 0 || inputs == 0 {
            return Err(Error::invalid(format!(
                "Dense: needs at least one input and one unit, got {inputs} → {units}"
            )));
        }
        let w = kernel_init.init(&[inputs, units], inputs, units, seed, offset, backend)?;
        let b = Initializer::Zeros.init(&[units], inputs, units, seed, offset, backend)?;
        Ok(Dense {
            weight: Var::from_tensor(&w)?,
            bias: Var::from_tensor(&b)?,
            activation,
            kernel_init,
        })
    }

    /// The `[inputs, units]` kernel.
    pub fn weight(&self) -> &Var<B> {
        &self.weight
    }

    /// The `[units]` bias.
    pub fn bias(&self) -> &Var<B> {
        &self.bias
    }

    fn epilogue(&self) -> Activation {
        match self.activation {
            ActivationSpec::Relu => Activation::Relu,
            ActivationSpec::Sigmoid => Activation::Sigmoid,
            ActivationSpec::Tanh => Activation::Tanh,
            ActivationSpec::Linear | ActivationSpec::Softmax => Activation::None,
        }
    }

    fn linear(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let inputs = self.weight.shape().dims()[0];
        if x.rank() != 2 || x.dims()[1] != inputs {
            return Err(Error::shape(
                "Dense",
                format!(
                    "input has shape {}, expected [batch, {inputs}] (add a Flatten layer before Dense?)",
                    x.shape()
                ),
            ));
        }
        x.linear(
            &self.weight.as_tensor(),
            Some(&self.bias.as_tensor()),
            self.epilogue(),
        )
    }
}

impl<B: Backend> Layer<B> for Dense<B> {
    fn kind(&self) -> &'static str {
        "Dense"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let (inputs, units) = (self.weight.shape().dims()[0], self.weight.shape().dims()[1]);
        if input != [inputs] {
            return Err(Error::shape(
                "Dense",
                format!("input has shape {input:?}, expected [{inputs}] (add a Flatten layer before Dense?)"),
            ));
        }
        Ok(vec![units])
    }
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let y = self.linear(x)?;
        if self.activation == ActivationSpec::Softmax {
            y.softmax()
        } else {
            Ok(y)
        }
    }
    fn params(&self) -> Vec<&Var<B>> {
        vec![&self.weight, &self.bias]
    }
    fn params_mut(&mut self) -> Vec<&mut Var<B>> {
        vec![&mut self.weight, &mut self.bias]
    }
    fn param_names(&self) -> Vec<&'static str> {
        vec!["weight", "bias"]
    }
    fn spec(&self) -> LayerSpec {
        LayerSpec::Dense {
            units: self.weight.shape().dims()[1],
            activation: self.activation,
            kernel_init: self.kernel_init,
        }
    }
    fn ends_in_softmax(&self) -> bool {
        self.activation == ActivationSpec::Softmax
    }
    fn forward_logits(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        self.linear(x)
    }
}
