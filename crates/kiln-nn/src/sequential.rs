//! `Sequential`: layers applied in order.

use kiln_core::{Backend, Error, Result, Tensor, Var};

use crate::attention::CausalSelfAttention;
use crate::decode::DecodeState;
use crate::embedding::{Embedding, LmHead, PositionEmbedding};
use crate::layers::{Conv2D, Dense, Dropout, Flatten, Layer, LayerNorm, MaxPool2D, Nonlinearity};
use crate::precision::{to_compute, Precision};
use crate::residual::Residual;

/// Dropout masks draw from the model seed's Philox key with this mask, a
/// stream apart from the initial weights'.
const DROPOUT_STREAM: u64 = 0x6472_6f70_6f75_7421;
use crate::spec::{LayerSpec, ModelSpec};

/// A stack of layers applied in order to batches of shape `[n, input…]`.
pub struct Sequential<B: Backend> {
    name: String,
    seed: u64,
    input: Vec<usize>,
    layers: Vec<Box<dyn Layer<B>>>,
    precision: Precision,
}

impl<B: Backend> Sequential<B> {
    /// Builds the model a spec describes, checking that every layer fits the
    /// shape before it. Weights come from the Philox stream of `seed`; layer
    /// `i` draws at counter offset `i·2⁴⁰`, so adding a layer does not change
    /// the others' initial weights.
    pub fn from_spec(spec: &ModelSpec, seed: u64, backend: &B) -> Result<Self> {
        spec.plan()?;
        let mut layers: Vec<Box<dyn Layer<B>>> = Vec::with_capacity(spec.layers.len());
        let mut shape = spec.input.clone();
        let mut table = None;
        for (i, ls) in spec.layers.iter().enumerate() {
            let at = |e: Error| Error::invalid(format!("model `{}`, layer {i}: {e}", spec.name));
            let layer =
                build(ls, &shape, seed, (i as u64) << 40, &mut table, backend).map_err(at)?;
            shape = layer.output_shape(&shape).map_err(at)?;
            layers.push(layer);
        }
        Ok(Sequential {
            name: spec.name.clone(),
            seed,
            input: spec.input.clone(),
            layers,
            precision: Precision::F32,
        })
    }

    /// Sets the type the model computes in (see [`crate::precision`]): the
    /// weights stay f32; inputs are cast to the compute type on entry and
    /// every layer computes in it.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The type the model computes in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Switches training behaviour (dropout) on or off for every layer.
    pub fn set_training(&self, training: bool) {
        for l in &self.layers {
            l.set_training(training);
        }
    }

    /// The positions of the layers' random streams (dropout), in layer
    /// order, for checkpoints.
    pub fn rng_positions(&self) -> Vec<u64> {
        self.layers.iter().flat_map(|l| l.rng_positions()).collect()
    }

    /// How far each random stream ([`Sequential::rng_positions`]) advances
    /// per example of a training batch: rank r of a data-parallel run
    /// starts its shard's draws `first example × these` past the batch's
    /// position, so the ranks together draw the numbers one process would
    /// draw for the whole batch (exactly so where a layer's draws are laid
    /// out example by example, as Dropout's are; attention weights are
    /// head-major, so there the ranks draw distinct numbers, not one
    /// process's).
    pub fn rng_draws_per_example(&self) -> Result<Vec<u64>> {
        let mut shape = self.input.clone();
        let mut draws = Vec::new();
        for l in &self.layers {
            draws.extend(l.rng_draws_per_example(&shape));
            shape = l.output_shape(&shape)?;
        }
        Ok(draws)
    }

    /// Restores positions saved by [`Sequential::rng_positions`].
    pub fn set_rng_positions(&self, positions: &[u64]) -> Result<()> {
        let have = self.rng_positions().len();
        if have != positions.len() {
            return Err(Error::invalid(format!(
                "model `{}` has {have} random streams, the checkpoint {}",
                self.name,
                positions.len()
            )));
        }
        let mut used = 0;
        for l in &self.layers {
            used += l.set_rng_positions(&positions[used..]);
        }
        Ok(())
    }

    /// The seed the model was built from (its initial weights and its
    /// dropout streams).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shape of one input example.
    pub fn input_shape(&self) -> &[usize] {
        &self.input
    }

    /// The shape of one output example.
    pub fn output_shape(&self) -> Result<Vec<usize>> {
        self.layers
            .iter()
            .try_fold(self.input.clone(), |s, l| l.output_shape(&s))
    }

