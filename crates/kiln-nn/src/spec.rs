//! A model described as data: what `kiln train --model` builds, and what
//! checkpoints store so a model can be rebuilt.

use serde::{Deserialize, Serialize};

use crate::Initializer;
use kiln_core::{Error, Result};

/// The most parameters a model may have (2³⁰, 4 GiB of f32): a spec
/// asking for more is rejected before anything is allocated.
pub const MAX_PARAMS: usize = 1 << 30;

/// How deep residuals may nest (a transformer needs one level).
const MAX_NESTING: usize = 16;

/// `total + layer` parameters (`layer` `None` when its count overflowed),
/// or why that is too many.
fn add_params(total: usize, layer: Option<usize>) -> std::result::Result<usize, String> {
    layer
        .and_then(|p| p.checked_add(total))
        .filter(|&t| t <= MAX_PARAMS)
        .ok_or_else(|| format!("the model would have more than {MAX_PARAMS} parameters"))
}

fn default_layer_norm_eps() -> f32 {
    1e-5
}

fn default_embedding_init() -> Initializer {
    Initializer::Normal { std: 0.02 }
}

fn yes() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_yes(v: &bool) -> bool {
    *v
}

/// The activation a dense layer applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationSpec {
    /// None (a linear layer).
    #[default]
    Linear,
    /// max(x, 0)
    Relu,
    /// Logistic sigmoid.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
    /// Softmax over the features.
    Softmax,
}

/// How a convolution or pooling window treats the image border. In a
/// spec file: `"valid"`, `"same"`, or a number of zero rows and columns
/// added on every side (`1`, or `[1, 2]` for rows and columns apart).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PaddingRepr", into = "PaddingRepr")]
pub enum Padding {
    /// No padding: windows only where they fit.
    #[default]
    Valid,
    /// Pad so the output has ⌈input / stride⌉ cells per axis (the odd
    /// cell at the bottom/right, as Keras and TensorFlow).
    Same,
    /// `[rows, cols]` zeros on both sides of each axis: PyTorch's
    /// `padding=` (`padding=1` is `Explicit([1, 1])`), the same at any
    /// stride.
    Explicit([usize; 2]),
}

/// How [`Padding`] is written in a spec file.
#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum PaddingRepr {
    Named(String),
    One(usize),
    Two([usize; 2]),
}

impl TryFrom<PaddingRepr> for Padding {
    type Error = String;
    fn try_from(r: PaddingRepr) -> std::result::Result<Self, String> {
        match r {
            PaddingRepr::Named(n) if n == "valid" => Ok(Padding::Valid),
            PaddingRepr::Named(n) if n == "same" => Ok(Padding::Same),
            PaddingRepr::Named(n) => Err(format!(
                "padding `{n}`: expected \"valid\", \"same\", a number of zeros per side or [rows, cols]"
            )),
            PaddingRepr::One(v) => Ok(Padding::Explicit([v, v])),
            PaddingRepr::Two(v) => Ok(Padding::Explicit(v)),
        }
    }
}

impl From<Padding> for PaddingRepr {
    fn from(p: Padding) -> Self {
        match p {
            Padding::Valid => PaddingRepr::Named("valid".into()),
            Padding::Same => PaddingRepr::Named("same".into()),
            Padding::Explicit([r, c]) if r == c => PaddingRepr::One(r),
            Padding::Explicit(v) => PaddingRepr::Two(v),
        }
    }
}

/// A height × width pair, written as one number (`3`, square) or two
/// (`[3, 5]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PairRepr", into = "[usize; 2]")]
pub struct Pair(pub [usize; 2]);

#[derive(Deserialize)]
#[serde(untagged)]
enum PairRepr {
    One(usize),
    Two([usize; 2]),
}

impl From<PairRepr> for Pair {
    fn from(r: PairRepr) -> Self {
        match r {
            PairRepr::One(v) => Pair([v, v]),
            PairRepr::Two(v) => Pair(v),
        }
    }
}

impl From<Pair> for [usize; 2] {
    fn from(p: Pair) -> Self {
        p.0
    }
}

fn default_strides() -> Pair {
    Pair([1, 1])
}

