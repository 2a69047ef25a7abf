//! Op plans: each checks an op's operands once — shapes, dtypes, views
//! inside their storages — with one set of error messages, and describes
//! the problem in the numbers a kernel needs. Every backend (kiln's CPU and
//! CUDA ones, and a vendor's) builds the plan first instead of validating
//! by hand; [`crate::ReducePlan`] and the convolution geometry of
//! [`crate::conv`] are the same idea for their ops.

use crate::attention::{AttentionDropout, AttentionOptions};
use crate::{
    AdamSchedule, AdamStep, BackendStorage, DType, Error, GemmEpilogue, Result, SgdStep, View,
};

/// Checks that `v` stays inside its storage: the one message for a view
/// that reaches past the end.
pub fn check_view<S: BackendStorage>(op: &str, v: View<'_, S>) -> Result<()> {
    check_span(op, v.layout, v.storage.len())
}

/// [`check_view`] for a layout over a storage of `len` elements.
pub fn check_span(op: &str, layout: &crate::Layout, len: usize) -> Result<()> {
    let span = layout.span()?;
    if span > len {
        return Err(Error::invalid(format!(
            "{op}: layout of shape {} reaches element {span}, but the storage holds {len}",
            layout.shape()
        )));
    }
    Ok(())
}

/// A batched GEMM `[batch, m, k] × [batch, k, n]` with its epilogue,
/// checked.
///
/// ```
/// use kiln_core::{plan::GemmPlan, Backend, GemmEpilogue, Layout, Shape, View};
/// use kiln_cpu::CpuBackend;
///
/// let b = CpuBackend::reference();
/// let a = b.full(2 * 3 * 4, kiln_core::DType::F32, 1.0)?;
/// let (la, lb) = (
///     Layout::contiguous(Shape::new(&[2, 3, 4])?),
///     Layout::contiguous(Shape::new(&[2, 4, 3])?),
/// );
/// let plan = GemmPlan::new(View::new(&a, &la), View::new(&a, &lb), &GemmEpilogue::default())?;
/// assert_eq!((plan.batch, plan.m, plan.k, plan.n), (2, 3, 4, 3));
/// // Inner extents that differ are a shape error naming the op.
/// let e = GemmPlan::new(View::new(&a, &la), View::new(&a, &la), &GemmEpilogue::default());
/// assert!(e.unwrap_err().to_string().contains("gemm"));
/// # Ok::<(), kiln_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmPlan {
    /// Independent products.
    pub batch: usize,
    /// Rows of A and of the result.
    pub m: usize,
    /// The reduction length.
    pub k: usize,
    /// Columns of B and of the result.
    pub n: usize,
    /// The operands' (and the result's) type.
    pub dtype: DType,
}

impl GemmPlan {
    /// Checks `a` `[batch, m, k]` and `b` `[batch, k, n]` (one dtype, views
    /// inside their storages), the bias (`[n]`) and `C₀` (`[batch, m, n]`).
    pub fn new<S: BackendStorage>(
        a: View<'_, S>,
        b: View<'_, S>,
        ep: &GemmEpilogue<'_, S>,
    ) -> Result<Self> {
        let op = "gemm";
        let (ad, bd) = (a.layout.dims(), b.layout.dims());
        if ad.len() != 3 || bd.len() != 3 || ad[0] != bd[0] || ad[2] != bd[1] {
            return Err(Error::shape(
                op,
                format!("expected [batch, m, k] and [batch, k, n], got {ad:?} and {bd:?}"),
            ));
        }
        let dtype = a.storage.dtype();
        if b.storage.dtype() != dtype {
            return Err(Error::DType {
                op,
                expected: dtype,
                got: b.storage.dtype(),
            });
        }
        check_view(op, a)?;
        check_view(op, b)?;
        let (batch, m, k, n) = (ad[0], ad[1], ad[2], bd[2]);
        if let Some(v) = ep.bias {
            if v.layout.dims() != [n] {
                return Err(Error::shape(
                    op,
                    format!("bias has shape {}, expected [{n}]", v.layout.shape()),
                ));
            }
            check_view(op, v)?;
        }
        if let Some((_, v)) = ep.beta_c {
            if v.layout.dims() != [batch, m, n] {
                return Err(Error::shape(
                    op,
                    format!(
                        "C has shape {}, expected [{batch}, {m}, {n}]",
                        v.layout.shape()
                    ),
                ));
            }
            check_view(op, v)?;
        }
        Ok(GemmPlan {
            batch,
            m,
            k,
            n,
            dtype,
        })
    }
}