    /// The layers.
    pub fn layers(&self) -> &[Box<dyn Layer<B>>] {
        &self.layers
    }

    /// The description the model can be rebuilt from.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            name: self.name.clone(),
            input: self.input.clone(),
            layers: self.layers.iter().map(|l| l.spec()).collect(),
        }
    }

    /// Whether the model reads token ids (its first layer is an Embedding).
    pub fn takes_tokens(&self) -> bool {
        self.layers.first().is_some_and(|l| l.table().is_some())
    }

    /// The model's embedding table, which a tied LM head reads.
    fn table(&self) -> Option<&Var<B>> {
        self.layers.first().and_then(|l| l.table())
    }

    fn check_input(&self, x: &Tensor<B>) -> Result<()> {
        let fits = if self.takes_tokens() {
            // Token models take any context up to the one they were built for.
            x.rank() == 2 && (1..=self.input[0]).contains(&x.dims()[1])
        } else {
            x.rank() == self.input.len() + 1 && x.dims()[1..] == self.input[..]
        };
        if !fits {
            let dims = self
                .input
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let expected = if self.takes_tokens() {
                format!("token ids [n, positions ≤ {dims}]")
            } else {
                format!("[n, {dims}]")
            };
            return Err(Error::shape(
                "Sequential",
                format!(
                    "model `{}` takes batches of shape {expected}, got {}",
                    self.name,
                    x.shape()
                ),
            ));
        }
        Ok(())
    }

    /// The input as the first layer takes it: token ids as they are, numbers
    /// in the compute type.
    fn entry(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        if self.takes_tokens() {
            Ok(x.clone())
        } else {
            to_compute(x, self.precision.compute_dtype())
        }
    }

    /// Runs `layers` (a prefix of the model's) on `x`, asking `stop` before
    /// each; the embedding's output is cast to the compute type.
    fn run(
        &self,
        layers: &[Box<dyn Layer<B>>],
        x: &Tensor<B>,
        stop: &impl Fn() -> bool,
    ) -> Result<Option<Tensor<B>>> {
        run(
            layers,
            &self.entry(x)?,
            self.table(),
            self.precision.compute_dtype(),
            stop,
        )
    }

    /// Incremental decoding for generation: the model's output (logits)
    /// for `ids` `[n, t]`, the next `t` positions of `n` sequences whose
    /// earlier positions `state` holds (keys and values cached by each
    /// attention layer), so a new token costs one step over the cache.
    /// Runs without recording gradients, in inference mode (no dropout).
    pub fn decode(&self, ids: &Tensor<B>, state: &mut DecodeState<B>) -> Result<Tensor<B>> {
        if !self.takes_tokens() || ids.rank() != 2 {
            return Err(Error::invalid(format!(
                "decode: model `{}` {}",
                self.name,
                if self.takes_tokens() {
                    format!("takes [n, t] token ids, got {}", ids.shape())
                } else {
                    "does not read token ids (its first layer is not an Embedding)".into()
                }
            )));
        }
        state.begin(ids.dims()[1])?;
        let table = self.table();
        let out = kiln_core::no_grad(|| {
            let mut h = self.entry(ids)?;
            for (i, l) in self.layers.iter().enumerate() {
                h = l.decode(&h, table, state)?;
                if i == 0 {
                    h = to_compute(&h, self.precision.compute_dtype())?;
                }
            }
            Ok::<_, Error>(h)
        })?;
        state.finish(ids.dims()[1]);
        Ok(out)
    }

    /// The model's output for a batch.
    pub fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let out = self.forward_until(x, || false)?;
        Ok(out.expect("a forward pass with no stop condition completes"))
    }

    /// [`Sequential::forward`], abandoned as soon as `stop` says so: it is
    /// asked before each layer, and `Ok(None)` means it answered `true`.
    /// The trainer passes its stop flag, so a signal interrupts a long step
    /// between layers.
    pub fn forward_until(
        &self,
        x: &Tensor<B>,
        stop: impl Fn() -> bool,
    ) -> Result<Option<Tensor<B>>> {
        self.check_input(x)?;
        self.run(&self.layers, x, &stop)
    }

    /// Class probabilities for a batch, with no autograd bookkeeping: the
    /// output in f32, passed through a softmax unless the model ends in
    /// one. Image models take pixels scaled to `[0, 1]` (bytes over 255,
    /// as the trainer's loader feeds them), laid out `[n, channels,
    /// height, width]`.
    pub fn predict(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let _g = kiln_core::NoGradGuard::new();
        let out = self.forward(x)?.cast(kiln_core::DType::F32)?;
        if self.ends_in_softmax() {
            Ok(out)
        } else {
            out.softmax()
        }
    }

    /// Whether the output is a softmax.
    pub fn ends_in_softmax(&self) -> bool {
        self.layers.last().is_some_and(|l| l.ends_in_softmax())
    }

    /// The output before a final softmax (logits), for losses that fuse it;
    /// the plain output if the model does not end in softmax.
    pub fn forward_logits(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        let out = self.forward_logits_until(x, || false)?;
        Ok(out.expect("a forward pass with no stop condition completes"))
    }

    /// [`Sequential::forward_logits`], abandoned between layers as
    /// [`Sequential::forward_until`] is.
    pub fn forward_logits_until(
        &self,
        x: &Tensor<B>,
        stop: impl Fn() -> bool,
    ) -> Result<Option<Tensor<B>>> {
        self.check_input(x)?;
        let Some((last, body)) = self.layers.split_last() else {
            return Ok(Some(self.entry(x)?));
        };
        if !last.ends_in_softmax() {
            return self.run(&self.layers, x, &stop);
        }
        match self.run(body, x, &stop)? {
            Some(h) if !stop() => last.forward_logits(&h).map(Some),
            _ => Ok(None),
        }
    }

    /// Every trainable parameter, in a fixed order.
    pub fn params(&self) -> Vec<&Var<B>> {
        self.layers.iter().flat_map(|l| l.params()).collect()
    }

    /// The same parameters, mutable (for optimisers).
    pub fn params_mut(&mut self) -> Vec<&mut Var<B>> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.params_mut())
            .collect()
    }

    /// `(name, parameter)` pairs, names like `1.dense.weight`.
    pub fn named_params(&self) -> Vec<(String, &Var<B>)> {
        let params = self.layers.iter().flat_map(|l| l.params());
        param_names(&self.layers).into_iter().zip(params).collect()
    }

    /// Every parameter's current values by name (`0.dense.weight`, …):
    /// detached tensors on the model's backend, to read, keep, or load
    /// into another model of the same spec with
    /// [`Sequential::load_state_dict`]. (`kiln_train::model_file` saves
    /// and loads them in a file, with the spec.)
    ///
    /// ```
    /// use kiln_cpu::CpuBackend;
    /// use kiln_nn::ModelSpec;
    ///
    /// let b = CpuBackend::reference();
    /// let trained = ModelSpec::mlp().build(1, &b)?;
    /// let mut other = ModelSpec::mlp().build(2, &b)?;
    /// let state = trained.state_dict();
    /// assert_eq!(state["1.dense.weight"].dims(), [784, 64]);
    /// other.load_state_dict(&state)?;
    /// assert_eq!(
    ///     other.param("2.dense.bias")?.value().to_vec_f32()?,
    ///     state["2.dense.bias"].to_vec_f32()?
    /// );
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn state_dict(&self) -> std::collections::BTreeMap<String, Tensor<B>> {
        self.named_params()
            .into_iter()
            .map(|(name, p)| (name, p.value()))
            .collect()
    }

    /// The parameter called `name`, or an error listing the names there are.
    pub fn param(&self, name: &str) -> Result<&Var<B>> {
        let params = self.named_params();
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        params
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .ok_or_else(|| self.unknown_param(name, &names))
    }

    /// Replaces the values of the parameter called `name` (same shape and
    /// dtype) — for weights from elsewhere, or for hand-made tests.
    pub fn set_param(&mut self, name: &str, value: &Tensor<B>) -> Result<()> {
        let names = param_names(&self.layers);
        let Some(i) = names.iter().position(|n| n == name) else {
            return Err(self.unknown_param(name, &names));
        };
        self.params_mut()[i]
            .set(value)
            .map_err(|e| Error::invalid(format!("parameter `{name}`: {e}")))
    }

    /// Replaces every parameter's values with `state`'s (as
    /// [`Sequential::state_dict`] gives them). All or nothing: a missing
    /// or unknown name, or a value of the wrong shape or dtype, is an
    /// error before any parameter changes.
    pub fn load_state_dict(
        &mut self,
        state: &std::collections::BTreeMap<String, Tensor<B>>,
    ) -> Result<()> {
        let names = param_names(&self.layers);
        if let Some(extra) = state.keys().find(|k| !names.contains(k)) {
            return Err(self.unknown_param(extra, &names));
        }
        for (name, p) in self.named_params() {
            let v = state.get(&name).ok_or_else(|| {
                Error::invalid(format!(
                    "the state has no `{name}`: model `{}` needs all of {}",
                    self.name,
                    names.join(", ")
                ))
            })?;
            if v.shape() != p.shape() || v.dtype() != p.dtype() {
                return Err(Error::invalid(format!(
                    "`{name}` is {} {} in the state, {} {} in model `{}`",
                    v.shape(),
                    v.dtype(),
                    p.shape(),
                    p.dtype(),
                    self.name
                )));
            }
        }
        for (name, p) in names.iter().zip(self.params_mut()) {
            p.set(&state[name])?;
        }
        Ok(())
    }

    fn unknown_param(&self, name: &str, names: &[String]) -> Error {
        Error::invalid(format!(
            "model `{}` has no parameter `{name}`; it has {}",
            self.name,
            names.join(", ")
        ))
    }

    /// Total number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }

    /// A Keras-style summary: each layer, its output shape and parameter count.
    pub fn summary(&self) -> String {
        let mut rows = vec![(
            "Layer (type)".to_string(),
            "Output Shape".to_string(),
            "Param #".to_string(),
        )];
        let mut shape = self.input.clone();
        let mut counts = std::collections::HashMap::<&str, usize>::new();
        for l in &self.layers {
            shape = l.output_shape(&shape).unwrap_or_default();
            let kind = l.kind();
            let n = counts.entry(kind).or_default();
            let lname = snake_case(kind);
            let lname = if *n == 0 {
                lname
            } else {
                format!("{lname}_{n}")
            };
            *n += 1;
            let dims: Vec<String> = std::iter::once("None".to_string())
                .chain(shape.iter().map(ToString::to_string))
                .collect();
            let params: usize = l.params().iter().map(|p| p.numel()).sum();
            rows.push((
                format!("{lname} ({kind})"),
                format!("({})", dims.join(", ")),
                group(params),
            ));
        }
        let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0) + 4;
        let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0) + 4;
        let w2 = rows.iter().map(|r| r.2.chars().count()).max().unwrap_or(0);
        let rule = |c: char| c.to_string().repeat(w0 + w1 + w2);
        let mut out = format!("Model: \"{}\"\n{}\n", self.name, rule('_'));
        for (i, (a, b, c)) in rows.iter().enumerate() {
            out += &format!("{a:<w0$}{b:<w1$}{c:>w2$}\n");
            out += &rule(if i == 0 { '=' } else { '_' });
            out.push('\n');
        }
        out += &format!("Total params: {}\n", group(self.num_params()));
        out += &format!("Trainable params: {}\n", group(self.num_params()));
        out += "Non-trainable params: 0\n";
        out
    }
}

