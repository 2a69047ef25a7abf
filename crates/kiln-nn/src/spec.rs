//! A model described as data: what `kiln train --model` builds, and what
//! checkpoints store so a model can be rebuilt.

use serde::{Deserialize, Serialize};

use crate::Initializer;
use kiln_core::{Error, Result};

/// The most parameters a model may have (2³⁰, 4 GiB of f32): a spec
/// asking for more is rejected before anything is allocated.
pub const MAX_PARAMS: usize = 1 << 30;

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

/// One layer of a [`ModelSpec`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum LayerSpec {
    /// Collapses every dimension but the batch.
    Flatten,
    /// A fully connected layer.
    Dense {
        /// Output features.
        units: usize,
        /// Activation applied to the output.
        #[serde(default)]
        activation: ActivationSpec,
        /// Kernel initialiser (default Glorot uniform, as Keras).
        #[serde(default = "default_kernel_init")]
        kernel_init: Initializer,
    },
    /// max(x, 0)
    Relu,
    /// Logistic sigmoid.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
    /// Softmax over the last axis.
    Softmax,
}

fn default_kernel_init() -> Initializer {
    Initializer::GlorotUniform
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
    /// The seed's MLP: Flatten → Dense 64 ReLU → Dense 10 softmax, on 1×28×28 images.
    pub fn mlp() -> Self {
        ModelSpec {
            name: "mlp".into(),
            input: vec![1, 28, 28],
            layers: vec![
                LayerSpec::Flatten,
                LayerSpec::Dense {
                    units: 64,
                    activation: ActivationSpec::Relu,
                    kernel_init: Initializer::GlorotUniform,
                },
                LayerSpec::Dense {
                    units: 10,
                    activation: ActivationSpec::Softmax,
                    kernel_init: Initializer::GlorotUniform,
                },
            ],
        }
    }

    /// A built-in model by name.
    pub fn builtin(name: &str) -> Result<Self> {
        match name {
            "mlp" => Ok(Self::mlp()),
            other => Err(Error::invalid(format!(
                "unknown model `{other}`: the built-in models are: mlp"
            ))),
        }
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
        let mut shape = self.input.clone();
        let mut params: usize = 0;
        for (i, layer) in self.layers.iter().enumerate() {
            let at =
                |msg: String| Error::invalid(format!("model `{}`, layer {i}: {msg}", self.name));
            shape = match *layer {
                LayerSpec::Flatten => vec![shape.iter().product()],
                LayerSpec::Relu | LayerSpec::Sigmoid | LayerSpec::Tanh | LayerSpec::Softmax => {
                    shape
                }
                LayerSpec::Dense { units, .. } => {
                    let [inputs] = shape[..] else {
                        return Err(at(format!(
                            "Dense gets shape {shape:?}; it needs a flat input (add a Flatten layer before it)"
                        )));
                    };
                    if units == 0 {
                        return Err(at("Dense needs at least one unit".into()));
                    }
                    let p = inputs
                        .checked_mul(units)
                        .and_then(|w| w.checked_add(units))
                        .and_then(|w| w.checked_add(params))
                        .filter(|&total| total <= MAX_PARAMS)
                        .ok_or_else(|| {
                            at(format!(
                                "the model would have more than {MAX_PARAMS} parameters"
                            ))
                        })?;
                    params = p;
                    vec![units]
                }
            };
        }
        Ok((shape, params))
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