/// A fused softmax cross-entropy over `[rows, classes]` logits and u32
/// `[rows]` labels, checked (the labels' values are the backend's to check:
/// on the host, or where they live).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftmaxCePlan {
    /// Examples.
    pub rows: usize,
    /// Classes.
    pub classes: usize,
    /// The logits' (and the results') type.
    pub dtype: DType,
}

impl SoftmaxCePlan {
    /// Checks the shapes, the labels' dtype and both views' bounds.
    pub fn new<S: BackendStorage>(logits: View<'_, S>, labels: View<'_, S>) -> Result<Self> {
        let op = "softmax_cross_entropy";
        let dims = logits.layout.dims();
        if dims.len() != 2 || labels.layout.dims() != [dims[0]] {
            return Err(Error::shape(
                op,
                format!(
                    "logits {} and labels {} do not fit (expected [n, classes] and [n])",
                    logits.layout.shape(),
                    labels.layout.shape()
                ),
            ));
        }
        if labels.storage.dtype() != DType::U32 {
            return Err(Error::DType {
                op,
                expected: DType::U32,
                got: labels.storage.dtype(),
            });
        }
        check_view(op, logits)?;
        check_view(op, labels)?;
        Ok(SoftmaxCePlan {
            rows: dims[0],
            classes: dims[1],
            dtype: logits.storage.dtype(),
        })
    }

    /// The error for a label out of range, found at `row`.
    pub fn bad_label(&self, row: usize, label: Option<u32>) -> Error {
        let what = label.map_or(String::new(), |l| format!(" ({l})"));
        Error::invalid(format!(
            "softmax_cross_entropy: the label of row {row}{what} is outside 0..{}",
            self.classes
        ))
    }
}

/// A fused optimiser step over one parameter's storages, checked: all f32,
/// all the parameter's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptimizerPlan {
    /// Elements updated.
    pub len: usize,
}

impl OptimizerPlan {
    /// Checks `param`, `grad` and the state `slots` (`(name, storage)`,
    /// e.g. `("velocity", v)`) of op `op`.
    pub fn new<S: BackendStorage>(
        op: &'static str,
        param: &S,
        grad: &S,
        slots: &[(&str, &S)],
    ) -> Result<Self> {
        let len = param.len();
        for (what, s) in [("parameter", param), ("gradient", grad)]
            .into_iter()
            .chain(slots.iter().copied())
        {
            if s.dtype() != DType::F32 {
                return Err(Error::DType {
                    op,
                    expected: DType::F32,
                    got: s.dtype(),
                });
            }
            if s.len() != len {
                return Err(Error::shape(
                    op,
                    format!("{what} has {} elements, the parameter {len}", s.len()),
                ));
            }
        }
        Ok(OptimizerPlan { len })
    }

    /// The checks of [`crate::Backend::sgd_update`]: momentum needs a
    /// velocity buffer.
    pub fn sgd<S: BackendStorage>(
        param: &S,
        grad: &S,
        velocity: Option<&S>,
        step: &SgdStep,
    ) -> Result<Self> {
        let op = "sgd_update";
        let slots: Vec<(&str, &S)> = velocity.map(|v| ("velocity", v)).into_iter().collect();
        let plan = Self::new(op, param, grad, &slots)?;
        if velocity.is_none() && step.momentum != 0.0 {
            return Err(Error::invalid(
                "sgd_update: momentum needs a velocity buffer",
            ));
        }
        Ok(plan)
    }