/// Runs `layers` on `x` (fusing a convolution with the pooling after it),
/// asking `stop` before each; `None` when it said stop. `table` is the
/// model's embedding table (for a tied head); an embedding's output is
/// cast to `compute`.
fn run<B: Backend>(
    layers: &[Box<dyn Layer<B>>],
    x: &Tensor<B>,
    table: Option<&Var<B>>,
    compute: kiln_core::DType,
    stop: &impl Fn() -> bool,
) -> Result<Option<Tensor<B>>> {
    let mut h = x.clone();
    let mut i = 0;
    while i < layers.len() {
        if stop() {
            return Ok(None);
        }
        let pool = layers.get(i + 1).and_then(|l| l.pool_window());
        if let Some(fused) = pool.and_then(|p| layers[i].forward_pooled(&h, &p)) {
            h = fused?;
            i += 2;
        } else {
            h = layers[i].forward_with(&h, table)?;
            if i == 0 && layers[i].table().is_some() {
                // Token ids went in; the rest computes in the model's type.
                h = to_compute(&h, compute)?;
            }
            i += 1;
        }
    }
    Ok(Some(h))
}

/// The names of `layers`' parameters, in order: `{index}.{kind}.{name}`
/// (`1.dense.weight`; inside a residual `3.residual.1.attention.qkv_weight`).
pub(crate) fn param_names<B: Backend>(layers: &[Box<dyn Layer<B>>]) -> Vec<String> {
    layers
        .iter()
        .enumerate()
        .flat_map(|(i, l)| {
            let kind = l.kind().to_ascii_lowercase();
            l.param_names()
                .into_iter()
                .map(move |n| format!("{i}.{kind}.{n}"))
        })
        .collect()
}

