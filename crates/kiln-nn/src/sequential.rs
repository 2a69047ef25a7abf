//! `Sequential`: layers applied in order.

use kiln_core::{Backend, Error, Result, Tensor, Var};

use crate::layers::{Conv2D, Dense, Dropout, Flatten, Layer, LayerNorm, MaxPool2D, Nonlinearity};
use crate::precision::{to_compute, Precision};

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
        for (i, ls) in spec.layers.iter().enumerate() {
            let offset = (i as u64) << 40;
            let layer: Box<dyn Layer<B>> = match *ls {
                LayerSpec::Conv2d { .. } => {
                    Box::new(Conv2D::new(ls, &shape, seed, offset, backend)?)
                }
                LayerSpec::MaxPool2d { .. } => Box::new(MaxPool2D::new(ls, &shape)?),
                LayerSpec::Dropout { rate } => {
                    Box::new(Dropout::new(rate, seed ^ DROPOUT_STREAM, offset)?)
                }
                LayerSpec::Flatten => Box::new(Flatten),
                LayerSpec::Relu => Box::new(Nonlinearity::Relu),
                LayerSpec::Sigmoid => Box::new(Nonlinearity::Sigmoid),
                LayerSpec::Tanh => Box::new(Nonlinearity::Tanh),
                LayerSpec::Gelu => Box::new(Nonlinearity::Gelu),
                LayerSpec::LayerNorm { eps } => {
                    let width = *shape.last().expect("shapes are never empty");
                    Box::new(LayerNorm::new(width, eps, backend)?)
                }
                LayerSpec::Softmax => Box::new(Nonlinearity::Softmax),
                LayerSpec::Dense {
                    units,
                    activation,
                    kernel_init,
                } => {
                    // `plan` checked that Dense gets a flat input.
                    Box::new(Dense::new(
                        shape[0],
                        units,
                        activation,
                        kernel_init,
                        seed,
                        offset,
                        backend,
                    )?)
                }
            };
            shape = layer
                .output_shape(&shape)
                .map_err(|e| Error::invalid(format!("model `{}`, layer {i}: {e}", spec.name)))?;
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
        self.layers
            .iter()
            .filter_map(|l| l.rng_position())
            .collect()
    }

    /// Restores positions saved by [`Sequential::rng_positions`].
    pub fn set_rng_positions(&self, positions: &[u64]) -> Result<()> {
        let layers: Vec<_> = self
            .layers
            .iter()
            .filter(|l| l.rng_position().is_some())
            .collect();
        if layers.len() != positions.len() {
            return Err(Error::invalid(format!(
                "model `{}` has {} random streams, the checkpoint {}",
                self.name,
                layers.len(),
                positions.len()
            )));
        }
        for (l, &p) in layers.into_iter().zip(positions) {
            l.set_rng_position(p);
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

    fn check_input(&self, x: &Tensor<B>) -> Result<()> {
        if x.rank() != self.input.len() + 1 || x.dims()[1..] != self.input[..] {
            return Err(Error::shape(
                "Sequential",
                format!(
                    "model `{}` takes batches of shape [n, {}], got {}",
                    self.name,
                    self.input
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    x.shape()
                ),
            ));
        }
        Ok(())
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
        run(
            &self.layers,
            &to_compute(x, self.precision.compute_dtype())?,
            &stop,
        )
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
        let x = to_compute(x, self.precision.compute_dtype())?;
        let Some((last, body)) = self.layers.split_last() else {
            return Ok(Some(x));
        };
        match run(body, &x, &stop)? {
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
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                let kind = l.kind().to_ascii_lowercase();
                l.param_names()
                    .into_iter()
                    .zip(l.params())
                    .map(move |(n, p)| (format!("{i}.{kind}.{n}"), p))
            })
            .collect()
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

/// Applies `layers` in order, letting a layer absorb the max-pooling that
/// follows it (Conv2D → MaxPool2D runs as one fused op).
/// Runs `layers` on `x` (fusing a convolution with the pooling after it),
/// asking `stop` before each; `None` when it said stop.
fn run<B: Backend>(
    layers: &[Box<dyn Layer<B>>],
    x: &Tensor<B>,
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
            h = layers[i].forward(&h)?;
            i += 1;
        }
    }
    Ok(Some(h))
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
