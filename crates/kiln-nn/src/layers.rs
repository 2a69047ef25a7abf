//! Layers: the pieces a [`crate::Sequential`] is made of.
//!
//! ```
//! use kiln_core::Tensor;
//! use kiln_cpu::CpuBackend;
//! use kiln_nn::{ActivationSpec::Relu, Layer, ModelSpec};
//!
//! // Layers are built from a spec; each checks the shape it is given.
//! let b = CpuBackend::reference();
//! let model = ModelSpec::new("tiny", [1, 6, 6])
//!     .conv2d(2, 3, Relu)   // [2, 4, 4]
//!     .max_pool2d(2)        // [2, 2, 2]
//!     .flatten()            // [8]
//!     .dense(3, Relu)       // [3]
//!     .build(1, &b)?;
//! assert_eq!(model.layers()[0].kind(), "Conv2D");
//! let y = model.forward(&Tensor::from_slice(&[0.5; 2 * 36], &[2, 1, 6, 6], &b)?)?;
//! assert_eq!(y.dims(), [2, 3]);
//! assert!(y.to_vec_f32()?.iter().all(|&v| v >= 0.0), "ReLU outputs");
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kiln_core::{Activation, Backend, DType, Error, Result, Tensor, Var, Window2d};

use crate::decode::DecodeState;
use crate::precision::param_for;
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

    /// Names of the parameters, matching [`Layer::params`] (`weight`; a
    /// residual's `1.attention.qkv_weight`).
    fn param_names(&self) -> Vec<String> {
        Vec::new()
    }

    /// The `[vocab, dim]` table of an Embedding layer, which a tied
    /// [`crate::LmHead`] reads; `None` for other layers.
    fn table(&self) -> Option<&Var<B>> {
        None
    }

    /// Applies the layer given the model's embedding table (`None` if it
    /// has none). Only a layer that reads the table (the tied LM head)
    /// differs from [`Layer::forward`]; [`crate::Sequential`] calls this.
    fn forward_with(&self, x: &Tensor<B>, table: Option<&Var<B>>) -> Result<Tensor<B>> {
        let _ = table;
        self.forward(x)
    }

    /// Incremental decoding: applies the layer to `x`, the `[n, t, …]`
    /// examples' next `t` positions, starting at `state.position()`, with
    /// what earlier calls left in `state` (attention's key/value cache).
    /// Position-wise layers need nothing more than [`Layer::forward_with`],
    /// the default.
    fn decode(
        &self,
        x: &Tensor<B>,
        table: Option<&Var<B>>,
        state: &mut DecodeState<B>,
    ) -> Result<Tensor<B>> {
        let _ = state;
        self.forward_with(x, table)
    }

    /// For a layer that can absorb a max-pooling that follows it (Conv2D):
    /// both at once — the same result, computed without keeping the
    /// intermediate. `None` if the layer cannot.
    fn forward_pooled(&self, x: &Tensor<B>, pool: &Window2d) -> Option<Result<Tensor<B>>> {
        let _ = (x, pool);
        None
    }

    /// The window of a max-pooling layer (so the layer before may absorb it).
    fn pool_window(&self) -> Option<Window2d> {
        None
    }

    /// How far the layer's random streams (dropout) have advanced, for
    /// checkpoints; empty for layers without any.
    fn rng_positions(&self) -> Vec<u64> {
        Vec::new()
    }

    /// Restores positions [`Layer::rng_positions`] reported (as many as it
    /// returns, taken from the front of `positions`); returns how many it used.
    fn set_rng_positions(&self, positions: &[u64]) -> usize {
        let _ = positions;
        0
    }

    /// How far each of the layer's random streams advances per example of
    /// a training batch whose examples have shape `input` (one entry per
    /// [`Layer::rng_positions`] entry): what lets the ranks of a
    /// data-parallel run draw, between them, the numbers one process would.
    fn rng_draws_per_example(&self, input: &[usize]) -> Vec<u64> {
        let _ = input;
        Vec::new()
    }

    /// Switches training behaviour (dropout) on or off; most layers have none.
    fn set_training(&self, training: bool) {
        let _ = training;
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

/// Layer normalisation over the last axis with a learned per-feature scale
/// `gamma` (initially 1) and shift `beta` (initially 0; or none, β = 0):
/// `(x − μ)/√(σ² + eps)·gamma + beta` ([`Tensor::layer_norm`]). In mixed
/// precision the parameters are cast to the input's type, the statistics
/// are computed in f32.
pub struct LayerNorm<B: Backend> {
    gamma: Var<B>,
    beta: Option<Var<B>>,
    /// β = 0 for a layer without a learned shift, made once.
    zero: Tensor<B>,
    eps: f32,
}

impl<B: Backend> LayerNorm<B> {
    /// A layer over `width` features; `eps` finite and positive; `bias`:
    /// whether β is learned.
    pub fn new(width: usize, eps: f32, bias: bool, backend: &B) -> Result<Self> {
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::invalid(format!(
                "LayerNorm eps {eps} must be finite and positive (1e-5 is usual)"
            )));
        }
        let gamma = Var::from_tensor(&Tensor::full(&[width], 1.0, DType::F32, backend)?)?;
        let zero = Tensor::zeros(&[width], DType::F32, backend)?;
        let beta = if bias {
            Some(Var::from_tensor(&zero)?)
        } else {
            None
        };
        Ok(LayerNorm {
            gamma,
            beta,
            zero,
            eps,
        })
    }
}