/// One layer of a [`ModelSpec`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum LayerSpec {
    /// Collapses every dimension but the batch.
    Flatten,
    /// A fully connected layer.
    ///
    /// It acts on the last axis of a `[features]` or `[positions,
    /// features]` example; an image (`[channels, height, width]`) needs a
    /// Flatten first.
    Dense {
        /// Output features.
        units: usize,
        /// Activation applied to the output.
        #[serde(default)]
        activation: ActivationSpec,
        /// Kernel initialiser (default Glorot uniform, as Keras).
        #[serde(default = "default_kernel_init")]
        kernel_init: Initializer,
        /// Whether the layer adds a learned bias (default yes).
        #[serde(default = "yes", skip_serializing_if = "is_yes")]
        bias: bool,
    },
    /// 2-D convolution over `[channels, height, width]` examples, with a
    /// bias per filter and a fused activation.
    Conv2d {
        /// Output channels.
        filters: usize,
        /// Window height and width.
        kernel_size: Pair,
        /// Step between windows (default 1).
        #[serde(default = "default_strides")]
        strides: Pair,
        /// Border handling (default `valid`).
        #[serde(default)]
        padding: Padding,
        /// Activation applied to the output (default linear; not softmax).
        #[serde(default)]
        activation: ActivationSpec,
        /// Kernel initialiser (default Glorot uniform, as Keras).
        #[serde(default = "default_kernel_init")]
        kernel_init: Initializer,
    },
    /// 2-D max-pooling.
    #[serde(rename = "maxpool2d")]
    MaxPool2d {
        /// Window height and width.
        pool_size: Pair,
        /// Step between windows (default: the window).
        #[serde(default)]
        strides: Option<Pair>,
        /// Border handling (default `valid`).
        #[serde(default)]
        padding: Padding,
    },
    /// Inverted dropout while training; the identity otherwise.
    Dropout {
        /// Fraction of the inputs zeroed, in [0, 1).
        rate: f32,
    },
    /// Layer normalisation over the last axis, with a learned scale γ
    /// (initially 1) and shift β (initially 0) per feature.
    #[serde(rename = "layernorm")]
    LayerNorm {
        /// Added to the variance (default 1e-5, as PyTorch and GPT-2).
        #[serde(default = "default_layer_norm_eps")]
        eps: f32,
        /// Whether the shift β is learned (default yes; no: β = 0).
        #[serde(default = "yes", skip_serializing_if = "is_yes")]
        bias: bool,
    },
    /// Token embedding: an example of `positions` u32 token ids becomes
    /// `[positions, dim]`, the rows of a learned `[vocab, dim]` table. Only
    /// as a model's first layer (its input is ids, not numbers).
    Embedding {
        /// Rows of the table (ids must be below it).
        vocab: usize,
        /// Width of each row.
        dim: usize,
        /// How the table starts (default N(0, 0.02²), as GPT-2).
        #[serde(default = "default_embedding_init")]
        init: Initializer,
    },
    /// Adds a learned vector per position to `[positions, width]` (the
    /// first `positions` rows of a `[block, width]` table).
    #[serde(rename = "position_embedding")]
    PositionEmbedding {
        /// The most positions an example may have (the context length).
        block: usize,
        /// How the table starts (default N(0, 0.02²), as GPT-2).
        #[serde(default = "default_embedding_init")]
        init: Initializer,
    },
    /// Causal multi-head self-attention over `[positions, width]`: one
    /// projection to queries, keys and values (`width → 3·width`), `heads`
    /// heads of `width / heads` each, position `i` attending to positions
    /// `0..=i` with softmax(q·kᵀ/√d), then a projection back to `width`.
    Attention {
        /// Number of heads; must divide the width.
        heads: usize,
        /// Dropout on the attention weights while training (default 0).
        #[serde(default)]
        dropout: f32,
        /// Whether both projections add a learned bias (default yes).
        #[serde(default = "yes", skip_serializing_if = "is_yes")]
        bias: bool,
        /// The query/key/value projection's initialiser (default N(0, 0.02²)).
        #[serde(default = "default_embedding_init")]
        kernel_init: Initializer,
        /// The output projection's initialiser (default N(0, 0.02²); GPT-2
        /// scales it by 1/√(2·layers)).
        #[serde(default = "default_embedding_init")]
        proj_init: Initializer,
    },
    /// `x + f(x)`, where `f` is the layers inside applied in order; they
    /// must keep the shape. The pre-norm transformer block is two of these.
    Residual {
        /// The layers of `f`.
        layers: Vec<LayerSpec>,
    },
    /// Logits over the vocabulary, `[positions, width] → [positions,
    /// vocab]`, by the transposed table of the model's Embedding layer
    /// (weight tying, as GPT-2): no parameters of its own. An untied head is
    /// a Dense layer (`bias = false`).
    #[serde(rename = "lm_head")]
    LmHead,
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