    /// The checks of [`crate::Backend::adam_update`], and the step's
    /// schedule ([`AdamStep::schedule`]).
    pub fn adam<S: BackendStorage>(
        param: &S,
        grad: &S,
        m: &S,
        v: &S,
        step: &AdamStep,
    ) -> Result<(Self, AdamSchedule)> {
        let schedule = step.schedule()?;
        let plan = Self::new("adam_update", param, grad, &[("m", m), ("v", v)])?;
        Ok((plan, schedule))
    }
}

/// Layer normalisation over the last axis of `x` (`rows` × `cols`), checked:
/// `γ` and `β` of shape `[cols]` and `x`'s float type, `eps` finite and
/// positive. The backward plan also checks the statistics (f32, one per
/// row) and `dy` (`x`'s shape and type).
///
/// ```
/// use kiln_core::{plan::LayerNormPlan, Backend, DType, Layout, Shape, View};
/// use kiln_cpu::CpuBackend;
///
/// let b = CpuBackend::reference();
/// let x = b.full(6, DType::F32, 1.0)?;
/// let g = b.full(3, DType::F32, 1.0)?;
/// let (lx, lg) = (Layout::contiguous(Shape::new(&[2, 3])?), Layout::contiguous(Shape::new(&[3])?));
/// let plan = LayerNormPlan::new(View::new(&x, &lx), View::new(&g, &lg), View::new(&g, &lg), 1e-5)?;
/// assert_eq!((plan.rows, plan.cols), (2, 3));
/// let e = LayerNormPlan::new(View::new(&x, &lx), View::new(&g, &lg), View::new(&g, &lg), 0.0);
/// assert!(e.unwrap_err().to_string().contains("eps"));
/// # Ok::<(), kiln_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerNormPlan {
    /// Rows normalised independently (the product of all but the last axis).
    pub rows: usize,
    /// The normalised length (the last axis).
    pub cols: usize,
    /// The type of `x`, `γ`, `β`, `y` (and of `dy`, `dx`, `dγ`, `dβ`).
    pub dtype: DType,
}

