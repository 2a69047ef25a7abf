//! Op plans: each checks an op's operands once — shapes, dtypes, views
//! inside their storages — with one set of error messages, and describes
//! the problem in the numbers a kernel needs. Every backend (kiln's CPU and
//! CUDA ones, and a vendor's) builds the plan first instead of validating
//! by hand; [`crate::ReducePlan`] and the convolution geometry of
//! [`crate::conv`] are the same idea for their ops.

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