/// Images whose convolution patch matrices may exist at once (the CPU
/// backend's filter-gradient group, and its threads' images).
const CONV_IMAGES_AT_ONCE: u128 = 8;

/// The output shape of `layer` for an input of `shape`, for a spec that
/// [`ModelSpec::plan`] accepted.
fn layer_output(layer: &LayerSpec, shape: &[usize]) -> Vec<usize> {
    match (layer, shape) {
        (LayerSpec::Flatten, _) => vec![shape.iter().product()],
        (LayerSpec::Dense { units, .. }, _) => {
            let mut out = shape.to_vec();
            *out.last_mut().expect("shapes are never empty") = *units;
            out
        }
        (LayerSpec::Embedding { dim, .. }, &[positions]) => vec![positions, *dim],
        (LayerSpec::Conv2d { filters, .. }, &[_, h, w]) => layer
            .window([h, w])
            .and_then(|win| win.output("Conv2D", [h, w]).ok())
            .map_or_else(|| shape.to_vec(), |[oh, ow]| vec![*filters, oh, ow]),
        (LayerSpec::MaxPool2d { .. }, &[c, h, w]) => layer
            .window([h, w])
            .and_then(|win| win.output("MaxPool2D", [h, w]).ok())
            .map_or_else(|| shape.to_vec(), |[oh, ow]| vec![c, oh, ow]),
        _ => shape.to_vec(),
    }
}

/// What [`ModelSpec::memory`] adds up, layer by layer.
struct MemoryTally {
    /// Activation elements kept per example.
    elements: u128,
    /// The largest convolution workspace, in bytes.
    workspace: u128,
    /// The Embedding layer's `[vocab, dim]`.
    table: Option<[usize; 2]>,
    /// Examples per step.
    batch: u128,
}

impl MemoryTally {
    /// Adds `layers` run on `shape`; returns the output shape.
    fn layers(&mut self, layers: &[LayerSpec], mut shape: Vec<usize>) -> Vec<usize> {
        let count = |s: &[usize]| s.iter().map(|&d| d as u128).product::<u128>();
        for layer in layers {
            match (layer, shape.as_slice()) {
                (LayerSpec::Conv2d { .. }, &[c, h, w]) => {
                    if let Some(win) = layer.window([h, w]) {
                        if let Ok([oh, ow]) = win.output("Conv2D", [h, w]) {
                            let [kh, kw] = win.kernel;
                            let patch = (c * kh * kw) as u128 * (oh * ow) as u128 * 4;
                            self.workspace = self
                                .workspace
                                .max(patch * self.batch.min(CONV_IMAGES_AT_ONCE));
                        }
                    }
                }
                (LayerSpec::Embedding { vocab, dim, .. }, _) => self.table = Some([*vocab, *dim]),
                // The projections (4 of the width), the scores and the
                // attention weights (heads × positions² each).
                (LayerSpec::Attention { heads, .. }, &[t, c]) => {
                    self.elements += 4 * (t * c) as u128 + 2 * (*heads * t * t) as u128;
                }
                (LayerSpec::Residual { layers }, _) => {
                    self.layers(layers, shape.clone());
                }
                _ => {}
            }
            shape = match (layer, shape.as_slice(), self.table) {
                (LayerSpec::LmHead, &[t, _], Some([vocab, _])) => vec![t, vocab],
                _ => layer_output(layer, &shape),
            };
            self.elements += count(&shape);
        }
        shape
    }
}

/// A training run's memory, estimated by [`ModelSpec::memory`], in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Parameters, gradients and optimiser state.
    pub params: u64,
    /// Activations and their gradients for one batch.
    pub activations: u64,
    /// The largest convolution workspace.
    pub workspace: u64,
}

impl MemoryPlan {
    /// The estimate's total.
    pub fn total(&self) -> u64 {
        self.params
            .saturating_add(self.activations)
            .saturating_add(self.workspace)
    }

    /// An error if the total exceeds `limit` bytes, saying what takes the
    /// room and what to change.
    pub fn check(&self, model: &str, batch: usize, limit: u64) -> Result<()> {
        if self.total() <= limit {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "model `{model}` at batch {batch} needs about {} (parameters and optimiser {}, activations {}, \
             convolution workspace {}), over the {} limit: use a smaller batch or model, or raise KILN_MEMORY_LIMIT",
            gib(self.total()),
            gib(self.params),
            gib(self.activations),
            gib(self.workspace),
            gib(limit)
        )))
    }
}

