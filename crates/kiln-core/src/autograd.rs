//! Reverse-mode automatic differentiation.
//!
//! Every op on tensors that require gradients records an `Op` naming its
//! inputs; [`Tensor::backward`] walks that graph once, in reverse
//! topological order, and returns a [`GradStore`] with the gradient of every
//! leaf (every [`crate::Var`]). Gradients are computed with the same tensor
//! ops, under [`no_grad`], so no second-order graph is kept. With gradients
//! off (evaluation, inference), no op records anything.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::backend::{Activation, BinaryOp, ReduceOp, UnaryOp};
use crate::tensor::TensorId;
use crate::{Backend, Error, Layout, Result, Shape, Tensor, Window2d};

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread record the graph.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(Cell::get)
}

/// Runs `f` with gradient recording off on this thread.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _guard = NoGradGuard::new();
    f()
}

/// Turns gradient recording off on this thread until dropped.
#[derive(Debug)]
pub struct NoGradGuard {
    previous: bool,
}

impl NoGradGuard {
    /// Disables recording; the previous mode comes back on drop.
    pub fn new() -> Self {
        NoGradGuard {
            previous: GRAD_ENABLED.with(|g| g.replace(false)),
        }
    }
}

impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

/// How a tensor was computed: the op and the inputs its gradient needs.
pub(crate) enum Op<B: Backend> {
    Unary {
        op: UnaryOp,
        x: Tensor<B>,
    },
    Affine {
        x: Tensor<B>,
        mul: f32,
    },
    Binary {
        op: BinaryOp,
        a: Tensor<B>,
        b: Tensor<B>,
    },
    /// `y = act(α·a·b + bias)` on rank-3 operands.
    Gemm {
        a: Tensor<B>,
        b: Tensor<B>,
        bias: Option<Tensor<B>>,
        activation: Activation,
        alpha: f32,
    },
    /// Reduction keeping dimensions.
    Reduce {
        op: ReduceOp,
        x: Tensor<B>,
        axes: Vec<usize>,
    },
    Softmax {
        x: Tensor<B>,
        log: bool,
    },
    /// Mean softmax cross-entropy; `dlogits` already holds `(softmax − onehot)/n`.
    SoftmaxCrossEntropy {
        logits: Tensor<B>,
        dlogits: Tensor<B>,
    },
    /// Any view or copy whose gradient is the incoming one reshaped to `x`.
    Reshape {
        x: Tensor<B>,
    },
    Permute {
        x: Tensor<B>,
        perm: Vec<usize>,
    },
    Narrow {
        x: Tensor<B>,
        dim: usize,
        start: usize,
    },
    Broadcast {
        x: Tensor<B>,
    },
    Cast {
        x: Tensor<B>,
    },
    /// `y = act(conv(x, weight) + bias)`.
    Conv2d {
        x: Tensor<B>,
        weight: Tensor<B>,
        bias: Option<Tensor<B>>,
        activation: Activation,
        window: Window2d,
    },
    /// `y = max_pool(act(conv(x, weight) + bias))`, fused.
    Conv2dPool {
        x: Tensor<B>,
        weight: Tensor<B>,
        bias: Option<Tensor<B>>,
        activation: Activation,
        conv: Window2d,
        pool: Window2d,
        argmax: Arc<B::Storage>,
    },
    /// Rows of `table` picked by the u32 `ids`.
    Embedding {
        table: Tensor<B>,
        ids: Tensor<B>,
    },
    /// Layer normalisation over the last axis, with the row statistics.
    LayerNorm {
        x: Tensor<B>,
        gamma: Tensor<B>,
        beta: Tensor<B>,
        mean: Arc<B::Storage>,
        rstd: Arc<B::Storage>,
    },
    /// Max-pooling, with where each maximum came from.
    MaxPool2d {
        x: Tensor<B>,
        argmax: Arc<B::Storage>,
        window: Window2d,
    },
    /// Causal attention; the probabilities are recomputed backward.
    AttentionCausal {
        q: Tensor<B>,
        k: Tensor<B>,
        v: Tensor<B>,
        options: crate::AttentionOptions,
    },
}

