//! Attention's building blocks: its options ([`AttentionOptions`], with
//! dropout on the probabilities as [`AttentionDropout`]) and the default
//! implementations of [`Backend::softmax_causal`] and of causal attention
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
use crate::rng::{self, UNIFORMS_PER_BLOCK};
use crate::{
    Backend, BinaryOp, DType, Distribution, Error, GemmEpilogue, HostData, Layout, ReduceOp,
    Result, Shape, View,
};

/// Inverted dropout on attention's probabilities, as [`crate::Tensor::dropout`]
/// applies it to a `[batch, T, S]` tensor of them: probability `e` (its
/// row-major index in `[batch, T, S]`, masked entries included) is kept,
/// and multiplied by [`AttentionDropout::keep_scale`], when element `e` of
/// the uniform Philox stream `(seed, offset)` is at least `rate`, and is
/// zeroed otherwise. The draws are the same on every backend, so a fused
/// kernel, which never holds the probabilities, drops exactly what the
/// composed ops drop; the backward pass draws them again.
///
/// ```
/// use kiln_core::attention::AttentionDropout;
///
/// let d = AttentionDropout::new(0.2, 7, 0)?;
/// assert_eq!(d.keep_scale(), 1.25);
/// let mut f = [0f32; 1000];
/// d.factors(0, &mut f);
/// let kept = f.iter().filter(|&&x| x == 1.25).count();
/// assert!(kept + f.iter().filter(|&&x| x == 0.0).count() == 1000);
/// assert!((750..850).contains(&kept)); // about 80 %
/// // Element by element, the same factors.
/// assert_eq!(f[123], d.factor(123));
/// // A rate of 1 would drop everything: refused.
/// assert!(AttentionDropout::new(1.0, 7, 0).is_err());
/// # Ok::<(), kiln_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionDropout {
    /// The probability of dropping each weight, in `[0, 1)`.
    pub rate: f32,
    /// The Philox stream's seed.
    pub seed: u64,
    /// The stream's starting counter ([`crate::rng`]'s `offset`).
    pub offset: u64,
}

impl AttentionDropout {
    /// Dropout at `rate` from the stream `(seed, offset)`; a rate outside
    /// `[0, 1)` is an error.
    pub fn new(rate: f32, seed: u64, offset: u64) -> Result<Self> {
        let d = AttentionDropout { rate, seed, offset };
        d.check("attention_causal")?;
        Ok(d)
    }

    /// The rate checked, in `op`'s words.
    pub(crate) fn check(&self, op: &str) -> Result<()> {
        if (0.0..1.0).contains(&self.rate) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "{op}: the dropout rate must be in [0, 1), got {}",
                self.rate
            )))
        }
    }

    /// What a kept weight is multiplied by: `1/(1 − rate)`, in f32 (the
    /// value every backend and the oracle use).
    pub fn keep_scale(&self) -> f32 {
        1.0 / (1.0 - self.rate)
    }

    /// The factor of weight `e`: [`keep_scale`](Self::keep_scale) or 0.
    pub fn factor(&self, e: u64) -> f32 {
        self.factor_of(rng::uniform(self.seed, self.offset, e))
    }

    /// The factor of a weight whose uniform draw is `u`: kept (times
    /// [`keep_scale`](Self::keep_scale)) when `u ≥ rate`, else 0.
    #[inline(always)]
    pub fn factor_of(&self, u: f32) -> f32 {
        if u >= self.rate {
            self.keep_scale()
        } else {
            0.0
        }
    }

    /// The factors of weights `first..first + out.len()` into `out`, one
    /// Philox block per four of them.
    pub fn factors(&self, first: u64, out: &mut [f32]) {
        let mut e = first;
        let mut rest = out;
        while !rest.is_empty() {
            let word = (e % UNIFORMS_PER_BLOCK) as usize;
            let block = rng::block(self.seed, self.offset.wrapping_add(e / UNIFORMS_PER_BLOCK));
            let n = (4 - word).min(rest.len());
            let (now, later) = std::mem::take(&mut rest).split_at_mut(n);
            for (f, &w) in now.iter_mut().zip(&block[word..]) {
                *f = self.factor_of(rng::unit_f32(w));
            }
            rest = later;
            e += n as u64;
        }
    }
}

