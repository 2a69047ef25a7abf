//! Attention's building blocks: the default implementations of
//! [`Backend::softmax_causal`] and of causal attention
//! ([`Backend::attention_causal`] and its backward pass), composed from
//! primitive ops.
//!
//! ```
//! use kiln_core::Tensor;
//! use kiln_cpu::CpuBackend;
//!
//! let b = CpuBackend::reference();
//! let scores = Tensor::from_slice(&[0.0; 9], &[3, 3], &b)?;
//! let p = scores.softmax_causal()?.to_vec_f32()?;
//! // Query 0 sees key 0 only; query 2 sees all three, equally.
//! assert_eq!(&p[..3], [1.0, 0.0, 0.0]);
//! for v in &p[6..] {
//!     assert!((v - 1.0 / 3.0).abs() < 1e-6);
//! }
//! # Ok::<(), kiln_core::Error>(())
//! ```

use crate::plan::{AttentionPlan, CausalSoftmaxPlan};
use crate::{
    Backend, BinaryOp, DType, GemmEpilogue, HostData, Layout, ReduceOp, Result, Shape, View,
};

/// What [`Backend::attention_causal_backward`] returns, each contiguous in
/// the operands' dtype and of its operand's shape.
#[derive(Clone, Debug)]
pub struct AttentionGrads<S> {
    /// With respect to the queries (`[batch, T, D]`).
    pub dq: S,
    /// With respect to the keys (`[batch, S, D]`).
    pub dk: S,
    /// With respect to the values (`[batch, S, D]`).
    pub dv: S,
}

/// f32 operands of an attention call, contiguous, with their layouts.
struct Operands<S> {
    q: S,
    k: S,
    v: S,
    lq: Layout,
    lk: Layout,
    /// `[batch, T, S]`: scores, probabilities and their gradients.
    ls: Layout,
}

impl<S> Operands<S> {
    fn new<B: Backend<Storage = S>>(
        b: &B,
        plan: &AttentionPlan,
        q: View<'_, S>,
        k: View<'_, S>,
        v: View<'_, S>,
    ) -> Result<Self> {
        let (n, t, s, d) = (plan.batch, plan.queries, plan.keys, plan.dim);
        Ok(Operands {
            q: b.cast(q, DType::F32)?,
            k: b.cast(k, DType::F32)?,
            v: b.cast(v, DType::F32)?,
            lq: Layout::contiguous(Shape::new(&[n, t, d])?),
            lk: Layout::contiguous(Shape::new(&[n, s, d])?),
            ls: Layout::contiguous(Shape::new(&[n, t, s])?),
        })
    }

    /// The causal probabilities `softmax_causal(scale·q·kᵀ)`, f32.
    fn probabilities<B: Backend<Storage = S>>(&self, b: &B, scale: f32) -> Result<S> {
        let kt = self.lk.transpose(1, 2)?;
        let ep = GemmEpilogue {
            alpha: scale,
            ..GemmEpilogue::default()
        };
        let scores = b.gemm(View::new(&self.q, &self.lq), View::new(&self.k, &kt), &ep)?;
        b.softmax_causal(View::new(&scores, &self.ls))
    }
}

/// `s` (f32, of layout `l`) in `dtype`.
fn narrowed<B: Backend>(b: &B, s: B::Storage, l: &Layout, dtype: DType) -> Result<B::Storage> {
    match dtype {
        DType::F32 => Ok(s),
        d => b.cast(View::new(&s, l), d),
    }
}

/// [`Backend::attention_causal`] from primitive ops, in f32 whatever the
/// operands' type: `P = softmax_causal(scale·q·kᵀ)`, then `P·v`. The
/// `[batch, T, S]` probabilities are held in memory, as a fused kernel's
/// are not.
pub fn compose_attention_causal<B: Backend>(
    b: &B,
    q: View<'_, B::Storage>,
    k: View<'_, B::Storage>,
    v: View<'_, B::Storage>,
    scale: f32,
) -> Result<B::Storage> {
    let plan = AttentionPlan::new(q, k, v, scale)?;
    let ops = Operands::new(b, &plan, q, k, v)?;
    let p = ops.probabilities(b, scale)?;
    let y = b.gemm(
        View::new(&p, &ops.ls),
        View::new(&ops.v, &ops.lk),
        &GemmEpilogue::default(),
    )?;
    narrowed(b, y, &ops.lq, plan.dtype)
}