/// Bytes as GiB (or MiB when small), for messages and summaries.
pub fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// The memory a run may plan for: `KILN_MEMORY_LIMIT` (bytes, or with a
/// `K`, `M`, `G` or `T` suffix), else 80 % of the machine's physical memory
/// (`/proc/meminfo`), else 16 GiB.
pub fn memory_limit() -> Result<u64> {
    if let Some(v) = kiln_core::env::setting("KILN_MEMORY_LIMIT")? {
        let t = v.trim();
        let (num, mult) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let m: u64 = match c.to_ascii_uppercase() {
                    'K' => 1 << 10,
                    'M' => 1 << 20,
                    'G' => 1 << 30,
                    'T' => 1 << 40,
                    _ => 0,
                };
                (&t[..i], m)
            }
            _ => (t, 1),
        };
        return match num.trim().parse::<f64>() {
            Ok(n) if mult > 0 && n.is_finite() && n > 0.0 => Ok((n * mult as f64) as u64),
            _ => Err(Error::invalid(format!(
                "KILN_MEMORY_LIMIT={v:?}: expected bytes, e.g. 8G or 512M"
            ))),
        };
    }
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    Ok(total.map_or(16 << 30, |kb| kb * 1024 / 10 * 8))
}

impl LayerSpec {
    /// The window of a convolution or pooling layer for an input of
    /// `[h, w]`.
    pub fn window(&self, input: [usize; 2]) -> Option<kiln_core::Window2d> {
        let (kernel, strides, padding) = match *self {
            LayerSpec::Conv2d {
                kernel_size,
                strides,
                padding,
                ..
            } => (kernel_size.0, strides.0, padding),
            LayerSpec::MaxPool2d {
                pool_size,
                strides,
                padding,
            } => (pool_size.0, strides.unwrap_or(pool_size).0, padding),
            _ => return None,
        };
        Some(match padding {
            Padding::Valid => kiln_core::Window2d::valid(kernel, strides),
            Padding::Same => kiln_core::Window2d::same(kernel, strides, input),
            Padding::Explicit([r, c]) => kiln_core::Window2d {
                padding: [r, r, c, c],
                ..kiln_core::Window2d::valid(kernel, strides)
            },
        })
    }
}

fn default_kernel_init() -> Initializer {
    Initializer::GlorotUniform
}

/// What [`ModelSpec::plan`] carries from layer to layer.
struct Planner {
    /// Parameters so far.
    params: usize,
    /// The Embedding layer's `[vocab, dim]`, once one has been planned.
    table: Option<[usize; 2]>,
}

/// A planning error: the layer's path (`3`, or `2.1` inside a residual)
/// and what is wrong.
type PlanError = (String, String);

impl Planner {
    /// Plans `layers` on `shape`; `prefix` is the path of the enclosing
    /// residual (`""` at the top).
    fn layers(
        &mut self,
        layers: &[LayerSpec],
        mut shape: Vec<usize>,
        prefix: &str,
    ) -> std::result::Result<Vec<usize>, PlanError> {
        for (i, layer) in layers.iter().enumerate() {
            let at = format!("{prefix}{i}");
            shape = self.layer(layer, shape, &at, prefix.is_empty() && i == 0)?;
        }
        Ok(shape)
    }

