//! The GPT decoder as a model spec: a few numbers (`models/gpt-char.toml`)
//! expanded into the [`Sequential`](crate::Sequential) layers it is made of.

use serde::{Deserialize, Serialize};

use kiln_core::{Error, Result};

use crate::spec::{ActivationSpec, LayerSpec, ModelSpec};
use crate::Initializer;

/// GPT-2's initial standard deviation for every weight.
const INIT_STD: f32 = 0.02;

/// A GPT decoder's size and regularisation, as nanoGPT names them.
///
/// [`GptConfig::spec`] expands it into layers: token and position
/// embeddings, `n_layer` pre-norm blocks (each two [`LayerSpec::Residual`]s:
/// layer norm → causal multi-head attention → dropout, and layer norm →
/// Dense 4× → GELU → Dense → dropout), a final layer norm and the LM head
/// tied to the token table. Weights start as GPT-2's: N(0, 0.02²), the two
/// projections into the residual stream N(0, (0.02/√(2·n_layer))²).
///
/// ```
/// use kiln_nn::GptConfig;
/// let cfg = GptConfig::from_toml(
///     "name = \"tiny\"\n[gpt]\nn_layer = 2\nn_head = 2\nn_embd = 16\nblock_size = 8\n",
/// )?;
/// let spec = cfg.spec(65)?;
/// assert_eq!(spec.input, [8]);
/// let (out, params) = spec.plan()?;
/// assert_eq!(out, [8, 65]);
/// // Tables 65·16 + 8·16; per block 2 norms (γ only) + 4·16² + 8·16²; a final norm.
/// assert_eq!(params, 65 * 16 + 8 * 16 + 2 * (2 * 16 + 12 * 16 * 16) + 16);
/// # Ok::<(), kiln_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// A name for summaries and checkpoints.
    #[serde(default = "default_name")]
    pub name: String,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block (divides `n_embd`).
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Context length: the most positions the model sees at once.
    pub block_size: usize,
    /// Dropout after the embeddings, on the attention weights and on each
    /// block's two outputs, while training (default 0).
    #[serde(default)]
    pub dropout: f32,
    /// Whether the linear layers and layer norms have biases (default
    /// false, as nanoGPT: a little faster and as good).
    #[serde(default)]
    pub bias: bool,
}

fn default_name() -> String {
    "gpt".into()
}

/// The file form: a `name` and a `[gpt]` table.
#[cfg(feature = "toml")]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GptFile {
    #[serde(default = "default_name")]
    name: String,
    gpt: GptConfig,
}

impl GptConfig {
    /// nanoGPT's CPU example (config A of the benchmarks): 4 layers of 4
    /// heads, 128 wide, a context of 64, no dropout.
    pub fn char_small() -> Self {
        GptConfig {
            name: "gpt-char".into(),
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 64,
            dropout: 0.0,
            bias: false,
        }
    }

    /// Parses `name = "…"` and a `[gpt]` table (`n_layer`, `n_head`,
    /// `n_embd`, `block_size`, optional `dropout` and `bias`); the numbers
    /// are checked.
    #[cfg(feature = "toml")]
    pub fn from_toml(s: &str) -> Result<Self> {
        let file: GptFile =
            toml::from_str(s).map_err(|e| Error::invalid(format!("GPT spec: {e}")))?;
        let mut cfg = file.gpt;
        if cfg.name == default_name() {
            cfg.name = file.name;
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Whether a TOML text is a GPT spec (has a `[gpt]` table) rather than
    /// a layer list.
    #[cfg(feature = "toml")]
    pub fn is_gpt_toml(s: &str) -> bool {
        toml::from_str::<toml::Table>(s).is_ok_and(|t| t.contains_key("gpt"))
    }

    /// The file form of [`GptConfig::from_toml`].
    #[cfg(feature = "toml")]
    pub fn to_toml(&self) -> String {
        format!(
            "name = {:?}\n\n[gpt]\nn_layer = {}\nn_head = {}\nn_embd = {}\nblock_size = {}\ndropout = {:?}\nbias = {}\n",
            self.name, self.n_layer, self.n_head, self.n_embd, self.block_size, self.dropout, self.bias
        )
    }

    /// Checks the numbers: at least one layer and head, heads dividing the
    /// width, dropout in [0, 1), sizes a model can have.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("GPT `{}`: {m}", self.name)));
        if self.n_layer == 0 || self.n_layer > 1024 {
            return bad(format!("n_layer {} must be 1 to 1024", self.n_layer));
        }
        if self.n_head == 0 || self.n_embd == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_head {} must divide n_embd {} (both at least 1)",
                self.n_head, self.n_embd
            ));
        }
        if self.block_size == 0 || self.block_size > 1 << 20 {
            return bad(format!("block_size {} must be 1 to 2²⁰", self.block_size));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        Ok(())
    }

    /// The model spec for a vocabulary of `vocab` tokens, planned.
    pub fn spec(&self, vocab: usize) -> Result<ModelSpec> {
        self.check()?;
        let c = self.n_embd;
        let normal = Initializer::Normal { std: INIT_STD };
        let scaled = Initializer::Normal {
            std: INIT_STD / (2.0 * self.n_layer as f32).sqrt(),
        };
        let dropout = |layers: &mut Vec<LayerSpec>| {
            if self.dropout > 0.0 {
                layers.push(LayerSpec::Dropout { rate: self.dropout });
            }
        };
        let norm = || LayerSpec::LayerNorm {
            eps: 1e-5,
            bias: self.bias,
        };
        let mut layers = vec![
            LayerSpec::Embedding {
                vocab,
                dim: c,
                init: normal,
            },
            LayerSpec::PositionEmbedding {
                block: self.block_size,
                init: normal,
            },
        ];
        dropout(&mut layers);
        for _ in 0..self.n_layer {
            let mut attn = vec![
                norm(),
                LayerSpec::Attention {
                    heads: self.n_head,
                    dropout: self.dropout,
                    bias: self.bias,
                    kernel_init: normal,
                    proj_init: scaled,
                },
            ];
            dropout(&mut attn);
            let mut mlp = vec![
                norm(),
                LayerSpec::Dense {
                    units: 4 * c,
                    activation: ActivationSpec::Linear,
                    kernel_init: normal,
                    bias: self.bias,
                },
                LayerSpec::Gelu,
                LayerSpec::Dense {
                    units: c,
                    activation: ActivationSpec::Linear,
                    kernel_init: scaled,
                    bias: self.bias,
                },
            ];
            dropout(&mut mlp);
            layers.push(LayerSpec::Residual { layers: attn });
            layers.push(LayerSpec::Residual { layers: mlp });
        }
        layers.push(norm());
        layers.push(LayerSpec::LmHead);
        let spec = ModelSpec {
            name: self.name.clone(),
            input: vec![self.block_size],
            layers,
        };
        spec.plan()?;
        Ok(spec)
    }
}