impl<B: Backend> Op<B> {
    /// The tensors the op read.
    pub(crate) fn inputs(&self) -> Vec<&Tensor<B>> {
        match self {
            Op::Unary { x, .. }
            | Op::Affine { x, .. }
            | Op::Reduce { x, .. }
            | Op::Softmax { x, .. }
            | Op::Reshape { x }
            | Op::Permute { x, .. }
            | Op::Narrow { x, .. }
            | Op::Broadcast { x }
            | Op::Cast { x }
            | Op::MaxPool2d { x, .. } => vec![x],
            Op::Conv2d {
                x, weight, bias, ..
            }
            | Op::Conv2dPool {
                x, weight, bias, ..
            } => {
                let mut v = vec![x, weight];
                v.extend(bias.as_ref());
                v
            }
            Op::SoftmaxCrossEntropy { logits, .. } => vec![logits],
            Op::LayerNorm { x, gamma, beta, .. } => vec![x, gamma, beta],
            Op::AttentionCausal { q, k, v, .. } => vec![q, k, v],
            Op::Embedding { table, .. } => vec![table],
            Op::Binary { a, b, .. } => vec![a, b],
            Op::Gemm { a, b, bias, .. } => {
                let mut v = vec![a, b];
                v.extend(bias.as_ref());
                v
            }
        }
    }
}

/// The gradients computed by [`Tensor::backward`], keyed by leaf.
pub struct GradStore<B: Backend> {
    grads: HashMap<TensorId, Tensor<B>>,
}

impl<B: Backend> Default for GradStore<B> {
    /// No gradients (a start to [`GradStore::accumulate`] into).
    fn default() -> Self {
        GradStore {
            grads: HashMap::new(),
        }
    }
}

impl<B: Backend> GradStore<B> {
    /// The gradient of `id` (a [`crate::Var`]'s id or a leaf tensor's), if it
    /// was reached.
    pub fn get_id(&self, id: TensorId) -> Option<&Tensor<B>> {
        self.grads.get(&id)
    }

    /// The gradient with respect to the leaf `t`.
    pub fn get(&self, t: &Tensor<B>) -> Option<&Tensor<B>> {
        self.get_id(t.id())
    }

    /// Removes and returns the gradient of `id`.
    pub fn remove(&mut self, id: TensorId) -> Option<Tensor<B>> {
        self.grads.remove(&id)
    }

    /// Sets the gradient of `id` — one averaged across processes, say —
    /// and returns the one it replaces.
    pub fn insert(&mut self, id: TensorId, grad: Tensor<B>) -> Option<Tensor<B>> {
        self.grads.insert(id, grad)
    }

    /// Whether every gradient is finite (no ±∞ or NaN): one f32 sum per
    /// gradient, added on the device, one scalar read back. A sum that
    /// overflows although each element is finite also reads as not finite —
    /// for loss scaling, which asks this, that is an overflow too.
    pub fn all_finite(&self) -> Result<bool> {
        let _guard = NoGradGuard::new();
        let mut total: Option<Tensor<B>> = None;
        for g in self.grads.values() {
            let s = g.cast(crate::DType::F32)?.sum_all()?;
            total = Some(match total {
                Some(t) => t.add(&s)?,
                None => s,
            });
        }
        match total {
            Some(t) => Ok(t.to_scalar_f32()?.is_finite()),
            None => Ok(true),
        }
    }

    /// Multiplies every gradient by `factor` (to undo a loss scale).
    pub fn scale(&mut self, factor: f32) -> Result<()> {
        let _guard = NoGradGuard::new();
        for g in self.grads.values_mut() {
            *g = g.affine(factor, 0.0)?;
        }
        Ok(())
    }

