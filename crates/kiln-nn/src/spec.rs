//! A model described as data: what `kiln train --model` builds, and what
//! checkpoints store so a model can be rebuilt.

use serde::{Deserialize, Serialize};

use crate::Initializer;
use kiln_core::{Error, Result};

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

    /// Parses a spec from JSON (as stored in checkpoints).
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| Error::invalid(format!("model spec: {e}")))
    }

    /// The spec as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a ModelSpec always serialises")
    }
}