impl<B: Backend> Layer<B> for LayerNorm<B> {
    fn kind(&self) -> &'static str {
        "LayerNorm"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let width = self.gamma.shape().dims()[0];
        if input.last() != Some(&width) {
            return Err(Error::shape(
                "LayerNorm",
                format!("input has shape {input:?}, expected a last axis of {width}"),
            ));
        }
        Ok(input.to_vec())
    }
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let beta = match &self.beta {
            Some(b) => param_for(b, x)?,
            None => crate::precision::to_compute(&self.zero, x.dtype())?,
        };
        x.layer_norm(&param_for(&self.gamma, x)?, &beta, self.eps)
    }
    fn params(&self) -> Vec<&Var<B>> {
        std::iter::once(&self.gamma).chain(&self.beta).collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Var<B>> {
        std::iter::once(&mut self.gamma)
            .chain(&mut self.beta)
            .collect()
    }
    fn param_names(&self) -> Vec<String> {
        let mut names = vec!["gamma".to_string()];
        if self.beta.is_some() {
            names.push("beta".into());
        }
        names
    }
    fn spec(&self) -> LayerSpec {
        LayerSpec::LayerNorm {
            eps: self.eps,
            bias: self.beta.is_some(),
        }
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
    /// GELU, the tanh form GPT-2 uses.
    Gelu,
    /// Softmax over the last axis.
    Softmax,
}

impl<B: Backend> Layer<B> for Nonlinearity {
    fn kind(&self) -> &'static str {
        match self {
            Nonlinearity::Relu => "ReLU",
            Nonlinearity::Sigmoid => "Sigmoid",
            Nonlinearity::Tanh => "Tanh",
            Nonlinearity::Gelu => "GELU",
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
            Nonlinearity::Gelu => x.gelu(),
            Nonlinearity::Softmax => x.softmax(),
        }
    }
    fn spec(&self) -> LayerSpec {
        match self {
            Nonlinearity::Relu => LayerSpec::Relu,
            Nonlinearity::Sigmoid => LayerSpec::Sigmoid,
            Nonlinearity::Tanh => LayerSpec::Tanh,
            Nonlinearity::Gelu => LayerSpec::Gelu,
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

/// A fully connected layer `act(x·W + b)` over the last axis, one fused
/// GEMM (softmax, which is not an elementwise epilogue, runs after it).
/// Examples are `[features]` or `[positions, features]`.
pub struct Dense<B: Backend> {
    weight: Var<B>,
    bias: Option<Var<B>>,
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
            bias: Some(Var::from_tensor(&b)?),
            activation,
            kernel_init,
        })
    }

    /// The same layer without a bias (`x·W` only).
    pub fn without_bias(mut self) -> Self {
        self.bias = None;
        self
    }

    /// The `[inputs, units]` kernel.
    pub fn weight(&self) -> &Var<B> {
        &self.weight
    }

    /// The `[units]` bias, if the layer has one.
    pub fn bias(&self) -> Option<&Var<B>> {
        self.bias.as_ref()
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
        let (inputs, units) = (self.weight.shape().dims()[0], self.weight.shape().dims()[1]);
        if !(x.rank() == 2 || x.rank() == 3) || x.dims().last() != Some(&inputs) {
            return Err(Error::shape(
                "Dense",
                format!(
                    "input has shape {}, expected [batch, {inputs}] or [batch, positions, {inputs}] (add a Flatten layer before Dense?)",
                    x.shape()
                ),
            ));
        }
        let rows = x.numel() / inputs;
        let bias = self.bias.as_ref().map(|b| param_for(b, x)).transpose()?;
        let y = x.reshape(&[rows, inputs])?.linear(
            &param_for(&self.weight, x)?,
            bias.as_ref(),
            self.epilogue(),
        )?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank 2 or 3") = units;
        y.reshape(&dims)
    }
}