    /// Plans one layer at path `at`; `first` when it is the model's first.
    fn layer(
        &mut self,
        layer: &LayerSpec,
        shape: Vec<usize>,
        at: &str,
        first: bool,
    ) -> std::result::Result<Vec<usize>, PlanError> {
        let fail = |msg: String| (at.to_string(), msg);
        let width = *shape.last().expect("shapes are never empty");
        Ok(match *layer {
            LayerSpec::Flatten => vec![shape.iter().product()],
            LayerSpec::Relu
            | LayerSpec::Sigmoid
            | LayerSpec::Tanh
            | LayerSpec::Gelu
            | LayerSpec::Softmax => shape,
            LayerSpec::Dropout { rate } => {
                if !(0.0..1.0).contains(&rate) {
                    return Err(fail(format!("Dropout rate {rate} must be in [0, 1)")));
                }
                shape
            }
            LayerSpec::LayerNorm { eps, bias } => {
                if !(eps.is_finite() && eps > 0.0) {
                    return Err(fail(format!(
                        "LayerNorm eps {eps} must be finite and positive (1e-5 is usual)"
                    )));
                }
                let count = width.checked_mul(1 + usize::from(bias));
                self.params = add_params(self.params, count).map_err(fail)?;
                shape
            }
            LayerSpec::Conv2d {
                filters,
                activation,
                ..
            } => {
                let [c, h, w] = shape[..] else {
                    return Err(fail(format!(
                        "Conv2D gets shape {shape:?}; it needs [channels, height, width]"
                    )));
                };
                if filters == 0 {
                    return Err(fail("Conv2D needs at least one filter".into()));
                }
                if activation == ActivationSpec::Softmax {
                    return Err(fail(
                        "Conv2D cannot end in softmax (add Flatten and Dense)".into(),
                    ));
                }
                let win = layer.window([h, w]).expect("a window layer");
                let [oh, ow] = win
                    .output("Conv2D", [h, w])
                    .map_err(|e| fail(e.to_string()))?;
                let [kh, kw] = win.kernel;
                let count = c
                    .checked_mul(kh)
                    .and_then(|v| v.checked_mul(kw))
                    .and_then(|v| v.checked_add(1))
                    .and_then(|v| v.checked_mul(filters));
                self.params = add_params(self.params, count).map_err(fail)?;
                vec![filters, oh, ow]
            }
            LayerSpec::MaxPool2d { .. } => {
                let [c, h, w] = shape[..] else {
                    return Err(fail(format!(
                        "MaxPool2D gets shape {shape:?}; it needs [channels, height, width]"
                    )));
                };
                let win = layer.window([h, w]).expect("a window layer");
                let [oh, ow] = win
                    .output("MaxPool2D", [h, w])
                    .map_err(|e| fail(e.to_string()))?;
                vec![c, oh, ow]
            }
            LayerSpec::Dense { units, bias, .. } => {
                if shape.len() > 2 {
                    return Err(fail(format!(
                        "Dense gets shape {shape:?}; it needs [features] or [positions, features] (add a Flatten layer before it)"
                    )));
                }
                if units == 0 {
                    return Err(fail("Dense needs at least one unit".into()));
                }
                let count = width
                    .checked_mul(units)
                    .and_then(|w| w.checked_add(if bias { units } else { 0 }));
                self.params = add_params(self.params, count).map_err(fail)?;
                let mut out = shape;
                *out.last_mut().expect("shapes are never empty") = units;
                out
            }
            LayerSpec::Embedding { vocab, dim, .. } => {
                if !first || shape.len() != 1 {
                    return Err(fail(format!(
                        "Embedding must be the model's first layer, on an input of [positions] token ids (it gets {shape:?})"
                    )));
                }
                if vocab == 0 || dim == 0 {
                    return Err(fail(format!(
                        "Embedding needs a vocabulary and a width, got {vocab} × {dim}"
                    )));
                }
                self.params = add_params(self.params, vocab.checked_mul(dim)).map_err(fail)?;
                self.table = Some([vocab, dim]);
                vec![shape[0], dim]
            }
            LayerSpec::PositionEmbedding { block, .. } => {
                let [positions, _] = shape[..] else {
                    return Err(fail(format!(
                        "PositionEmbedding gets shape {shape:?}; it needs [positions, width]"
                    )));
                };
                if positions > block {
                    return Err(fail(format!(
                        "PositionEmbedding holds {block} positions; the input has {positions}"
                    )));
                }
                self.params = add_params(self.params, block.checked_mul(width)).map_err(fail)?;
                shape
            }
            LayerSpec::Attention {
                heads,
                dropout,
                bias,
                ..
            } => {
                if shape.len() != 2 {
                    return Err(fail(format!(
                        "Attention gets shape {shape:?}; it needs [positions, width]"
                    )));
                }
                if heads == 0 || !width.is_multiple_of(heads) {
                    return Err(fail(format!(
                        "Attention: {heads} heads do not divide the width {width}"
                    )));
                }
                if !(0.0..1.0).contains(&dropout) {
                    return Err(fail(format!(
                        "Attention dropout {dropout} must be in [0, 1)"
                    )));
                }
                let b = if bias { 4 * width } else { 0 };
                let count = width
                    .checked_mul(width)
                    .and_then(|w| w.checked_mul(4))
                    .and_then(|w| w.checked_add(b));
                self.params = add_params(self.params, count).map_err(fail)?;
                shape
            }
            LayerSpec::Residual { ref layers } => {
                if layers.is_empty() {
                    return Err(fail("Residual needs at least one layer inside".into()));
                }
                if at.matches('.').count() >= MAX_NESTING {
                    return Err(fail(format!("residuals nest at most {MAX_NESTING} deep")));
                }
                let out = self.layers(layers, shape.clone(), &format!("{at}."))?;
                if out != shape {
                    return Err(fail(format!(
                        "the layers inside Residual turn {shape:?} into {out:?}; they must keep the shape"
                    )));
                }
                shape
            }
            LayerSpec::LmHead => {
                let Some([vocab, dim]) = self.table else {
                    return Err(fail(
                        "LmHead reads the Embedding layer's table; the model has none before it"
                            .into(),
                    ));
                };
                if shape.len() != 2 || width != dim {
                    return Err(fail(format!(
                        "LmHead gets shape {shape:?}; it needs [positions, {dim}] (the embedding width)"
                    )));
                }
                vec![shape[0], vocab]
            }
        })
    }
}

