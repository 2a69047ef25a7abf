//! The layers at a language model's two ends: token and position
//! embeddings, and the LM head tied to the token table.
//!
//! ```
//! use kiln_core::{HostData, Tensor};
//! use kiln_cpu::CpuBackend;
//! use kiln_nn::{Initializer, LayerSpec, ModelSpec};
//!
//! // Token ids → rows of a learned [vocab, dim] table, plus a learned vector per position.
//! let b = CpuBackend::reference();
//! let model = ModelSpec::new("emb", [5])
//!     .push(LayerSpec::Embedding { vocab: 10, dim: 4, init: Initializer::Normal { std: 0.02 } })
//!     .push(LayerSpec::PositionEmbedding { block: 8, init: Initializer::Zeros })
//!     .build(1, &b)?;
//! let ids = Tensor::from_host(HostData::U32(vec![3, 1, 4, 1, 5]), &[1, 5], &b)?;
//! let y = model.forward(&ids)?.to_vec_f32()?;
//! assert_eq!(y.len(), 5 * 4);
//! // The same token gives the same row (the position vectors start at zero).
//! assert_eq!(y[4..8], y[12..16]);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use kiln_core::{Backend, DType, Error, Result, Tensor, Var};

use crate::decode::DecodeState;
use crate::layers::Layer;
use crate::precision::param_for;
use crate::spec::LayerSpec;
use crate::Initializer;

/// A learned `[rows, width]` table for `layer`, drawn by `init` from the
/// Philox stream `(seed, offset)`; neither extent may be 0.
fn table<B: Backend>(
    layer: &str,
    [rows, width]: [usize; 2],
    init: Initializer,
    (seed, offset): (u64, u64),
    backend: &B,
) -> Result<Var<B>> {
    if rows == 0 || width == 0 {
        return Err(Error::invalid(format!(
            "{layer} needs rows and a width, got {rows} × {width}"
        )));
    }
    Var::from_tensor(&init.init(&[rows, width], rows, width, seed, offset, backend)?)
}

/// Token embedding: `[n, positions]` u32 ids → `[n, positions, dim]`, rows
/// of a learned `[vocab, dim]` table ([`Tensor::embedding`]; its gradient
/// is a deterministic scatter-add). Ids at or above `vocab` are an error.
pub struct Embedding<B: Backend> {
    table: Var<B>,
    init: Initializer,
}

impl<B: Backend> Embedding<B> {
    /// A `[vocab, dim]` table drawn by `init` from the Philox stream
    /// `(seed, offset)`.
    pub fn new(
        vocab: usize,
        dim: usize,
        init: Initializer,
        seed: u64,
        offset: u64,
        backend: &B,
    ) -> Result<Self> {
        Ok(Embedding {
            table: table("Embedding", [vocab, dim], init, (seed, offset), backend)?,
            init,
        })
    }
}

impl<B: Backend> Layer<B> for Embedding<B> {
    fn kind(&self) -> &'static str {
        "Embedding"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let &[positions] = input else {
            return Err(Error::shape(
                "Embedding",
                format!("input has shape {input:?}, expected [positions] token ids"),
            ));
        };
        Ok(vec![positions, self.table.shape().dims()[1]])
    }
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        if x.dtype() != DType::U32 {
            return Err(Error::DType {
                op: "Embedding",
                expected: DType::U32,
                got: x.dtype(),
            });
        }
        self.table.as_tensor().embedding(x)
    }
    fn params(&self) -> Vec<&Var<B>> {
        vec![&self.table]
    }
    fn params_mut(&mut self) -> Vec<&mut Var<B>> {
        vec![&mut self.table]
    }
    fn param_names(&self) -> Vec<String> {
        vec!["table".into()]
    }
    fn table(&self) -> Option<&Var<B>> {
        Some(&self.table)
    }
    fn spec(&self) -> LayerSpec {
        let d = self.table.shape().dims();
        LayerSpec::Embedding {
            vocab: d[0],
            dim: d[1],
            init: self.init,
        }
    }
}

/// Learned absolute positions: adds row `p` of a `[block, width]` table to
/// position `p` of `[n, positions, width]` (positions ≤ block).
pub struct PositionEmbedding<B: Backend> {
    table: Var<B>,
    init: Initializer,
}

impl<B: Backend> PositionEmbedding<B> {
    /// A `[block, width]` table drawn by `init` from `(seed, offset)`.
    pub fn new(
        block: usize,
        width: usize,
        init: Initializer,
        seed: u64,
        offset: u64,
        backend: &B,
    ) -> Result<Self> {
        Ok(PositionEmbedding {
            table: table(
                "PositionEmbedding",
                [block, width],
                init,
                (seed, offset),
                backend,
            )?,
            init,
        })
    }