impl<B: Backend> Layer<B> for Dense<B> {
    fn kind(&self) -> &'static str {
        "Dense"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let (inputs, units) = (self.weight.shape().dims()[0], self.weight.shape().dims()[1]);
        if input.len() > 2 || input.last() != Some(&inputs) {
            return Err(Error::shape(
                "Dense",
                format!("input has shape {input:?}, expected [{inputs}] or [positions, {inputs}] (add a Flatten layer before Dense?)"),
            ));
        }
        let mut out = input.to_vec();
        *out.last_mut().expect("checked above") = units;
        Ok(out)
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
        std::iter::once(&self.weight).chain(&self.bias).collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Var<B>> {
        std::iter::once(&mut self.weight)
            .chain(&mut self.bias)
            .collect()
    }
    fn param_names(&self) -> Vec<String> {
        let mut names = vec!["weight".to_string()];
        if self.bias.is_some() {
            names.push("bias".into());
        }
        names
    }
    fn spec(&self) -> LayerSpec {
        LayerSpec::Dense {
            units: self.weight.shape().dims()[1],
            activation: self.activation,
            kernel_init: self.kernel_init,
            bias: self.bias.is_some(),
        }
    }
    fn ends_in_softmax(&self) -> bool {
        self.activation == ActivationSpec::Softmax
    }
    fn forward_logits(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        self.linear(x)
    }
}

/// A 2-D convolution `act(conv(x, W) + b)` over `[n, c, h, w]` batches:
/// one fused backend op.
pub struct Conv2D<B: Backend> {
    weight: Var<B>,
    bias: Var<B>,
    spec: LayerSpec,
    window: Window2d,
    activation: ActivationSpec,
}

impl<B: Backend> Conv2D<B> {
    /// The layer `spec` (a [`LayerSpec::Conv2d`]) for inputs of shape
    /// `input = [c, h, w]`, weights drawn from the Philox stream
    /// `(seed, offset)`, bias zero.
    pub fn new(
        spec: &LayerSpec,
        input: &[usize],
        seed: u64,
        offset: u64,
        backend: &B,
    ) -> Result<Self> {
        let (
            &LayerSpec::Conv2d {
                filters,
                activation,
                kernel_init,
                ..
            },
            &[c, h, w],
        ) = (spec, input)
        else {
            return Err(Error::invalid(format!(
                "Conv2D: needs a conv2d spec and a [c, h, w] input, got {spec:?} and {input:?}"
            )));
        };
        let window = spec.window([h, w]).expect("a conv2d spec has a window");
        window.output("Conv2D", [h, w])?;
        let [kh, kw] = window.kernel;
        let dims = [filters, c, kh, kw];
        // Keras' fans for a convolution: receptive field × channels.
        let weight =
            kernel_init.init(&dims, c * kh * kw, filters * kh * kw, seed, offset, backend)?;
        let bias = Initializer::Zeros.init(&[filters], 1, 1, seed, offset, backend)?;
        Ok(Conv2D {
            weight: Var::from_tensor(&weight)?,
            bias: Var::from_tensor(&bias)?,
            spec: spec.clone(),
            window,
            activation,
        })
    }

    fn epilogue(&self) -> Activation {
        match self.activation {
            ActivationSpec::Relu => Activation::Relu,
            ActivationSpec::Sigmoid => Activation::Sigmoid,
            ActivationSpec::Tanh => Activation::Tanh,
            ActivationSpec::Linear | ActivationSpec::Softmax => Activation::None,
        }
    }
}

impl<B: Backend> Layer<B> for Conv2D<B> {
    fn kind(&self) -> &'static str {
        "Conv2D"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let &[c, h, w] = input else {
            return Err(Error::shape(
                "Conv2D",
                format!("input has shape {input:?}, expected [channels, height, width]"),
            ));
        };
        let d = self.weight.shape().dims();
        if c != d[1] {
            return Err(Error::shape(
                "Conv2D",
                format!("input has {c} channels, the kernel expects {}", d[1]),
            ));
        }
        let [oh, ow] = self.window.output("Conv2D", [h, w])?;
        Ok(vec![d[0], oh, ow])
    }
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        x.conv2d(
            &param_for(&self.weight, x)?,
            Some(&param_for(&self.bias, x)?),
            self.epilogue(),
            &self.window,
        )
    }
    fn forward_pooled(&self, x: &Tensor<B>, pool: &Window2d) -> Option<Result<Tensor<B>>> {
        let run = || {
            x.conv2d_pool(
                &param_for(&self.weight, x)?,
                Some(&param_for(&self.bias, x)?),
                self.epilogue(),
                &self.window,
                pool,
            )
        };
        Some(run())
    }
    fn params(&self) -> Vec<&Var<B>> {
        vec![&self.weight, &self.bias]
    }
    fn params_mut(&mut self) -> Vec<&mut Var<B>> {
        vec![&mut self.weight, &mut self.bias]
    }
    fn param_names(&self) -> Vec<String> {
        vec!["weight".into(), "bias".into()]
    }
    fn spec(&self) -> LayerSpec {
        self.spec.clone()
    }
}