/// A sequential model: the shape of one input example and the layers in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A name for summaries and checkpoints.
    pub name: String,
    /// The shape of one example, without the batch dimension (`[1, 28, 28]`).
    pub input: Vec<usize>,
    /// The layers, first to last.
    pub layers: Vec<LayerSpec>,
}

impl ModelSpec {
    /// A model named `name` with no layers yet, taking examples of shape
    /// `input` (without the batch dimension: `[channels, height, width]`
    /// for images, `[features]` for vectors). Add layers with the methods
    /// below or [`ModelSpec::push`], then [`ModelSpec::build`] it: the
    /// same model a spec file with these layers describes, initialised
    /// from one seed (layer `i` draws from its own stream, so adding a
    /// layer leaves the others' initial weights unchanged).
    ///
    /// ```
    /// use kiln_cpu::CpuBackend;
    /// use kiln_nn::{ActivationSpec::{Relu, Softmax}, ModelSpec};
    ///
    /// let spec = ModelSpec::new("mlp", [1, 28, 28])
    ///     .flatten()
    ///     .dense(64, Relu)
    ///     .dense(10, Softmax);
    /// assert_eq!(spec, ModelSpec::mlp()); // the seed's MLP, as `models/mlp.toml`
    /// let model = spec.build(42, &CpuBackend::reference())?;
    /// assert_eq!(model.num_params(), 784 * 64 + 64 + 64 * 10 + 10);
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn new(name: impl Into<String>, input: impl Into<Vec<usize>>) -> Self {
        ModelSpec {
            name: name.into(),
            input: input.into(),
            layers: Vec::new(),
        }
    }

    /// Appends any layer (see [`LayerSpec`] for every kind and field).
    pub fn push(mut self, layer: LayerSpec) -> Self {
        self.layers.push(layer);
        self
    }

    /// Appends a Flatten layer.
    pub fn flatten(self) -> Self {
        self.push(LayerSpec::Flatten)
    }

    /// Appends a Dense layer of `units` outputs with a bias and Glorot
    /// uniform initial weights, as Keras.
    pub fn dense(self, units: usize, activation: ActivationSpec) -> Self {
        self.push(LayerSpec::Dense {
            units,
            activation,
            kernel_init: Initializer::GlorotUniform,
            bias: true,
        })
    }

    /// Appends a 2-D convolution of `filters` square `kernel × kernel`
    /// windows, stride 1, no padding (Keras' `valid`), with a bias per
    /// filter; [`ModelSpec::conv2d_padded`] sets the stride and padding.
    pub fn conv2d(self, filters: usize, kernel: usize, activation: ActivationSpec) -> Self {
        self.conv2d_padded(filters, kernel, 1, Padding::Valid, activation)
    }

    /// Appends a 2-D convolution with a given stride and padding: a
    /// PyTorch `Conv2d(c, 32, 3, stride=2, padding=1)` is
    /// `.conv2d_padded(32, 3, 2, Padding::Explicit([1, 1]), …)`.
    pub fn conv2d_padded(
        self,
        filters: usize,
        kernel: usize,
        stride: usize,
        padding: Padding,
        activation: ActivationSpec,
    ) -> Self {
        self.push(LayerSpec::Conv2d {
            filters,
            kernel_size: Pair([kernel, kernel]),
            strides: Pair([stride, stride]),
            padding,
            activation,
            kernel_init: Initializer::GlorotUniform,
        })
    }

    /// Appends a max-pooling of square `size × size` windows, as many
    /// apart (no padding).
    pub fn max_pool2d(self, size: usize) -> Self {
        self.push(LayerSpec::MaxPool2d {
            pool_size: Pair([size, size]),
            strides: None,
            padding: Padding::Valid,
        })
    }