    /// The Euclidean norm of the gradients of `ids` taken together,
    /// √(Σ g²) — what clipping by global norm compares with its limit.
    /// Summed in the order of `ids` (one f32 sum of squares per gradient,
    /// added on the device, one scalar read back), so the same gradients
    /// always give the same bits; ids without a gradient count as zero.
    pub fn global_norm(&self, ids: &[TensorId]) -> Result<f32> {
        let _guard = NoGradGuard::new();
        let mut total: Option<Tensor<B>> = None;
        for g in ids.iter().filter_map(|id| self.grads.get(id)) {
            let s = g.cast(crate::DType::F32)?.square()?.sum_all()?;
            total = Some(match total {
                Some(t) => t.add(&s)?,
                None => s,
            });
        }
        match total {
            Some(t) => Ok(t.to_scalar_f32()?.sqrt()),
            None => Ok(0.0),
        }
    }

    /// Adds `other`'s gradients to these, leaf by leaf (gradient
    /// accumulation over micro-batches).
    pub fn accumulate(&mut self, other: GradStore<B>) -> Result<()> {
        let _guard = NoGradGuard::new();
        for (id, g) in other.grads {
            let g = match self.grads.remove(&id) {
                Some(prev) => prev.add(&g)?,
                None => g,
            };
            self.grads.insert(id, g);
        }
        Ok(())
    }

    /// Number of gradients held.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// Whether no gradient is held.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }
}

/// Parents before children: a post-order walk of the recorded graph.
fn topological_order<B: Backend>(root: &Tensor<B>) -> Vec<Tensor<B>> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(op) = t.op() {
            for p in op.inputs() {
                if p.requires_grad() && !seen.contains(&p.id()) {
                    stack.push((p.clone(), false));
                }
            }
        }
    }
    order
}

fn accumulate<B: Backend>(
    pending: &mut Pending<B>,
    target: &Tensor<B>,
    g: Tensor<B>,
) -> Result<()> {
    if !target.requires_grad() {
        return Ok(());
    }
    debug_assert_eq!(g.dims(), target.dims(), "gradient shape");
    let g = match pending.grads.remove(&target.id()) {
        Some(prev) => prev.add(&g)?,
        None => g,
    };
    pending.grads.insert(target.id(), g);
    Ok(())
}

/// The gradients a backward pass has gathered for tensors it has not
/// reached yet.
struct Pending<B: Backend> {
    grads: HashMap<TensorId, Tensor<B>>,
    /// For gradients made only of slices' gradients placed in zeros (the
    /// gradient of a tensor whose slices were used): which windows hold
    /// something, so a slice disjoint from them is copied in rather than
    /// added to zeros (attention's query, key and value, slices of one
    /// projection with strided rows).
    slices: HashMap<TensorId, Placed>,
}

/// The windows `start..start + len` of dimension `dim` written into zeros
/// to make gradient `grad` (by id: any other gradient since is a sum).
struct Placed {
    grad: TensorId,
    dim: usize,
    windows: Vec<(usize, usize)>,
}

impl Placed {
    /// Whether window `start..start + len` of `dim` is still zeros in
    /// gradient `grad`.
    fn is_zeros(&self, grad: TensorId, dim: usize, start: usize, len: usize) -> bool {
        self.grad == grad
            && self.dim == dim
            && self
                .windows
                .iter()
                .all(|&(a, l)| start + len <= a || a + l <= start)
    }
}

impl<B: Backend> Tensor<B> {
    /// Back-propagates from this tensor, seeding its gradient with ones
    /// (for a scalar loss: d loss / d loss = 1), and returns the gradient of
    /// every leaf it depends on.
    pub fn backward(&self) -> Result<GradStore<B>> {
        let grads = self.backward_until(|| false)?;
        Ok(grads.expect("backward with no stop condition completes"))
    }

