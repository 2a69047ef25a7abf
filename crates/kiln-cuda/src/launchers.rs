//! Typed launchers: one struct per kernel entry point, its fields the
//! kernel's parameters in order — named, typed, and checked against the C
//! parameter lists in `kernels/*.cu` by `tests/abi.rs` — so a call site
//! names every argument it passes and no launch is positional.
//!
//! Device addresses are [`In`] (the kernel only reads: `const T*`) or
//! [`Out`] (it writes: `T*`); both are `u64`s, 0 for an absent optional
//! operand.

use std::ffi::c_void;

use cudarc::driver::LaunchConfig;
use kiln_core::Result;

use crate::launch::{AttentionRows, ConvArg, EpilogueArg, MatrixArg, PoolArg, Strided};
use crate::launcher::Launcher;

/// The device address of memory the kernel reads (`const T*`).
pub type In = u64;
/// The device address of memory the kernel writes (`T*`).
pub type Out = u64;

/// Defines each kernel's argument struct and its `launch`, and
/// [`SIGNATURES`].
macro_rules! kernels {
    ($(
        $(#[$doc:meta])*
        $name:ident = $kernel:literal {
            $( $(#[$fdoc:meta])* $field:ident : $ty:ident ),* $(,)?
        }
    )*) => {
        $(
            $(#[$doc])*
            #[derive(Clone, Copy, Debug)]
            pub struct $name {
                $(
                    #[doc = concat!("The kernel's `", stringify!($field), "` parameter.")]
                    $(#[$fdoc])*
                    pub $field: $ty,
                )*
            }

            impl $name {
                /// The kernel's entry point.
                pub const KERNEL: &'static str = $kernel;

                /// `(name, type)` of each parameter, in the kernel's order.
                pub const PARAMS: &'static [(&'static str, &'static str)] =
                    &[$((stringify!($field), stringify!($ty))),*];

                /// Queues the kernel on `device` over `cfg`'s grid; errors
                /// name `op`.
                ///
                /// # Safety
                ///
                /// Every device address must be valid for what the kernel
                /// reads and writes over `cfg`'s grid with these sizes.
                pub unsafe fn launch(
                    &self,
                    device: &dyn Launcher,
                    op: &str,
                    cfg: &LaunchConfig,
                ) -> Result<()> {
                    let mut args = [$(
                        std::ptr::from_ref(&self.$field).cast_mut().cast::<c_void>()
                    ),*];
                    // SAFETY: `args` points to this struct's fields, which
                    // have the kernel's parameter types in its order (the
                    // ABI test), and live until the call returns (the
                    // driver copies them when it queues the launch); the
                    // addresses are the caller's to vouch for.
                    unsafe { device.launch(op, Self::KERNEL, cfg, &mut args) }
                }
            }
        )*

        /// Every kernel and its `(name, type)` parameters.
        pub const SIGNATURES: &[(&str, &[(&str, &str)])] = &[$(($kernel, $name::PARAMS)),*];
    };
}

kernels! {
    /// `kiln_fill_b32`: `dst[i] = bits` for 32-bit elements.
    FillB32 = "kiln_fill_b32" { dst: Out, n: i64, bits: u32 }

    /// `kiln_fill_b16`: `dst[i] = bits` for 16-bit elements.
    FillB16 = "kiln_fill_b16" { dst: Out, n: i64, bits: u16 }

    /// `kiln_copy`: `dst[dst_view(i)] = convert(src[view(i)])`, `i < n`.
    Copy = "kiln_copy" {
        src: In, src_dtype: i32, view: Strided, dst: Out, dst_dtype: i32, dst_view: Strided, n: i64,
    }

    /// `kiln_unary`: `y = op(x)` on contiguous f32.
    Unary = "kiln_unary" { x: In, y: Out, n: i64, op: i32 }

    /// `kiln_unary_backward`: `dx = op'(x) · dy`.
    UnaryBackward = "kiln_unary_backward" { x: In, y: In, dy: In, dx: Out, n: i64, op: i32 }

    /// `kiln_affine`: `y = x · mul + add`.
    Affine = "kiln_affine" { x: In, y: Out, n: i64, mul: f32, add: f32 }

    /// `kiln_binary`: `y = op(a, b)`, same shapes.
    Binary = "kiln_binary" { a: In, b: In, y: Out, n: i64, op: i32 }

    /// `kiln_binary_row`: `y[i] = op(a[i], row[i % len])`, or
    /// `op(row[..], a[i])` when `row_first`.
    BinaryRow = "kiln_binary_row" {
        a: In, row: In, y: Out, n: i64, len: i64, op: i32, row_first: i32,
    }

    /// `kiln_reduce_rows`: each of `rows` contiguous runs of `run` reduced.
    ReduceRows = "kiln_reduce_rows" { x: In, y: Out, rows: i64, run: i64, op: i32 }

    /// `kiln_reduce_short_rows`: as [`ReduceRows`], one thread per row
    /// (for runs of at most [`SHORT_RUN`](crate::launch::SHORT_RUN)).
    ReduceShortRows = "kiln_reduce_short_rows" { x: In, y: Out, rows: i64, run: i64, op: i32 }

    /// `kiln_argmax_rows`: the first maximum of each row.
    ArgmaxRows = "kiln_argmax_rows" { x: In, y: Out, rows: i64, run: i64 }

    /// `kiln_softmax_rows`: softmax (or log-softmax, `log = 1`) of each row.
    SoftmaxRows = "kiln_softmax_rows" { x: In, y: Out, rows: i64, c: i64, log: i32 }

    /// `kiln_softmax_causal`: each row's softmax over the keys it sees.
    SoftmaxCausal = "kiln_softmax_causal" { x: In, y: Out, rows: i64, queries: i64, keys: i64 }

    /// `kiln_attention_causal`: `y = softmax_causal(scale·q·kᵀ)·v`, one
    /// block per query row, its probabilities in `work` (`keys` floats per
    /// block); each operand's rows where its [`AttentionRows`] puts them,
    /// `y` `[batch/heads, queries, heads·d]` (the heads merged); dropout
    /// from the stream `(seed, offset)` at `rate`, kept weights times
    /// `keep` (rate 0 and keep 1: none).
    AttentionCausal = "kiln_attention_causal" {
        q: In, qa: AttentionRows, k: In, ka: AttentionRows, v: In, va: AttentionRows, y: Out,
        work: Out, batch: i64, heads: i64, queries: i64, keys: i64, d: i64, scale: f32, seed: u64,
        offset: u64, rate: f32, keep: f32,
    }

    /// `kiln_attention_causal_backward_q`: `dq` (heads merged, as `y`)
    /// and each problem row's max, sum of exponentials and `δ` (`stats`,
    /// three floats a row); `work` holds `2·keys` floats per block.
    AttentionCausalBackwardQ = "kiln_attention_causal_backward_q" {
        q: In, qa: AttentionRows, k: In, ka: AttentionRows, v: In, va: AttentionRows, dy: In,
        dya: AttentionRows, dq: Out, stats: Out, work: Out, batch: i64, heads: i64, queries: i64,
        keys: i64, d: i64, scale: f32, seed: u64, offset: u64, rate: f32, keep: f32,
    }

    /// `kiln_attention_causal_backward_kv`: `dk` and `dv` (heads merged),
    /// one block per key row, from the query kernel's `stats`.
    AttentionCausalBackwardKv = "kiln_attention_causal_backward_kv" {
        q: In, qa: AttentionRows, k: In, ka: AttentionRows, v: In, va: AttentionRows, dy: In,
        dya: AttentionRows, stats: In, dk: Out, dv: Out, batch: i64, heads: i64, queries: i64,
        keys: i64, d: i64, scale: f32, seed: u64, offset: u64, rate: f32, keep: f32,
    }

    /// `kiln_softmax_xent`: per-row cross-entropy and its logit gradient.
    SoftmaxXent = "kiln_softmax_xent" {
        logits: In, labels: In, loss: Out, grad: Out, rows: i64, c: i64,
        /// A u64 the kernel sets to 1 + a row whose label is out of range.
        bad: Out,
    }

    /// `kiln_embedding`: table rows by id (NaN rows and `bad` for ids out of range).
    Embedding = "kiln_embedding" {
        table: In, ids: In, out: Out, positions: i64, dim: i64, vocab: i64,
        /// A u64 the kernel sets to 1 + a position whose id is out of range.
        bad: Out,
    }

    /// `kiln_embedding_backward`: the table's gradient, one thread a column.
    EmbeddingBackward = "kiln_embedding_backward" {
        ids: In, dy: In, dtable: Out, positions: i64, dim: i64, vocab: i64,
        /// As for [`Embedding`].
        bad: Out,
    }

    /// `kiln_layer_norm`: each row normalised, its mean and rstd kept.
    LayerNorm = "kiln_layer_norm" {
        x: In, gamma: In, beta: In, y: Out, mean: Out, rstd: Out, rows: i64, c: i64, eps: f32,
    }

    /// `kiln_layer_norm_backward_dx`: the input gradient, one block a row.
    LayerNormBackwardDx = "kiln_layer_norm_backward_dx" {
        x: In, gamma: In, dy: In, mean: In, rstd: In, dx: Out, rows: i64, c: i64,
    }

    /// `kiln_layer_norm_backward_params`: dγ and dβ, one thread a column.
    LayerNormBackwardParams = "kiln_layer_norm_backward_params" {
        x: In, dy: In, mean: In, rstd: In, dgamma: Out, dbeta: Out, rows: i64, c: i64,
    }

    /// `kiln_gemm_simt`: strided operands of any float type, f32 FMA.
    GemmSimt = "kiln_gemm_simt" { a: MatrixArg, b: MatrixArg, ep: EpilogueArg, m: i64, n: i64, k: i64 }

    /// `kiln_gemm_bf16`: contiguous bf16 operands on tensor cores.
    GemmBf16 = "kiln_gemm_bf16" { a: In, b: In, ep: EpilogueArg, m: i64, n: i64, k: i64 }

    /// `kiln_gemm_f16`: contiguous f16 operands on tensor cores.
    GemmF16 = "kiln_gemm_f16" { a: In, b: In, ep: EpilogueArg, m: i64, n: i64, k: i64 }

    /// `kiln_gemm_tf32`: contiguous f32 operands rounded to TF32.
    GemmTf32 = "kiln_gemm_tf32" { a: In, b: In, ep: EpilogueArg, m: i64, n: i64, k: i64 }

    /// `kiln_conv2d`: implicit-GEMM convolution with bias and activation.
    Conv2d = "kiln_conv2d" {
        x: In, w: In, bias: In, act: i32, out: Out, dtype: i32, p: ConvArg,
    }

    /// `kiln_conv2d_backward_data`: the input gradient.
    Conv2dBackwardData = "kiln_conv2d_backward_data" {
        dy: In, w: In, dx: Out, dtype: i32, p: ConvArg,
    }

    /// `kiln_conv2d_backward_filter`: per-slice filter gradients (split-K).
    Conv2dBackwardFilter = "kiln_conv2d_backward_filter" {
        x: In, dy: In, ws: Out, chunk: i64, p: ConvArg,
    }

    /// `kiln_sum_splits`: sums the split-K slices into the result.
    SumSplits = "kiln_sum_splits" { ws: In, splits: i64, len: i64, out: Out, dtype: i32 }

    /// `kiln_max_pool2d`: the maxima and where they were.
    MaxPool2d = "kiln_max_pool2d" { x: In, y: Out, dtype: i32, argmax: Out, p: PoolArg }

    /// `kiln_max_pool2d_backward`: routes `dy` to the maxima.
    MaxPool2dBackward = "kiln_max_pool2d_backward" {
        dy: In, argmax: In, dx: Out, dtype: i32, p: PoolArg,
    }

    /// `kiln_sgd`: one SGD step in place (`vel` 0 without momentum).
    Sgd = "kiln_sgd" {
        p: Out, g: In, vel: Out, n: i64, lr: f32, momentum: f32, weight_decay: f32, nesterov: i32,
    }

    /// `kiln_adam`: one Adam step in place.
    Adam = "kiln_adam" {
        p: Out, g: In, m: Out, v: Out, n: i64, lr_t: f32, beta1: f32, beta2: f32, eps: f32,
        decay: f32, l2: f32,
    }

    /// `kiln_uniform`: Philox draws in `[low, high)`.
    Uniform = "kiln_uniform" {
        dst: Out, dtype: i32, n: i64, seed: u64, offset: u64, low: f64, high: f64,
    }

    /// `kiln_normal`: Philox normal draws.
    Normal = "kiln_normal" {
        dst: Out, dtype: i32, n: i64, seed: u64, offset: u64, mean: f64, std: f64,
    }
}