    /// Appends inverted dropout of `rate` (active only while training).
    pub fn dropout(self, rate: f32) -> Self {
        self.push(LayerSpec::Dropout { rate })
    }

    /// Builds the model on `backend` with initial weights from `seed`
    /// ([`Sequential::from_spec`](crate::Sequential::from_spec)); an error
    /// names the first layer that does not fit the shape before it.
    pub fn build<B: kiln_core::Backend>(
        &self,
        seed: u64,
        backend: &B,
    ) -> Result<crate::Sequential<B>> {
        crate::Sequential::from_spec(self, seed, backend)
    }

    /// The seed's MLP: Flatten → Dense 64 ReLU → Dense 10 softmax, on 1×28×28 images.
    pub fn mlp() -> Self {
        ModelSpec::new("mlp", [1, 28, 28])
            .flatten()
            .dense(64, ActivationSpec::Relu)
            .dense(10, ActivationSpec::Softmax)
    }

    /// The seed's CNN: Conv2D 32 3×3 ReLU → MaxPool 2×2 → Flatten → Dense
    /// 64 ReLU → Dense 10 softmax, on 1×28×28 images.
    pub fn cnn() -> Self {
        ModelSpec::new("cnn", [1, 28, 28])
            .conv2d(32, 3, ActivationSpec::Relu)
            .max_pool2d(2)
            .flatten()
            .dense(64, ActivationSpec::Relu)
            .dense(10, ActivationSpec::Softmax)
    }

    /// A built-in model by name.
    pub fn builtin(name: &str) -> Result<Self> {
        match name {
            "mlp" => Ok(Self::mlp()),
            "cnn" => Ok(Self::cnn()),
            other => Err(Error::invalid(format!(
                "unknown model `{other}`: the built-in models are mlp, cnn and gpt (a language model); \
                 or give the path of a model spec file (path/to/model.toml)"
            ))),
        }
    }