/// What causal attention computes besides its operands: the scores' scale
/// and, while training, dropout on the probabilities.
///
/// ```
/// use kiln_core::attention::{AttentionDropout, AttentionOptions};
///
/// let plain = AttentionOptions::new(0.125);
/// assert_eq!(plain.dropout, None);
/// let training = plain.with_dropout(AttentionDropout::new(0.1, 1, 0)?);
/// assert_eq!(training.dropout.map(|d| d.rate), Some(0.1));
/// # Ok::<(), kiln_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionOptions {
    /// The scores' scale (usually `1/√D`); must be finite.
    pub scale: f32,
    /// Dropout on the probabilities, or none.
    pub dropout: Option<AttentionDropout>,
    /// Heads side by side in the operands' last axis (at least 1; see
    /// [`with_heads`](Self::with_heads)).
    pub heads: usize,
}

impl AttentionOptions {
    /// Scores scaled by `scale`, no dropout, one head per problem.
    pub fn new(scale: f32) -> Self {
        AttentionOptions {
            scale,
            dropout: None,
            heads: 1,
        }
    }

    /// These options with `heads` heads side by side in each operand's
    /// last axis: `q` `[n, T, heads·D]`, `k` and `v` `[n, S, heads·D]`,
    /// head `h` of example `e` attending with columns `h·D..(h + 1)·D` of
    /// its rows, the result `[n, T, heads·D]` the same way — the layout a
    /// fused `[n, T, 3, heads, D]` projection of queries, keys and values
    /// already has, so a model's heads need no copies to split or merge
    /// (views narrowed to a third of the projection's last axis are read
    /// in place). Its problems are numbered `e·heads + h`, as the batch
    /// of `[n·heads, T, D]` operands with the heads moved ahead of the
    /// positions ([`heads_folded`]) numbers them; their dropout draws
    /// follow that number. Checked (`heads ≥ 1`, dividing the last axis)
    /// when a call is planned.
    pub fn with_heads(self, heads: usize) -> Self {
        AttentionOptions { heads, ..self }
    }

    /// These options with `dropout` on the probabilities.
    pub fn with_dropout(self, dropout: AttentionDropout) -> Self {
        AttentionOptions {
            dropout: Some(dropout),
            ..self
        }
    }
}

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

/// `x` (`[n, rows, heads·D]`, any layout) with its heads moved ahead of
/// its rows: `[n·heads, rows, D]`, contiguous, in its type — problem
/// `e·heads + h` as [`AttentionOptions::with_heads`] numbers them. For
/// kernels that take one head per problem ([`attention_heads_folded`]).
pub fn heads_folded<B: Backend>(
    b: &B,
    x: View<'_, B::Storage>,
    heads: usize,
) -> Result<B::Storage> {
    let (dims, strides) = (x.layout.dims(), x.layout.strides());
    let (&[n, rows, w], &[sn, sr, sw]) = (dims, strides) else {
        return Err(Error::shape(
            "heads_folded",
            format!("expected [n, rows, heads·D], got {:?}", dims),
        ));
    };
    if heads == 0 || w % heads != 0 {
        return Err(Error::invalid(format!(
            "heads_folded: {heads} heads do not divide a last axis of {w}"
        )));
    }
    let d = w / heads;
    let split = Layout::new(
        Shape::new(&[n, rows, heads, d])?,
        vec![sn, sr, d * sw, sw],
        x.layout.offset(),
    )?;
    b.contiguous(View::new(x.storage, &split.permute(&[0, 2, 1, 3])?))
}

/// The inverse of [`heads_folded`] for a contiguous `[n·heads, rows, D]`
/// result: `[n, rows, heads·D]`, contiguous.
pub fn heads_unfolded<B: Backend>(
    b: &B,
    y: &B::Storage,
    [n, heads, rows, d]: [usize; 4],
) -> Result<B::Storage> {
    let l = Layout::contiguous(Shape::new(&[n, heads, rows, d])?).permute(&[0, 2, 1, 3])?;
    b.contiguous(View::new(y, &l))
}