impl LayerNormPlan {
    /// Checks a forward pass's operands.
    pub fn new<S: BackendStorage>(
        x: View<'_, S>,
        gamma: View<'_, S>,
        beta: View<'_, S>,
        eps: f32,
    ) -> Result<Self> {
        let op = "layer_norm";
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::invalid(format!(
                "layer_norm: eps {eps} must be finite and positive (1e-5 is usual)"
            )));
        }
        let plan = Self::shapes(op, x, gamma)?;
        plan.check_param(op, "β", beta)?;
        Ok(plan)
    }

    /// Checks a backward pass's operands.
    pub fn backward<S: BackendStorage>(
        x: View<'_, S>,
        gamma: View<'_, S>,
        mean: View<'_, S>,
        rstd: View<'_, S>,
        dy: View<'_, S>,
    ) -> Result<Self> {
        let op = "layer_norm_backward";
        let plan = Self::shapes(op, x, gamma)?;
        if dy.layout.shape() != x.layout.shape() {
            return Err(Error::shape(
                op,
                format!(
                    "dy {} is not x's shape {}",
                    dy.layout.shape(),
                    x.layout.shape()
                ),
            ));
        }
        plan.check_type(op, dy)?;
        check_view(op, dy)?;
        for (what, s) in [("mean", mean), ("rstd", rstd)] {
            if s.layout.numel() != plan.rows {
                return Err(Error::shape(
                    op,
                    format!(
                        "{what} {} does not hold one value per row ({} rows)",
                        s.layout.shape(),
                        plan.rows
                    ),
                ));
            }
            if s.storage.dtype() != DType::F32 {
                return Err(Error::DType {
                    op,
                    expected: DType::F32,
                    got: s.storage.dtype(),
                });
            }
            check_view(op, s)?;
        }
        Ok(plan)
    }

    fn shapes<S: BackendStorage>(
        op: &'static str,
        x: View<'_, S>,
        gamma: View<'_, S>,
    ) -> Result<Self> {
        let dims = x.layout.dims();
        let Some(&cols) = dims.last() else {
            return Err(Error::shape(
                op,
                "x is a scalar: it needs an axis to normalise",
            ));
        };
        if cols == 0 {
            return Err(Error::shape(
                op,
                format!(
                    "x {}: the normalised (last) axis is empty",
                    x.layout.shape()
                ),
            ));
        }
        let plan = LayerNormPlan {
            rows: dims[..dims.len() - 1].iter().product(),
            cols,
            dtype: x.storage.dtype(),
        };
        if !plan.dtype.is_float() {
            return Err(Error::DType {
                op,
                expected: DType::F32,
                got: plan.dtype,
            });
        }
        check_view(op, x)?;
        plan.check_param(op, "γ", gamma)?;
        Ok(plan)
    }

    fn check_param<S: BackendStorage>(
        &self,
        op: &'static str,
        what: &str,
        p: View<'_, S>,
    ) -> Result<()> {
        if p.layout.dims() != [self.cols] {
            return Err(Error::shape(
                op,
                format!(
                    "{what} {} does not match the normalised axis (expected [{}])",
                    p.layout.shape(),
                    self.cols
                ),
            ));
        }
        self.check_type(op, p)?;
        check_view(op, p)
    }

    fn check_type<S: BackendStorage>(&self, op: &'static str, v: View<'_, S>) -> Result<()> {
        if v.storage.dtype() != self.dtype {
            return Err(Error::DType {
                op,
                expected: self.dtype,
                got: v.storage.dtype(),
            });
        }
        Ok(())
    }
}

/// An embedding lookup: rows of a `[vocab, dim]` table picked by u32 ids
/// of any shape, checked (the ids' values are the backend's to check, on
/// the host or where they live: [`EmbeddingPlan::bad_id`] is the message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddingPlan {
    /// Rows of the table.
    pub vocab: usize,
    /// The width of a row.
    pub dim: usize,
    /// Ids looked up (the product of the ids' shape).
    pub positions: usize,
    /// The table's (and the result's) type; for the backward pass, `dy`'s.
    pub dtype: DType,
}

impl EmbeddingPlan {
    /// Checks a lookup's operands.
    pub fn new<S: BackendStorage>(table: View<'_, S>, ids: View<'_, S>) -> Result<Self> {
        let op = "embedding";
        let dims = table.layout.dims();
        if dims.len() != 2 {
            return Err(Error::shape(
                op,
                format!("the table {} is not [vocab, dim]", table.layout.shape()),
            ));
        }
        let plan = EmbeddingPlan {
            vocab: dims[0],
            dim: dims[1],
            positions: ids.layout.numel(),
            dtype: table.storage.dtype(),
        };
        Self::check_ids(op, ids)?;
        Self::check_float(op, plan.dtype)?;
        check_view(op, table)?;
        Ok(plan)
    }

    /// Checks a backward pass's operands: `dy` is the ids' shape plus
    /// `[dim]`; the result is `[vocab, dim]`.
    pub fn backward<S: BackendStorage>(
        ids: View<'_, S>,
        dy: View<'_, S>,
        vocab: usize,
    ) -> Result<Self> {
        let op = "embedding_backward";
        Self::check_ids(op, ids)?;
        let (idims, ddims) = (ids.layout.dims(), dy.layout.dims());
        if ddims.len() != idims.len() + 1 || ddims[..idims.len()] != *idims {
            return Err(Error::shape(
                op,
                format!(
                    "dy {} is not the ids' shape {} plus a row width",
                    dy.layout.shape(),
                    ids.layout.shape()
                ),
            ));
        }
        let plan = EmbeddingPlan {
            vocab,
            dim: ddims[idims.len()],
            positions: ids.layout.numel(),
            dtype: dy.storage.dtype(),
        };
        Self::check_float(op, plan.dtype)?;
        check_view(op, dy)?;
        Ok(plan)
    }

