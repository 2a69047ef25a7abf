//! Causal multi-head self-attention, the transformer's mixing layer.
//!
//! ```
//! use kiln_core::Tensor;
//! use kiln_cpu::CpuBackend;
//! use kiln_nn::{Initializer, LayerSpec, ModelSpec};
//!
//! // Causal self-attention over 4 positions of width 8, in 2 heads.
//! let b = CpuBackend::reference();
//! let init = Initializer::Normal { std: 0.5 };
//! let attn = LayerSpec::Attention { heads: 2, dropout: 0.0, bias: true, kernel_init: init, proj_init: init };
//! let model = ModelSpec::new("attn", [4, 8]).push(attn).build(1, &b)?;
//! let x: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
//! let mut later = x.clone();
//! later[24..].iter_mut().for_each(|v| *v += 1.0); // change position 3 only
//! let run = |v: Vec<f32>| model.forward(&Tensor::from_slice(&v, &[1, 4, 8], &b)?)?.to_vec_f32();
//! let (y, y2) = (run(x)?, run(later)?);
//! // Positions 0–2 cannot see position 3; position 3's output changes.
//! assert_eq!(y[..24], y2[..24]);
//! assert_ne!(y[24..], y2[24..]);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kiln_core::{
    Activation, AttentionDropout, AttentionOptions, Backend, Error, Result, Tensor, Var,
};

use crate::decode::DecodeState;
use crate::layers::Layer;
use crate::precision::param_for;
use crate::spec::LayerSpec;
use crate::Initializer;

/// Offset between the two projections' draws in a layer's Philox stream.
const PROJ_DRAWS: u64 = 1 << 33;

/// Causal multi-head self-attention over `[n, positions, width]`.
///
/// One GEMM projects to queries, keys and values (`width → 3·width`); a
/// single copy lays them out head-major (`[3, heads·n, positions, head
/// width]`), after which the backend's fused causal attention
/// ([`Tensor::attention_causal_with`]) computes `softmax_causal(q·kᵀ/√d)·v`
/// for all `heads·n` problems, with dropout on the weights while training
/// ([`AttentionDropout`]: drawn inside the kernel, the `[heads·n,
/// positions, positions]` weights never stored). One more copy merges the
/// heads for the output projection.
///
/// [`Layer::decode`] keeps each step's keys and values in the
/// [`DecodeState`], so a new token attends over the cache in one step.
pub struct CausalSelfAttention<B: Backend> {
    heads: usize,
    qkv: Var<B>,
    qkv_bias: Option<Var<B>>,
    proj: Var<B>,
    proj_bias: Option<Var<B>>,
    dropout: f32,
    kernel_init: Initializer,
    proj_init: Initializer,
    seed: u64,
    base: u64,
    drawn: AtomicU64,
    training: AtomicBool,
}