    /// [`Tensor::backward`], abandoned as soon as `stop` says so: `stop` is
    /// asked before each node's gradient is computed, and `Ok(None)` means
    /// it answered `true` (no gradient is returned; nothing was changed but
    /// temporaries). A long backward pass can so be interrupted between
    /// ops, for example by a signal handler's flag.
    ///
    /// ```
    /// use kiln_core::{Tensor, Var};
    /// use kiln_cpu::CpuBackend;
    ///
    /// let b = CpuBackend::reference();
    /// let w = Var::from_tensor(&Tensor::from_slice(&[1.0, 2.0], &[2], &b)?)?;
    /// let loss = w.as_tensor().sum_all()?;
    /// assert!(loss.backward_until(|| true)?.is_none());
    /// assert!(loss.backward_until(|| false)?.is_some());
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn backward_until(&self, stop: impl Fn() -> bool) -> Result<Option<GradStore<B>>> {
        self.backward_with(stop, |_, _| Ok(()))
    }

    /// [`Tensor::backward_until`], handing each leaf's gradient to
    /// `on_leaf` as soon as it is final — before the pass goes on to the
    /// nodes that lead to other leaves — so that work on it (a data-parallel
    /// all-reduce) can overlap with the rest of the pass. An error from
    /// `on_leaf` ends the pass with that error.
    ///
    /// ```
    /// use kiln_core::{Tensor, Var};
    /// use kiln_cpu::CpuBackend;
    ///
    /// let b = CpuBackend::reference();
    /// let w = Var::from_tensor(&Tensor::from_slice(&[3.0], &[1], &b)?)?;
    /// let loss = w.as_tensor().square()?.sum_all()?;
    /// let mut seen = Vec::new();
    /// let grads = loss
    ///     .backward_with(|| false, |id, g| {
    ///         seen.push((id, g.to_vec_f32()?));
    ///         Ok(())
    ///     })?
    ///     .expect("not stopped");
    /// assert_eq!(seen, [(w.id(), vec![6.0])]);
    /// assert_eq!(grads.get_id(w.id()).unwrap().to_vec_f32()?, [6.0]);
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn backward_with(
        &self,
        stop: impl Fn() -> bool,
        on_leaf: impl FnMut(TensorId, &Tensor<B>) -> Result<()>,
    ) -> Result<Option<GradStore<B>>> {
        self.backward_seeded(None, stop, on_leaf)
    }

    /// Back-propagates `upstream` — the gradient of some later quantity
    /// with respect to this tensor, of this tensor's shape and dtype — and
    /// returns every leaf's gradient: the vector–Jacobian product, for a
    /// pass whose loss is computed elsewhere (another framework, another
    /// process, a hand-written head).
    ///
    /// ```
    /// use kiln_core::{Tensor, Var};
    /// use kiln_cpu::CpuBackend;
    ///
    /// let b = CpuBackend::reference();
    /// let w = Var::from_tensor(&Tensor::from_slice(&[1.0, 2.0], &[2], &b)?)?;
    /// let y = w.as_tensor().square()?; // y = w², dy/dw = 2w
    /// let upstream = Tensor::from_slice(&[10.0, 100.0], &[2], &b)?;
    /// let grads = y.backward_from(&upstream)?;
    /// assert_eq!(grads.get_id(w.id()).unwrap().to_vec_f32()?, [20.0, 400.0]);
    /// // An upstream gradient of another shape is an error.
    /// assert!(y.backward_from(&Tensor::from_slice(&[1.0], &[1], &b)?).is_err());
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn backward_from(&self, upstream: &Tensor<B>) -> Result<GradStore<B>> {
        if upstream.shape() != self.shape() || upstream.dtype() != self.dtype() {
            return Err(Error::shape(
                "backward_from",
                format!(
                    "the upstream gradient is {} {}, the tensor {} {}",
                    upstream.shape(),
                    upstream.dtype(),
                    self.shape(),
                    self.dtype()
                ),
            ));
        }
        let grads = self.backward_seeded(Some(upstream.detach()), || false, |_, _| Ok(()))?;
        Ok(grads.expect("a pass with no stop condition completes"))
    }