    fn check_ids<S: BackendStorage>(op: &'static str, ids: View<'_, S>) -> Result<()> {
        if ids.storage.dtype() != DType::U32 {
            return Err(Error::DType {
                op,
                expected: DType::U32,
                got: ids.storage.dtype(),
            });
        }
        check_view(op, ids)
    }

    fn check_float(op: &'static str, dtype: DType) -> Result<()> {
        if dtype.is_float() {
            Ok(())
        } else {
            Err(Error::DType {
                op,
                expected: DType::F32,
                got: dtype,
            })
        }
    }

    /// The error for an id out of range, found at `position` (row-major in
    /// the ids' shape).
    pub fn bad_id(&self, position: usize, id: Option<u32>) -> Error {
        let what = id.map_or(String::new(), |i| format!(" ({i})"));
        Error::invalid(format!(
            "embedding: the id at position {position}{what} is outside 0..{} (the table's rows)",
            self.vocab
        ))
    }
}

/// A causal-masked softmax over the last axis of `[…, T, S]` scores,
/// checked: query row `i` (of `T`) sees keys `0..=i + S − T` — the last
/// `T` of `S` positions, as with a cache of `S − T` earlier keys — so
/// `S ≥ T` and every row sees at least one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CausalSoftmaxPlan {
    /// Independent `[T, S]` matrices (the product of the leading axes).
    pub batch: usize,
    /// Query rows per matrix.
    pub queries: usize,
    /// Keys per row.
    pub keys: usize,
    /// The scores' (and the result's) type.
    pub dtype: DType,
}

impl CausalSoftmaxPlan {
    /// Checks the scores' shape, type and view.
    pub fn new<S: BackendStorage>(x: View<'_, S>) -> Result<Self> {
        let op = "softmax_causal";
        let dims = x.layout.dims();
        if dims.len() < 2 || dims[dims.len() - 1] < dims[dims.len() - 2] {
            return Err(Error::shape(
                op,
                format!(
                    "scores {} are not [.., queries, keys] with keys ≥ queries",
                    x.layout.shape()
                ),
            ));
        }
        let dtype = x.storage.dtype();
        if !dtype.is_float() {
            return Err(Error::DType {
                op,
                expected: DType::F32,
                got: dtype,
            });
        }
        check_view(op, x)?;
        let r = dims.len();
        Ok(CausalSoftmaxPlan {
            batch: dims[..r - 2].iter().product(),
            queries: dims[r - 2],
            keys: dims[r - 1],
            dtype,
        })
    }

    /// How many keys (from the first) row `row` — counted over all the
    /// matrices, row-major — sees.
    pub fn visible(&self, row: usize) -> usize {
        row % self.queries.max(1) + self.keys - self.queries + 1
    }
}