    /// A built-in model's name (`mlp`, `cnn`) or the path of a spec file
    /// (`.toml`, or `.json` as [`ModelSpec::to_json`] writes it): what
    /// `kiln train --model` and the C ABI's `kiln_model_new` accept.
    ///
    /// ```
    /// use kiln_nn::ModelSpec;
    /// assert_eq!(ModelSpec::resolve("mlp")?.name, "mlp");
    /// assert!(ModelSpec::resolve("no-such-model").is_err());
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        let path = std::path::Path::new(name_or_path);
        let ext = path.extension().and_then(|e| e.to_str());
        if !matches!(ext, Some("toml" | "json")) {
            return Self::builtin(name_or_path);
        }
        let text = kiln_core::files::read_to_string(path, "model spec")?;
        let parsed = if ext == Some("toml") {
            #[cfg(feature = "toml")]
            let spec = Self::from_toml(&text);
            #[cfg(not(feature = "toml"))]
            let spec = Err(Error::invalid(
                "this build of kiln-nn reads no TOML (its `toml` feature is off): give the spec as JSON",
            ));
            spec
        } else {
            Self::from_json(&text).and_then(|s| s.plan().map(|_| s))
        };
        parsed.map_err(|e| Error::invalid(format!("{}: {e}", path.display())))
    }

    /// Parses a spec from TOML: `name`, `input` and one `[[layers]]` table
    /// per layer with its `type` (`conv2d`, `maxpool2d`, `dropout`,
    /// `flatten`, `dense`, `relu`, …). Unknown fields and layer types are
    /// errors; the spec is then [planned](ModelSpec::plan).
    #[cfg(feature = "toml")]
    pub fn from_toml(s: &str) -> Result<Self> {
        let spec: ModelSpec =
            toml::from_str(s).map_err(|e| Error::invalid(format!("model spec: {e}")))?;
        spec.plan()?;
        Ok(spec)
    }

    /// The spec as TOML.
    #[cfg(feature = "toml")]
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a ModelSpec always serialises")
    }

    /// Checks the spec without allocating anything: every layer fits the
    /// shape before it and the model has at most [`MAX_PARAMS`] parameters.
    /// Returns the output shape of one example and the parameter count.
    pub fn plan(&self) -> Result<(Vec<usize>, usize)> {
        if self.input.is_empty() || self.input.contains(&0) || self.input.len() > 8 {
            return Err(Error::invalid(format!(
                "model `{}`: input shape {:?} must have 1 to 8 dimensions, none of extent 0",
                self.name, self.input
            )));
        }
        kiln_core::Shape::new(&self.input)?;
        let mut planner = Planner {
            params: 0,
            table: None,
        };
        let shape = planner
            .layers(&self.layers, self.input.clone(), "")
            .map_err(|(at, msg)| {
                Error::invalid(format!("model `{}`, layer {at}: {msg}", self.name))
            })?;
        Ok((shape, planner.params))
    }

    /// What training this model at `batch` examples per step takes in
    /// memory, estimated from the spec alone (nothing is allocated): the
    /// parameters with their gradients and two optimiser slots (16 bytes
    /// each), every layer's activations and their gradients (8 bytes per
    /// element and example), and the largest convolution's patch matrix for
    /// the images unfolded at once. Errors as [`ModelSpec::plan`] does.
    pub fn memory(&self, batch: usize) -> Result<MemoryPlan> {
        let (_, params) = self.plan()?;
        let batch = batch.max(1) as u128;
        let input: u128 = self.input.iter().map(|&d| d as u128).product();
        let mut tally = MemoryTally {
            elements: 0,
            workspace: 0,
            table: None,
            batch,
        };
        tally.layers(&self.layers, self.input.clone());
        let clamp = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
        Ok(MemoryPlan {
            params: clamp(params as u128 * 16),
            activations: clamp(input * batch * 4 + tally.elements * batch * 8),
            workspace: clamp(tally.workspace),
        })
    }

    /// Parses a spec from JSON (as stored in checkpoints).
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| Error::invalid(format!("model spec: {e}")))
    }

    /// The spec as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a ModelSpec always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "toml")]
    fn explicit_padding_reads_writes_and_plans_as_pytorch_does() {
        let toml = r#"
            name = "strided"
            input = [3, 28, 28]
            [[layers]]
            type = "conv2d"
            filters = 8
            kernel_size = 3
            strides = 2
            padding = 1
            [[layers]]
            type = "maxpool2d"
            pool_size = 3
            strides = 1
            padding = [1, 0]
        "#;
        let spec = ModelSpec::from_toml(toml).unwrap();
        let built = ModelSpec::new("strided", [3, 28, 28])
            .conv2d_padded(8, 3, 2, Padding::Explicit([1, 1]), ActivationSpec::Linear)
            .push(LayerSpec::MaxPool2d {
                pool_size: Pair([3, 3]),
                strides: Some(Pair([1, 1])),
                padding: Padding::Explicit([1, 0]),
            });
        assert_eq!(spec, built, "the file and the builder give one model");
        // PyTorch: ⌊(28 + 2·1 − 3) / 2⌋ + 1 = 14; then 14 + 2 − 3 + 1 rows, 14 − 3 + 1 columns.
        assert_eq!(spec.plan().unwrap().0, vec![8, 14, 12]);
        assert_eq!(ModelSpec::from_toml(&spec.to_toml()).unwrap(), spec);
        assert_eq!(ModelSpec::from_json(&spec.to_json()).unwrap(), spec);
        for (padding, want) in [("\"valid\"", Padding::Valid), ("\"same\"", Padding::Same)] {
            let t = toml.replacen("padding = 1", &format!("padding = {padding}"), 1);
            let s = ModelSpec::from_toml(&t).unwrap();
            assert!(matches!(s.layers[0], LayerSpec::Conv2d { padding, .. } if padding == want));
        }
        let e = ModelSpec::from_toml(&toml.replacen("padding = 1", "padding = \"vaild\"", 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("padding `vaild`") && e.contains("[rows, cols]"),
            "{e}"
        );
        let e = ModelSpec::from_toml(&toml.replacen("padding = 1", "padding = 3", 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("smaller than the 3×3 window"), "{e}");
    }

    #[test]
    fn memory_estimates_follow_the_spec() {
        let m = ModelSpec::mlp().memory(100).unwrap();
        assert_eq!(m.params, 50_890 * 16);
        // The input (4 bytes) and flatten, dense 64, dense 10 (8 bytes each), per example.
        assert_eq!(m.activations, 100 * (784 * 4 + (784 + 64 + 10) * 8));
        assert_eq!(m.workspace, 0);
        let c = ModelSpec::cnn().memory(100).unwrap();
        // Conv 32 3×3 on 28×28: a 9 × 676 patch matrix per image, 8 at once.
        assert_eq!(c.workspace, 9 * 676 * 4 * 8);
        let e = c.check("cnn", 100, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("over the 1.0 MiB limit"), "{e}");
        assert!(c.check("cnn", 100, 1 << 30).is_ok());
    }
}