impl<B: Backend> CausalSelfAttention<B> {
    /// Attention of `heads` heads over `width` features (`heads` divides
    /// it), described by `spec` (a [`LayerSpec::Attention`]); weights from
    /// the Philox stream `(seed, offset)`, dropout masks from `(mask_seed,
    /// offset)`.
    pub fn new(
        spec: &LayerSpec,
        width: usize,
        seed: u64,
        mask_seed: u64,
        offset: u64,
        backend: &B,
    ) -> Result<Self> {
        let &LayerSpec::Attention {
            heads,
            dropout,
            bias,
            kernel_init,
            proj_init,
        } = spec
        else {
            return Err(Error::invalid(format!(
                "CausalSelfAttention needs an attention spec, got {spec:?}"
            )));
        };
        if heads == 0 || width == 0 || !width.is_multiple_of(heads) {
            return Err(Error::invalid(format!(
                "Attention: {heads} heads do not divide the width {width}"
            )));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::invalid(format!(
                "Attention dropout {dropout} must be in [0, 1)"
            )));
        }
        let qkv = kernel_init.init(&[width, 3 * width], width, 3 * width, seed, offset, backend)?;
        let proj = proj_init.init(
            &[width, width],
            width,
            width,
            seed,
            offset + PROJ_DRAWS,
            backend,
        )?;
        let zeros = |n: usize| -> Result<Option<Var<B>>> {
            if bias {
                let z = Initializer::Zeros.init(&[n], n, n, seed, offset, backend)?;
                Ok(Some(Var::from_tensor(&z)?))
            } else {
                Ok(None)
            }
        };
        Ok(CausalSelfAttention {
            heads,
            qkv: Var::from_tensor(&qkv)?,
            qkv_bias: zeros(3 * width)?,
            proj: Var::from_tensor(&proj)?,
            proj_bias: zeros(width)?,
            dropout,
            kernel_init,
            proj_init,
            seed: mask_seed,
            base: offset,
            drawn: AtomicU64::new(0),
            training: AtomicBool::new(false),
        })
    }

    fn width(&self) -> usize {
        self.proj.shape().dims()[0]
    }

    /// The layer on `x` `[n, t, width]`; with `state`, the keys and values
    /// are appended to its cache and the queries attend over all of them.
    fn attend(&self, x: &Tensor<B>, state: Option<&mut DecodeState<B>>) -> Result<Tensor<B>> {
        let c = self.width();
        let (n, t) = match *x.dims() {
            [n, t, w] if w == c && t > 0 => (n, t),
            _ => {
                return Err(Error::shape(
                    "Attention",
                    format!(
                        "input has shape {}, expected [n, positions, {c}]",
                        x.shape()
                    ),
                ))
            }
        };
        let (h, d) = (self.heads, c / self.heads);
        let bias = self
            .qkv_bias
            .as_ref()
            .map(|b| param_for(b, x))
            .transpose()?;
        let qkv = x.reshape(&[n * t, c])?.linear(
            &param_for(&self.qkv, x)?,
            bias.as_ref(),
            Activation::None,
        )?;
        // [n, t, 3·c]: each third holds the h heads side by side, which
        // the attention reads in place (no copies to split the heads).
        let qkv = qkv.reshape(&[n, t, 3 * c])?;
        let part = |i: usize| qkv.narrow(2, i * c, c);
        let (q, mut k, mut v) = (part(0)?, part(1)?, part(2)?);
        if let Some(state) = state {
            (k, v) = state.append(&k, &v)?;
        }
        let mut options = AttentionOptions::new(1.0 / (d as f32).sqrt()).with_heads(h);
        if self.dropout > 0.0 && self.training.load(Ordering::Relaxed) {
            // One draw per weight of the [n·h, t, s] probabilities, which
            // the fused kernel never stores: it draws each where it uses it.
            let weights = (h * n * t * k.dims()[1]) as u64;
            let at = self.drawn.fetch_add(weights, Ordering::Relaxed);
            options = options.with_dropout(AttentionDropout::new(
                self.dropout,
                self.seed,
                self.base + at,
            )?);
        }
        // Fused: the [n·h, t, s] probabilities are never stored; the
        // result [n, t, c] has the heads side by side again (merged).
        let merged = q
            .attention_causal_with(&k, &v, &options)?
            .reshape(&[n * t, c])?;
        let bias = self
            .proj_bias
            .as_ref()
            .map(|b| param_for(b, x))
            .transpose()?;
        merged
            .linear(&param_for(&self.proj, x)?, bias.as_ref(), Activation::None)?
            .reshape(&[n, t, c])
    }
}

impl<B: Backend> Layer<B> for CausalSelfAttention<B> {
    fn kind(&self) -> &'static str {
        "Attention"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        match input {
            &[_, w] if w == self.width() => Ok(input.to_vec()),
            _ => Err(Error::shape(
                "Attention",
                format!(
                    "input has shape {input:?}, expected [positions, {}]",
                    self.width()
                ),
            )),
        }
    }
    fn forward(&self, x: &Tensor<B>) -> Result<Tensor<B>> {
        self.attend(x, None)
    }
    fn decode(
        &self,
        x: &Tensor<B>,
        _table: Option<&Var<B>>,
        state: &mut DecodeState<B>,
    ) -> Result<Tensor<B>> {
        self.attend(x, Some(state))
    }
    fn params(&self) -> Vec<&Var<B>> {
        [
            Some(&self.qkv),
            self.qkv_bias.as_ref(),
            Some(&self.proj),
            self.proj_bias.as_ref(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Var<B>> {
        [
            Some(&mut self.qkv),
            self.qkv_bias.as_mut(),
            Some(&mut self.proj),
            self.proj_bias.as_mut(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
    fn param_names(&self) -> Vec<String> {
        let bias = self.qkv_bias.is_some();
        [
            Some("qkv_weight"),
            bias.then_some("qkv_bias"),
            Some("proj_weight"),
            bias.then_some("proj_bias"),
        ]
        .into_iter()
        .flatten()
        .map(String::from)
        .collect()
    }
    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }
    fn rng_positions(&self) -> Vec<u64> {
        vec![self.drawn.load(Ordering::Relaxed)]
    }
    fn set_rng_positions(&self, positions: &[u64]) -> usize {
        crate::layers::restore_position(&self.drawn, positions)
    }
    fn rng_draws_per_example(&self, input: &[usize]) -> Vec<u64> {
        // One draw per attention weight: heads × positions × positions.
        let t = input.first().copied().unwrap_or(0) as u64;
        let draws = if self.dropout > 0.0 {
            self.heads as u64 * t * t
        } else {
            0
        };
        vec![draws]
    }
    fn spec(&self) -> LayerSpec {
        LayerSpec::Attention {
            heads: self.heads,
            dropout: self.dropout,
            bias: self.qkv_bias.is_some(),
            kernel_init: self.kernel_init,
            proj_init: self.proj_init,
        }
    }
}