    /// Adds the rows `start..start + t` to `x` `[n, t, width]`.
    fn add_from(&self, x: &Tensor<B>, start: usize) -> Result<Tensor<B>> {
        let [block, width] = [self.table.shape().dims()[0], self.table.shape().dims()[1]];
        let (t, w) = match x.dims() {
            &[_, t, w] => (t, w),
            _ => (0, 0),
        };
        if w != width || start + t > block || t == 0 {
            return Err(Error::shape(
                "PositionEmbedding",
                format!(
                    "input {} at position {start} does not fit {block} positions of width {width}",
                    x.shape()
                ),
            ));
        }
        x.add(&param_for(&self.table, x)?.narrow(0, start, t)?)
    }
}

impl<B: Backend> Layer<B> for PositionEmbedding<B> {
    fn kind(&self) -> &'static str {
        "PositionEmbedding"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let d = self.table.shape().dims();
        match input {
            &[t, w] if t <= d[0] && w == d[1] => Ok(input.to_vec()),
            _ => Err(Error::shape(
                "PositionEmbedding",
                format!(
                    "input has shape {input:?}, expected at most {} positions of width {}",
                    d[0], d[1]
                ),
            )),
        }
    }
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        self.add_from(x, 0)
    }
    fn decode(
        &self,
        x: &Tensor<B>,
        _table: Option<&Var<B>>,
        state: &mut DecodeState<B>,
    ) -> Result<Tensor<B>> {
        self.add_from(x, state.position())
    }
    fn params(&self) -> Vec<&Var<B>> {
        vec![&self.table]
    }
    fn params_mut(&mut self) -> Vec<&mut Var<B>> {
        vec![&mut self.table]
    }
    fn param_names(&self) -> Vec<String> {
        vec!["table".into()]
    }
    fn spec(&self) -> LayerSpec {
        LayerSpec::PositionEmbedding {
            block: self.table.shape().dims()[0],
            init: self.init,
        }
    }
}

/// The LM head tied to the token embedding (GPT-2): logits `x·tableᵀ`,
/// `[n, positions, width] → [n, positions, vocab]`, with no parameters of
/// its own; the table's gradient sums both uses. It runs only inside a
/// [`crate::Sequential`] whose first layer is an [`Embedding`].
#[derive(Debug)]
pub struct LmHead {
    vocab: usize,
    width: usize,
}

impl LmHead {
    /// A head for the model's `[vocab, width]` embedding table.
    pub fn new(vocab: usize, width: usize) -> Self {
        LmHead { vocab, width }
    }
}

impl<B: Backend> Layer<B> for LmHead {
    fn kind(&self) -> &'static str {
        "LmHead"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        match input {
            &[t, w] if w == self.width => Ok(vec![t, self.vocab]),
            _ => Err(Error::shape(
                "LmHead",
                format!(
                    "input has shape {input:?}, expected [positions, {}]",
                    self.width
                ),
            )),
        }
    }
    fn forward(&self, _x: &Tensor<B>) -> Result<Tensor<B>> {
        Err(Error::invalid(
            "LmHead reads the token embedding's table: run it inside a Sequential that starts with an Embedding",
        ))
    }
    fn forward_with(&self, x: &Tensor<B>, table: Option<&Var<B>>) -> Result<Tensor<B>> {
        let Some(table) = table else {
            return self.forward(x);
        };
        let [vocab, width] = [table.shape().dims()[0], table.shape().dims()[1]];
        let &[n, t, w] = x.dims() else {
            return Err(Error::shape(
                "LmHead",
                format!(
                    "input has shape {}, expected [n, positions, {width}]",
                    x.shape()
                ),
            ));
        };
        if w != width || [vocab, width] != [self.vocab, self.width] {
            return Err(Error::shape(
                "LmHead",
                format!(
                    "input has width {w}, the table is {vocab} × {width}, the head was built for {} × {}",
                    self.vocab, self.width
                ),
            ));
        }
        // table·xᵀ, then viewed transposed: the same products summed in the
        // same order as x·tableᵀ, and the table's gradient comes out in the
        // table's own layout (no strided sum with the embedding's gradient).
        param_for(table, x)?
            .matmul(&x.reshape(&[n * t, w])?.t()?)?
            .t()?
            .reshape(&[n, t, vocab])
    }
    fn spec(&self) -> LayerSpec {
        LayerSpec::LmHead
    }
}