/// `views` (`[n, rows, heads·D]` each) with their heads folded into the
/// batch ([`heads_folded`]), and the contiguous `[n·heads, rows, D]`
/// layouts of the results.
fn folded<B: Backend, const N: usize>(
    b: &B,
    plan: &AttentionPlan,
    views: [View<'_, B::Storage>; N],
) -> Result<([B::Storage; N], [Layout; N])> {
    let mut storages = Vec::with_capacity(N);
    let mut layouts = Vec::with_capacity(N);
    for x in views {
        let rows = x.layout.dims()[1];
        storages.push(heads_folded(b, x, plan.heads)?);
        layouts.push(Layout::contiguous(Shape::new(&[
            plan.batch, rows, plan.dim,
        ])?));
    }
    let fits = "one folded operand per view";
    Ok((
        storages.try_into().ok().expect(fits),
        layouts.try_into().expect(fits),
    ))
}

/// [`Backend::attention_causal`] of operands with `options.heads > 1`
/// heads side by side, through `f`, an attention that takes one head per
/// problem: the operands' heads folded into the batch
/// ([`heads_folded`]), `f` called with one head, its result unfolded —
/// two copies of each operand a fused kernel reading the heads in place
/// does without. What backends without such a kernel do.
pub fn attention_heads_folded<B: Backend>(
    b: &B,
    views: [View<'_, B::Storage>; 3],
    options: &AttentionOptions,
    f: impl FnOnce([View<'_, B::Storage>; 3], &AttentionOptions) -> Result<B::Storage>,
) -> Result<B::Storage> {
    let [q, k, v] = views;
    let plan = AttentionPlan::new(q, k, v, options)?;
    let (s, l) = folded(b, &plan, views)?;
    let one = AttentionOptions {
        heads: 1,
        ..*options
    };
    let y = f(std::array::from_fn(|i| View::new(&s[i], &l[i])), &one)?;
    let (h, t, d) = (plan.heads, plan.queries, plan.dim);
    heads_unfolded(b, &y, [plan.batch / h, h, t, d])
}

/// [`Backend::attention_causal_backward`] as [`attention_heads_folded`]
/// runs the forward pass: the operands and `dy` folded, `f` called with
/// one head, the three gradients unfolded.
pub fn attention_backward_heads_folded<B: Backend>(
    b: &B,
    views: [View<'_, B::Storage>; 4],
    options: &AttentionOptions,
    f: impl FnOnce([View<'_, B::Storage>; 4], &AttentionOptions) -> Result<AttentionGrads<B::Storage>>,
) -> Result<AttentionGrads<B::Storage>> {
    let [q, k, v, dy] = views;
    let plan = AttentionPlan::backward(q, k, v, dy, options)?;
    let (s, l) = folded(b, &plan, views)?;
    let one = AttentionOptions {
        heads: 1,
        ..*options
    };
    let g = f(std::array::from_fn(|i| View::new(&s[i], &l[i])), &one)?;
    let (h, t, keys, d) = (plan.heads, plan.queries, plan.keys, plan.dim);
    let n = plan.batch / h;
    Ok(AttentionGrads {
        dq: heads_unfolded(b, &g.dq, [n, h, t, d])?,
        dk: heads_unfolded(b, &g.dk, [n, h, keys, d])?,
        dv: heads_unfolded(b, &g.dv, [n, h, keys, d])?,
    })
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

    /// The dropout factors of every probability (`[batch, T, S]`, f32: 0
    /// or `1/(1 − rate)`), drawn as [`AttentionDropout`] defines them.
    fn factors<B: Backend<Storage = S>>(&self, b: &B, d: &AttentionDropout) -> Result<S> {
        let n = self.ls.shape().numel();
        let uniform = Distribution::Uniform {
            low: 0.0,
            high: 1.0,
        };
        let u = b.random(uniform, n, DType::F32, d.seed, d.offset)?;
        let rate = b.full(1, DType::F32, f64::from(d.rate))?;
        let spread = Layout::contiguous(Shape::new(&[1])?).broadcast_as(self.ls.shape())?;
        let kept = b.binary(
            BinaryOp::Ge,
            View::new(&u, &self.ls),
            View::new(&rate, &spread),
        )?;
        b.affine(View::new(&kept, &self.ls), d.keep_scale(), 0.0)
    }

    /// `x ∘ factors` (both `[batch, T, S]`).
    fn dropped<B: Backend<Storage = S>>(&self, b: &B, x: &S, factors: &S) -> Result<S> {
        let ls = &self.ls;
        b.binary(BinaryOp::Mul, View::new(x, ls), View::new(factors, ls))
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
/// operands' type: `P = softmax_causal(scale·q·kᵀ)`, its dropout
/// `P̃ = P∘M` if any, then `P̃·v`. The `[batch, T, S]` probabilities are
/// held in memory, as a fused kernel's are not.
pub fn compose_attention_causal<B: Backend>(
    b: &B,
    q: View<'_, B::Storage>,
    k: View<'_, B::Storage>,
    v: View<'_, B::Storage>,
    options: &AttentionOptions,
) -> Result<B::Storage> {
    if options.heads > 1 {
        return attention_heads_folded(b, [q, k, v], options, |[q, k, v], o| {
            compose_attention_causal(b, q, k, v, o)
        });
    }
    let plan = AttentionPlan::new(q, k, v, options)?;
    let ops = Operands::new(b, &plan, q, k, v)?;
    let mut p = ops.probabilities(b, plan.scale)?;
    if let Some(d) = &plan.dropout {
        p = ops.dropped(b, &p, &ops.factors(b, d)?)?;
    }
    let y = b.gemm(
        View::new(&p, &ops.ls),
        View::new(&ops.v, &ops.lk),
        &GemmEpilogue::default(),
    )?;
    narrowed(b, y, &ops.lq, plan.dtype)
}

/// [`Backend::attention_causal_backward`] from primitive ops, in f32: `P`
/// recomputed from `q` and `k` (and the dropout factors `M` drawn again),
/// then `dv = P̃ᵀ·dy` with `P̃ = P∘M`, `dP = (dy·vᵀ)∘M`,
/// `dS = P∘(dP − Σⱼ P∘dP)`, `dq = scale·dS·k`, `dk = scale·dSᵀ·q`.
pub fn compose_attention_causal_backward<B: Backend>(
    b: &B,
    q: View<'_, B::Storage>,
    k: View<'_, B::Storage>,
    v: View<'_, B::Storage>,
    dy: View<'_, B::Storage>,
    options: &AttentionOptions,
) -> Result<AttentionGrads<B::Storage>> {
    if options.heads > 1 {
        return attention_backward_heads_folded(b, [q, k, v, dy], options, |[q, k, v, dy], o| {
            compose_attention_causal_backward(b, q, k, v, dy, o)
        });
    }
    let plan = AttentionPlan::backward(q, k, v, dy, options)?;
    let scale = plan.scale;
    let ops = Operands::new(b, &plan, q, k, v)?;
    let dy = b.cast(dy, DType::F32)?;
    let p = ops.probabilities(b, scale)?;
    let factors = plan.dropout.map(|d| ops.factors(b, &d)).transpose()?;
    let (lq, lk, ls) = (&ops.lq, &ops.lk, &ops.ls);
    let one = GemmEpilogue::default();
    let scaled = GemmEpilogue {
        alpha: scale,
        ..GemmEpilogue::default()
    };
    let pt = ls.transpose(1, 2)?;
    let kept = match &factors {
        Some(m) => Some(ops.dropped(b, &p, m)?),
        None => None,
    };
    let dv = b.gemm(
        View::new(kept.as_ref().unwrap_or(&p), &pt),
        View::new(&dy, lq),
        &one,
    )?;
    let vt = lk.transpose(1, 2)?;
    let mut dp = b.gemm(View::new(&dy, lq), View::new(&ops.v, &vt), &one)?;
    if let Some(m) = &factors {
        dp = ops.dropped(b, &dp, m)?;
    }
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