    /// The backward pass from `seed` (ones when `None`).
    fn backward_seeded(
        &self,
        seed: Option<Tensor<B>>,
        stop: impl Fn() -> bool,
        mut on_leaf: impl FnMut(TensorId, &Tensor<B>) -> Result<()>,
    ) -> Result<Option<GradStore<B>>> {
        if !self.requires_grad() {
            return Err(Error::invalid(
                "backward: this tensor does not require gradients (it depends on no Var, or was computed under no_grad)",
            ));
        }
        let order = topological_order(self);
        let _guard = NoGradGuard::new();
        let mut pending = Pending {
            grads: HashMap::new(),
            slices: HashMap::new(),
        };
        let seed = match seed {
            Some(s) => s,
            None => self.ones_like()?,
        };
        pending.grads.insert(self.id(), seed);
        let mut leaves = HashMap::new();
        for node in order.iter().rev() {
            let Some(g) = pending.grads.remove(&node.id()) else {
                continue;
            };
            if stop() {
                return Ok(None);
            }
            match node.op() {
                None => {
                    // Every node that uses a leaf comes before it in
                    // this order: its gradient is complete.
                    on_leaf(node.id(), &g)?;
                    leaves.insert(node.id(), g);
                }
                Some(op) => propagate(node, op, g, &mut pending)?,
            }
        }
        Ok(Some(GradStore { grads: leaves }))
    }
}