/// 2-D max-pooling over `[n, c, h, w]` batches.
pub struct MaxPool2D {
    spec: LayerSpec,
    window: Window2d,
}

impl MaxPool2D {
    /// The layer `spec` (a [`LayerSpec::MaxPool2d`]) for inputs of shape
    /// `input = [c, h, w]`.
    pub fn new(spec: &LayerSpec, input: &[usize]) -> Result<Self> {
        let (LayerSpec::MaxPool2d { .. }, &[_, h, w]) = (spec, input) else {
            return Err(Error::invalid(format!(
                "MaxPool2D: needs a maxpool2d spec and a [c, h, w] input, got {spec:?} and {input:?}"
            )));
        };
        let window = spec.window([h, w]).expect("a pooling spec has a window");
        window.output("MaxPool2D", [h, w])?;
        Ok(MaxPool2D {
            spec: spec.clone(),
            window,
        })
    }
}

impl<B: Backend> Layer<B> for MaxPool2D {
    fn kind(&self) -> &'static str {
        "MaxPooling2D"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let &[c, h, w] = input else {
            return Err(Error::shape(
                "MaxPool2D",
                format!("input has shape {input:?}, expected [channels, height, width]"),
            ));
        };
        let [oh, ow] = self.window.output("MaxPool2D", [h, w])?;
        Ok(vec![c, oh, ow])
    }
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        x.max_pool2d(&self.window)
    }
    fn pool_window(&self) -> Option<Window2d> {
        Some(self.window)
    }
    fn spec(&self) -> LayerSpec {
        self.spec.clone()
    }
}

/// Sets a layer's one random-stream position `counter` from the front of
/// `positions` ([`Layer::set_rng_positions`]); returns how many it took.
pub(crate) fn restore_position(counter: &AtomicU64, positions: &[u64]) -> usize {
    match positions.first() {
        Some(&p) => {
            counter.store(p, Ordering::Relaxed);
            1
        }
        None => 0,
    }
}

/// Inverted dropout: while training, zeroes each input with probability
/// `rate` and scales the rest by `1/(1 − rate)`; the identity otherwise.
/// The masks come from the Philox stream of the model's seed, at a counter
/// that advances by the batch's size on every training call, so a run is
/// reproducible and its position can be saved and restored.
pub struct Dropout {
    rate: f32,
    seed: u64,
    base: u64,
    drawn: AtomicU64,
    training: AtomicBool,
}

impl Dropout {
    /// Dropout of `rate` drawing from the stream `(seed, base…)`.
    pub fn new(rate: f32, seed: u64, base: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&rate) {
            return Err(Error::invalid(format!(
                "Dropout: rate {rate} must be in [0, 1)"
            )));
        }
        Ok(Dropout {
            rate,
            seed,
            base,
            drawn: AtomicU64::new(0),
            training: AtomicBool::new(false),
        })
    }

    /// How many random numbers the layer has drawn (its RNG position).
    pub fn drawn(&self) -> u64 {
        self.drawn.load(Ordering::Relaxed)
    }

    /// Moves the RNG position (to resume a run).
    pub fn set_drawn(&self, drawn: u64) {
        self.drawn.store(drawn, Ordering::Relaxed);
    }
}

impl<B: Backend> Layer<B> for Dropout {
    fn kind(&self) -> &'static str {
        "Dropout"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(input.to_vec())
    }
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        if !self.training.load(Ordering::Relaxed) || self.rate == 0.0 {
            return Ok(x.clone());
        }
        let at = self.drawn.fetch_add(x.numel() as u64, Ordering::Relaxed);
        x.dropout(self.rate, self.seed, self.base + at)
    }
    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }
    fn rng_positions(&self) -> Vec<u64> {
        vec![self.drawn()]
    }
    fn set_rng_positions(&self, positions: &[u64]) -> usize {
        restore_position(&self.drawn, positions)
    }
    fn rng_draws_per_example(&self, input: &[usize]) -> Vec<u64> {
        let draws = if self.rate == 0.0 {
            0
        } else {
            input.iter().product::<usize>() as u64
        };
        vec![draws]
    }
    fn spec(&self) -> LayerSpec {
        LayerSpec::Dropout { rate: self.rate }
    }
}