/// Causal scaled-dot-product attention over `[batch, T, D]` queries and
/// `[batch, S, D]` keys and values, checked: one float dtype, `S ≥ T`
/// (query `i` sees keys `0..=i + S − T`, the `S − T` first ones as from a
/// cache), a finite scale, views inside their storages.
///
/// ```
/// use kiln_core::attention::AttentionOptions;
/// use kiln_core::{plan::AttentionPlan, Backend, DType, Layout, Shape, View};
/// use kiln_cpu::CpuBackend;
///
/// let b = CpuBackend::reference();
/// let s = b.full(2 * 5 * 4, DType::F32, 0.5)?;
/// let (lq, lk) = (
///     Layout::contiguous(Shape::new(&[2, 3, 4])?),
///     Layout::contiguous(Shape::new(&[2, 5, 4])?),
/// );
/// let (q, k) = (View::new(&s, &lq), View::new(&s, &lk));
/// let plan = AttentionPlan::new(q, k, k, &AttentionOptions::new(0.5))?;
/// assert_eq!((plan.batch, plan.queries, plan.keys, plan.dim), (2, 3, 5, 4));
/// assert_eq!(plan.visible(0), 3); // two cached keys, then itself
/// // Two heads of width 2 side by side: four problems.
/// let two = AttentionPlan::new(q, k, k, &AttentionOptions::new(0.5).with_heads(2))?;
/// assert_eq!((two.batch, two.dim), (4, 2));
/// assert_eq!(two.row_start(3, 3, 1), (3 + 1) * 4 + 2); // example 1, head 1, row 1
/// assert!(AttentionPlan::new(q, k, k, &AttentionOptions::new(0.5).with_heads(3)).is_err());
/// // More queries than keys is a shape error naming the op.
/// let e = AttentionPlan::new(k, q, q, &AttentionOptions::new(0.5)).unwrap_err();
/// assert!(e.to_string().contains("attention_causal"));
/// # Ok::<(), kiln_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionPlan {
    /// Independent attention problems (examples × heads; problem
    /// `e·heads + h` is head `h` of example `e`).
    pub batch: usize,
    /// Heads side by side in each operand row
    /// ([`AttentionOptions::with_heads`]); 1 for `[batch, T, D]` operands.
    pub heads: usize,
    /// Query rows `T` per problem.
    pub queries: usize,
    /// Keys (and values) `S` per problem.
    pub keys: usize,
    /// The head width `D` (the operands' last axis is `heads·D`).
    pub dim: usize,
    /// Scale of the scores `q·kᵀ`.
    pub scale: f32,
    /// Dropout on the probabilities, if any.
    pub dropout: Option<AttentionDropout>,
    /// The operands' (and the results') type.
    pub dtype: DType,
}

impl AttentionPlan {
    /// Checks `q` `[n, T, heads·D]`, `k` and `v` `[n, S, heads·D]` and the
    /// options (a finite scale, a dropout rate in `[0, 1)`, `heads ≥ 1`
    /// dividing the last axis).
    pub fn new<S: BackendStorage>(
        q: View<'_, S>,
        k: View<'_, S>,
        v: View<'_, S>,
        options: &AttentionOptions,
    ) -> Result<Self> {
        let AttentionOptions {
            scale,
            dropout,
            heads,
        } = *options;
        let op = "attention_causal";
        let (qd, kd, vd) = (q.layout.dims(), k.layout.dims(), v.layout.dims());
        let fits = qd.len() == 3
            && kd.len() == 3
            && kd == vd
            && qd[0] == kd[0]
            && qd[2] == kd[2]
            && kd[1] >= qd[1];
        if !fits {
            return Err(Error::shape(
                op,
                format!(
                    "expected q [batch, T, D] and k, v [batch, S, D] with S ≥ T, got {qd:?}, {kd:?} and {vd:?}"
                ),
            ));
        }
        let dtype = q.storage.dtype();
        for got in [k.storage.dtype(), v.storage.dtype()] {
            if got != dtype {
                return Err(Error::DType {
                    op,
                    expected: dtype,
                    got,
                });
            }
        }
        if !dtype.is_float() {
            return Err(Error::DType {
                op,
                expected: DType::F32,
                got: dtype,
            });
        }
        if !scale.is_finite() {
            return Err(Error::invalid(format!(
                "{op}: the scale must be finite, got {scale}"
            )));
        }
        // (A last axis of 0 takes any number of heads of width 0, but not
        // so many problems that they cannot be counted.)
        let batch = qd[0].checked_mul(heads);
        if heads == 0 || qd[2] % heads != 0 || batch.is_none() {
            return Err(Error::invalid(format!(
                "{op}: {heads} heads do not divide the operands' last axis of {}",
                qd[2]
            )));
        }
        if let Some(d) = &dropout {
            d.check(op)?;
        }
        for x in [q, k, v] {
            check_view(op, x)?;
        }
        Ok(AttentionPlan {
            batch: batch.unwrap_or(0),
            heads,
            queries: qd[1],
            keys: kd[1],
            dim: qd[2] / heads,
            scale,
            dropout,
            dtype,
        })
    }