/// Pushes `g = dL/dy` through the op that produced `y` to its inputs.
fn propagate<B: Backend>(
    y: &Tensor<B>,
    op: &Op<B>,
    g: Tensor<B>,
    pending: &mut Pending<B>,
) -> Result<()> {
    match op {
        Op::Unary { op, x } => {
            let dx = x.unary_backward(*op, y, &g)?;
            accumulate(pending, x, dx)
        }
        Op::Affine { x, mul } => accumulate(pending, x, g.affine(*mul, 0.0)?),
        Op::Binary { op, a, b } => {
            let (ga, gb) = binary_grads(*op, a, b, y, &g)?;
            if let Some(ga) = ga {
                accumulate(pending, a, ga.sum_to(a.dims())?)?;
            }
            if let Some(gb) = gb {
                accumulate(pending, b, gb.sum_to(b.dims())?)?;
            }
            Ok(())
        }
        Op::Gemm {
            a,
            b,
            bias,
            activation,
            alpha,
        } => {
            let gz = match activation.as_unary() {
                // The activation's derivative reads only its output.
                Some(u) => y.unary_backward(u, y, &g)?,
                None => g,
            };
            if a.requires_grad() {
                let da = gz.gemm(&b.transpose(1, 2)?, *alpha, None, Activation::None)?;
                accumulate(pending, a, da)?;
            }
            if b.requires_grad() {
                let db = a
                    .transpose(1, 2)?
                    .gemm(&gz, *alpha, None, Activation::None)?;
                accumulate(pending, b, db)?;
            }
            if let Some(bias) = bias.as_ref().filter(|b| b.requires_grad()) {
                accumulate(pending, bias, gz.sum_to(bias.dims())?)?;
            }
            Ok(())
        }
        Op::Reduce { op, x, axes } => {
            let dx = match op {
                ReduceOp::Sum => g.broadcast_as(x.dims())?,
                ReduceOp::Mean => {
                    let count: usize = axes.iter().map(|&a| x.dims()[a]).product();
                    g.affine(1.0 / count as f32, 0.0)?.broadcast_as(x.dims())?
                }
                ReduceOp::Max | ReduceOp::Min => {
                    // Ties share the gradient equally.
                    let mask = x.binary(BinaryOp::Eq, &y.broadcast_as(x.dims())?)?;
                    let count = mask.reduce_keepdim(ReduceOp::Sum, axes)?;
                    mask.mul(&g.div(&count)?)?
                }
            };
            accumulate(pending, x, dx)
        }
        Op::Softmax { x, log } => {
            let last = y.rank() - 1;
            let dx = if *log {
                // dx = g − softmax(x)·Σg
                let s = g.reduce_keepdim(ReduceOp::Sum, &[last])?;
                g.sub(&y.exp()?.mul(&s)?)?
            } else {
                // dx = y·(g − Σ g·y)
                let s = g.mul(y)?.reduce_keepdim(ReduceOp::Sum, &[last])?;
                y.mul(&g.sub(&s)?)?
            };
            accumulate(pending, x, dx)
        }
        Op::SoftmaxCrossEntropy { logits, dlogits } => {
            // g is a scalar: scale the saved gradient by it.
            let dx = dlogits.mul(&g)?;
            accumulate(pending, logits, dx)
        }
        Op::Reshape { x } => accumulate(pending, x, g.reshape(x.dims())?),
        Op::Permute { x, perm } => {
            let mut inverse = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inverse[p] = i;
            }
            accumulate(pending, x, g.permute(&inverse)?)
        }
        Op::Narrow { x, dim, start } => {
            if !x.requires_grad() {
                return Ok(());
            }
            // Slices of one tensor (attention's query, key and value) share
            // one gradient buffer: the first places its window in zeros,
            // the next add theirs into their windows only, in place — or
            // copy them there, where nothing was placed yet.
            let len = g.dims()[*dim];
            let (dx, placed) = match pending.grads.remove(&x.id()) {
                Some(prev) => {
                    let zeros = pending
                        .slices
                        .get(&x.id())
                        .is_some_and(|p| p.is_zeros(prev.id(), *dim, *start, len));
                    let window = if zeros {
                        g
                    } else {
                        prev.narrow(*dim, *start, len)?.add(&g)?
                    };
                    (prev.into_written(*dim, *start, &window)?, zeros)
                }
                None => {
                    pending.slices.remove(&x.id());
                    (g.placed_in_zeros(x.dims(), *dim, *start)?, true)
                }
            };
            if placed {
                let p = pending.slices.entry(x.id()).or_insert(Placed {
                    grad: dx.id(),
                    dim: *dim,
                    windows: Vec::new(),
                });
                p.grad = dx.id();
                p.windows.push((*start, len));
            } else {
                pending.slices.remove(&x.id());
            }
            pending.grads.insert(x.id(), dx);
            Ok(())
        }
        Op::Broadcast { x } => accumulate(pending, x, g.sum_to(x.dims())?),
        Op::Cast { x } => accumulate(pending, x, g.cast(x.dtype())?),
        Op::Conv2d {
            x,
            weight,
            bias,
            activation,
            window,
        } => {
            let gz = match activation.as_unary() {
                Some(u) => y.unary_backward(u, y, &g)?,
                None => g,
            };
            let gz = gz.contiguous()?;
            let backend = x.backend();
            let input = [x.dims()[2], x.dims()[3]];
            if x.requires_grad() {
                let dx = backend.conv2d_backward_data(gz.view(), weight.view(), window, input)?;
                accumulate(pending, x, stored(dx, x.dims(), backend)?)?;
            }
            let bias_grad = bias.as_ref().is_some_and(|b| b.requires_grad());
            if weight.requires_grad() || bias_grad {
                let (dw, db) = backend.conv2d_backward_filter(x.view(), gz.view(), window)?;
                accumulate(pending, weight, stored(dw, weight.dims(), backend)?)?;
                if let Some(b) = bias {
                    accumulate(pending, b, stored(db, b.dims(), backend)?)?;
                }
            }
            Ok(())
        }
        Op::Conv2dPool {
            x,
            weight,
            bias,
            activation,
            conv,
            pool,
            argmax,
        } => {
            let g = g.contiguous()?;
            let backend = x.backend();
            let at_layout = Layout::contiguous(Shape::new(g.dims())?);
            let (dx, dw, db) = backend.conv2d_pool_backward(
                x.view(),
                weight.view(),
                y.view(),
                crate::View::new(argmax, &at_layout),
                g.view(),
                *activation,
                conv,
                pool,
                x.requires_grad(),
            )?;
            if let Some(dx) = dx {
                accumulate(pending, x, stored(dx, x.dims(), backend)?)?;
            }
            accumulate(pending, weight, stored(dw, weight.dims(), backend)?)?;
            if let Some(b) = bias {
                accumulate(pending, b, stored(db, b.dims(), backend)?)?;
            }
            Ok(())
        }
        Op::Embedding { table, ids } => {
            let g = g.contiguous()?;
            let backend = table.backend();
            let vocab = table.dims()[0];
            let dt = backend.embedding_backward(ids.view(), g.view(), vocab)?;
            accumulate(pending, table, stored(dt, table.dims(), backend)?)
        }
        Op::LayerNorm {
            x,
            gamma,
            beta,
            mean,
            rstd,
        } => {
            let g = g.contiguous()?;
            let backend = x.backend();
            let rows = Layout::contiguous(Shape::new(&[crate::BackendStorage::len(&**mean)])?);
            let grads = backend.layer_norm_backward(
                x.view(),
                gamma.view(),
                crate::View::new(mean, &rows),
                crate::View::new(rstd, &rows),
                g.view(),
            )?;
            accumulate(pending, x, stored(grads.dx, x.dims(), backend)?)?;
            accumulate(pending, gamma, stored(grads.dgamma, gamma.dims(), backend)?)?;
            accumulate(pending, beta, stored(grads.dbeta, beta.dims(), backend)?)
        }
        Op::AttentionCausal { q, k, v, options } => {
            let backend = q.backend();
            let grads = backend.attention_causal_backward(
                q.view(),
                k.view(),
                v.view(),
                g.view(),
                options,
            )?;
            accumulate(pending, q, stored(grads.dq, q.dims(), backend)?)?;
            accumulate(pending, k, stored(grads.dk, k.dims(), backend)?)?;
            accumulate(pending, v, stored(grads.dv, v.dims(), backend)?)
        }
        Op::MaxPool2d { x, argmax, window } => {
            let g = g.contiguous()?;
            let backend = x.backend();
            let at_layout = Layout::contiguous(Shape::new(g.dims())?);
            let dx = backend.max_pool2d_backward(
                g.view(),
                crate::View::new(argmax, &at_layout),
                window,
                [x.dims()[2], x.dims()[3]],
            )?;
            accumulate(pending, x, stored(dx, x.dims(), backend)?)
        }
    }
}