/// [`Backend::attention_causal_backward`] from primitive ops, in f32: `P`
/// recomputed from `q` and `k`, then `dv = Pᵀ·dy`, `dP = dy·vᵀ`,
/// `dS = P∘(dP − Σⱼ P∘dP)`, `dq = scale·dS·k`, `dk = scale·dSᵀ·q`.
pub fn compose_attention_causal_backward<B: Backend>(
    b: &B,
    q: View<'_, B::Storage>,
    k: View<'_, B::Storage>,
    v: View<'_, B::Storage>,
    dy: View<'_, B::Storage>,
    scale: f32,
) -> Result<AttentionGrads<B::Storage>> {
    let plan = AttentionPlan::backward(q, k, v, dy, scale)?;
    let ops = Operands::new(b, &plan, q, k, v)?;
    let dy = b.cast(dy, DType::F32)?;
    let p = ops.probabilities(b, scale)?;
    let (lq, lk, ls) = (&ops.lq, &ops.lk, &ops.ls);
    let one = GemmEpilogue::default();
    let scaled = GemmEpilogue {
        alpha: scale,
        ..GemmEpilogue::default()
    };
    let pt = ls.transpose(1, 2)?;
    let dv = b.gemm(View::new(&p, &pt), View::new(&dy, lq), &one)?;
    let vt = lk.transpose(1, 2)?;
    let dp = b.gemm(View::new(&dy, lq), View::new(&ops.v, &vt), &one)?;
    let pdp = b.binary(BinaryOp::Mul, View::new(&p, ls), View::new(&dp, ls))?;
    let rows = b.reduce(ReduceOp::Sum, View::new(&pdp, ls), &[2])?;
    let spread =
        Layout::contiguous(Shape::new(&[plan.batch, plan.queries, 1])?).broadcast_as(ls.shape())?;
    let centred = b.binary(BinaryOp::Sub, View::new(&dp, ls), View::new(&rows, &spread))?;
    let ds = b.binary(BinaryOp::Mul, View::new(&p, ls), View::new(&centred, ls))?;
    let dq = b.gemm(View::new(&ds, ls), View::new(&ops.k, lk), &scaled)?;
    let dk = b.gemm(View::new(&ds, &pt), View::new(&ops.q, lq), &scaled)?;
    Ok(AttentionGrads {
        dq: narrowed(b, dq, lq, plan.dtype)?,
        dk: narrowed(b, dk, lk, plan.dtype)?,
        dv: narrowed(b, dv, lk, plan.dtype)?,
    })
}

/// [`Backend::softmax_causal`] from primitive ops: an additive mask of 0
/// and −∞ (uploaded, broadcast over the leading axes), then the softmax, in
/// f32. The masked scores take part in the sum, so they must not be NaN
/// here (a backend's own kernel does not read them).
pub fn compose_softmax_causal<B: Backend>(b: &B, x: View<'_, B::Storage>) -> Result<B::Storage> {
    let plan = CausalSoftmaxPlan::new(x)?;
    let (t, s) = (plan.queries, plan.keys);
    let mask: Vec<f32> = (0..t * s)
        .map(|k| {
            if k % s < plan.visible(k / s) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = b.upload(&HostData::F32(mask))?;
    let dims = x.layout.dims();
    let full = Layout::contiguous(Shape::new(dims)?);
    let mut strides = vec![0; dims.len()];
    strides[dims.len() - 2] = s;
    strides[dims.len() - 1] = 1;
    let spread = Layout::new(Shape::new(dims)?, strides, 0)?;
    let xs = b.cast(x, DType::F32)?;
    let masked = b.binary(
        BinaryOp::Add,
        View::new(&xs, &full),
        View::new(&mask, &spread),
    )?;
    let y = b.softmax(View::new(&masked, &full), false)?;
    match plan.dtype {
        DType::F32 => Ok(y),
        d => b.cast(View::new(&y, &full), d),
    }
}