    /// [`AttentionPlan::new`], and `dy` of `q`'s shape and type.
    pub fn backward<S: BackendStorage>(
        q: View<'_, S>,
        k: View<'_, S>,
        v: View<'_, S>,
        dy: View<'_, S>,
        options: &AttentionOptions,
    ) -> Result<Self> {
        let plan = AttentionPlan::new(q, k, v, options)?;
        let op = "attention_causal_backward";
        if dy.layout.dims() != q.layout.dims() {
            return Err(Error::shape(
                op,
                format!(
                    "dy {} is not the shape of q {}",
                    dy.layout.shape(),
                    q.layout.shape()
                ),
            ));
        }
        if dy.storage.dtype() != plan.dtype {
            return Err(Error::DType {
                op,
                expected: plan.dtype,
                got: dy.storage.dtype(),
            });
        }
        check_view(op, dy)?;
        Ok(plan)
    }

    /// Where row `i` of problem `b` starts in a row-major
    /// `[batch / heads, rows, heads·D]` operand or result (`rows` its `T`
    /// or `S`): `((b / heads)·rows + i)·heads·D + (b mod heads)·D`.
    pub fn row_start(&self, b: usize, rows: usize, i: usize) -> usize {
        let (e, h) = (b / self.heads, b % self.heads);
        (e * rows + i) * self.heads * self.dim + h * self.dim
    }

    /// The `(example, row)` strides of an `[n, rows, heads·D]` operand
    /// whose rows can be read in place — each row's elements adjacent
    /// (stride 1, or one element), the rows and examples any distance
    /// apart: heads side by side in a fused projection, a cache narrowed
    /// to its filled positions — or `None` when they must be compacted
    /// first. Row `i` of problem `b` then starts `(b / heads)·example +
    /// (b mod heads)·D + i·row` elements past the layout's offset (the
    /// strides [`AttentionPlan::row_start`] assumes for a row-major one).
    ///
    /// ```
    /// use kiln_core::{plan::AttentionPlan, Layout, Shape};
    ///
    /// // q, the first third of a [2, 5, 3·8] projection.
    /// let q = Layout::contiguous(Shape::new(&[2, 5, 24])?).narrow(2, 0, 8)?;
    /// assert_eq!(AttentionPlan::rows_in_place(&q), Some((120, 24)));
    /// // Transposed rows are not.
    /// let t = Layout::contiguous(Shape::new(&[2, 8, 5])?).transpose(1, 2)?;
    /// assert_eq!(AttentionPlan::rows_in_place(&t), None);
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn rows_in_place(layout: &crate::Layout) -> Option<(usize, usize)> {
        match (layout.dims(), layout.strides()) {
            (&[_, _, w], &[example, row, sw]) if w == 1 || sw == 1 => Some((example, row)),
            _ => None,
        }
    }

    /// How many keys (from the first) query `i` of a problem sees.
    pub fn visible(&self, i: usize) -> usize {
        i + self.keys - self.queries + 1
    }

    /// The index in [`AttentionDropout`]'s stream of the weight of query
    /// `i` of problem `b` on key 0: `(b·T + i)·S` (key `j`'s is `j` more).
    pub fn first_weight(&self, b: usize, i: usize) -> u64 {
        ((b * self.queries + i) * self.keys) as u64
    }

    /// The dropout factors of query `i` of problem `b` over its first
    /// `out.len()` keys (0 or `1/(1 − rate)`; all 1 without dropout), from
    /// weight [`first_weight`](Self::first_weight) on.
    pub fn row_factors(&self, b: usize, i: usize, out: &mut [f32]) {
        match &self.dropout {
            Some(d) => d.factors(self.first_weight(b, i), out),
            None => out.fill(1.0),
        }
    }
}