/// A backend result as a contiguous tensor of shape `dims`.
fn stored<B: Backend>(s: B::Storage, dims: &[usize], backend: &B) -> Result<Tensor<B>> {
    Tensor::from_storage(Arc::new(s), Layout::contiguous(Shape::new(dims)?), backend)
}

type GradPair<B> = (Option<Tensor<B>>, Option<Tensor<B>>);

fn binary_grads<B: Backend>(
    op: BinaryOp,
    a: &Tensor<B>,
    b: &Tensor<B>,
    y: &Tensor<B>,
    g: &Tensor<B>,
) -> Result<GradPair<B>> {
    let (na, nb) = (a.requires_grad(), b.requires_grad());
    let opt = |need: bool, f: &dyn Fn() -> Result<Tensor<B>>| need.then(f).transpose();
    Ok(match op {
        BinaryOp::Add => (opt(na, &|| Ok(g.clone()))?, opt(nb, &|| Ok(g.clone()))?),
        BinaryOp::Sub => (opt(na, &|| Ok(g.clone()))?, opt(nb, &|| g.neg())?),
        BinaryOp::Mul => (opt(na, &|| g.mul(b))?, opt(nb, &|| g.mul(a))?),
        // d(a/b)/db = −a/b² = −y/b
        BinaryOp::Div => (
            opt(na, &|| g.div(b))?,
            opt(nb, &|| g.mul(y)?.div(b)?.neg())?,
        ),
        BinaryOp::Maximum | BinaryOp::Minimum => {
            // The gradient goes to the operand that was chosen; on ties, to `a`.
            let cmp = if op == BinaryOp::Maximum {
                a.binary(BinaryOp::Ge, b)?
            } else {
                b.binary(BinaryOp::Ge, a)?
            };
            (
                opt(na, &|| g.mul(&cmp))?,
                opt(nb, &|| g.mul(&cmp.affine(-1.0, 1.0)?))?,
            )
        }
        // Comparisons are piecewise constant: zero gradient.
        BinaryOp::Eq | BinaryOp::Gt | BinaryOp::Ge => (None, None),
    })
}