/// Builds the layer `ls` for examples of `shape`, drawing its weights at
/// `offset` of the model's Philox stream (layers inside a residual at
/// `offset + (j + 1)·2³⁴`); `table` is the embedding's `[vocab, dim]`
/// once built, for the tied head.
fn build<B: Backend>(
    ls: &LayerSpec,
    shape: &[usize],
    seed: u64,
    offset: u64,
    table: &mut Option<[usize; 2]>,
    backend: &B,
) -> Result<Box<dyn Layer<B>>> {
    let width = *shape.last().expect("shapes are never empty");
    Ok(match *ls {
        LayerSpec::Conv2d { .. } => Box::new(Conv2D::new(ls, shape, seed, offset, backend)?),
        LayerSpec::MaxPool2d { .. } => Box::new(MaxPool2D::new(ls, shape)?),
        LayerSpec::Dropout { rate } => Box::new(Dropout::new(rate, seed ^ DROPOUT_STREAM, offset)?),
        LayerSpec::Flatten => Box::new(Flatten),
        LayerSpec::Relu => Box::new(Nonlinearity::Relu),
        LayerSpec::Sigmoid => Box::new(Nonlinearity::Sigmoid),
        LayerSpec::Tanh => Box::new(Nonlinearity::Tanh),
        LayerSpec::Gelu => Box::new(Nonlinearity::Gelu),
        LayerSpec::Softmax => Box::new(Nonlinearity::Softmax),
        LayerSpec::LayerNorm { eps, bias } => Box::new(LayerNorm::new(width, eps, bias, backend)?),
        LayerSpec::Dense {
            units,
            activation,
            kernel_init,
            bias,
        } => {
            let d = Dense::new(width, units, activation, kernel_init, seed, offset, backend)?;
            Box::new(if bias { d } else { d.without_bias() })
        }
        LayerSpec::Embedding { vocab, dim, init } => {
            *table = Some([vocab, dim]);
            Box::new(Embedding::new(vocab, dim, init, seed, offset, backend)?)
        }
        LayerSpec::PositionEmbedding { block, init } => Box::new(PositionEmbedding::new(
            block, width, init, seed, offset, backend,
        )?),
        LayerSpec::Attention { .. } => Box::new(CausalSelfAttention::new(
            ls,
            width,
            seed,
            seed ^ DROPOUT_STREAM,
            offset,
            backend,
        )?),
        LayerSpec::LmHead => {
            let [vocab, dim] = table.ok_or_else(|| {
                Error::invalid(
                    "LmHead reads the Embedding layer's table; the model has none before it",
                )
            })?;
            Box::new(LmHead::new(vocab, dim))
        }
        LayerSpec::Residual { ref layers } => {
            let mut inner: Vec<Box<dyn Layer<B>>> = Vec::with_capacity(layers.len());
            let mut s = shape.to_vec();
            for (j, l) in layers.iter().enumerate() {
                let layer = build(l, &s, seed, offset + ((j as u64 + 1) << 34), table, backend)
                    .map_err(|e| Error::invalid(format!("inside the residual, layer {j}: {e}")))?;
                s = layer.output_shape(&s)?;
                inner.push(layer);
            }
            Box::new(Residual::new(inner))
        }
    })
}

/// Keras' layer names: `MaxPooling2D` → `max_pooling2d`, `Conv2D` → `conv2d`.
fn snake_case(kind: &str) -> String {
    let mut out = String::new();
    let mut prev_lower = false;
    for ch in kind.chars() {
        if ch.is_ascii_uppercase() && prev_lower {
            out.push('_');
        }
        prev_lower = ch.is_ascii_lowercase();
        out.push(ch.to_ascii_lowercase());
    }
    out
}

/// `50240` → `50,240`.
fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::group;

    #[test]
    fn thousands_separators() {
        assert_eq!(group(0), "0");
        assert_eq!(group(650), "650");
        assert_eq!(group(50240), "50,240");
        assert_eq!(group(1234567), "1,234,567");
    }
}
