//! Layer normalisation: the results of [`Backend::layer_norm`] and
//! [`Backend::layer_norm_backward`], and their default implementations,
//! composed from the primitive ops so that any backend has them.
//!
//! Over the last axis of `x` (length `C`), per row:
//! `μ = Σx/C`, `σ² = Σ(x − μ)²/C` (two passes, f32), `rstd = 1/√(σ² + ε)`,
//! `x̂ = (x − μ)·rstd` and `y = x̂·γ + β`. The backward pass, with
//! `g = dy·γ`: `dx = rstd·(g − mean(g) − x̂·mean(g·x̂))`, `dγ = Σ_rows dy·x̂`,
//! `dβ = Σ_rows dy` — computed from the `mean` and `rstd` it is given (the
//! forward pass's), whatever they are.
//!
//! ```
//! use kiln_core::Tensor;
//! use kiln_cpu::CpuBackend;
//!
//! let b = CpuBackend::reference();
//! let x = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0], &[1, 4], &b)?;
//! let (gamma, beta) = (
//!     Tensor::from_slice(&[1.0; 4], &[4], &b)?,
//!     Tensor::from_slice(&[0.0; 4], &[4], &b)?,
//! );
//! let y = x.layer_norm(&gamma, &beta, 1e-5)?.to_vec_f32()?;
//! // Each row normalised to mean 0 and variance 1 (up to eps).
//! assert!(y.iter().sum::<f32>().abs() < 1e-5);
//! assert!((y.iter().map(|v| v * v).sum::<f32>() / 4.0 - 1.0).abs() < 1e-4);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use crate::plan::LayerNormPlan;
use crate::{Backend, BinaryOp, DType, Layout, ReduceOp, Result, Shape, UnaryOp, View};

/// What [`Backend::layer_norm`] returns.
#[derive(Clone, Debug)]
pub struct LayerNormOut<S> {
    /// The normalised, scaled and shifted `x` (its shape and dtype).
    pub y: S,
    /// Each row's mean, f32, `rows` values.
    pub mean: S,
    /// Each row's `1/√(σ² + ε)`, f32, `rows` values.
    pub rstd: S,
}

/// What [`Backend::layer_norm_backward`] returns, each in `x`'s dtype.
#[derive(Clone, Debug)]
pub struct LayerNormGrads<S> {
    /// The gradient with respect to `x` (its shape).
    pub dx: S,
    /// With respect to `γ` (`[cols]`).
    pub dgamma: S,
    /// With respect to `β` (`[cols]`).
    pub dbeta: S,
}

/// `v` as a contiguous f32 storage of its logical shape.
fn f32_copy<B: Backend>(b: &B, v: View<'_, B::Storage>) -> Result<B::Storage> {
    b.cast(v, DType::F32)
}

/// The layouts the composition uses over `rows` × `cols`.
struct Grid {
    full: Layout,
    per_row: Layout,
    row_bcast: Layout,
    col_bcast: Layout,
}

impl Grid {
    fn new(rows: usize, cols: usize) -> Result<Self> {
        let shape = Shape::new(&[rows, cols])?;
        Ok(Grid {
            full: Layout::contiguous(shape.clone()),
            per_row: Layout::contiguous(Shape::new(&[rows])?),
            row_bcast: Layout::new(shape.clone(), vec![1, 0], 0)?,
            col_bcast: Layout::new(shape, vec![0, 1], 0)?,
        })
    }
}

/// [`Backend::layer_norm`] from primitive ops, in f32 whatever `x`'s type
/// (the result rounded once to it).
pub fn compose_layer_norm<B: Backend>(
    b: &B,
    x: View<'_, B::Storage>,
    gamma: View<'_, B::Storage>,
    beta: View<'_, B::Storage>,
    eps: f32,
) -> Result<LayerNormOut<B::Storage>> {
    let plan = LayerNormPlan::new(x, gamma, beta, eps)?;
    let g = Grid::new(plan.rows, plan.cols)?;
    let v = |s, l| View::new(s, l);
    let (xs, gs, bs) = (f32_copy(b, x)?, f32_copy(b, gamma)?, f32_copy(b, beta)?);
    let mean = b.reduce(ReduceOp::Mean, v(&xs, &g.full), &[1])?;
    let d = b.binary(BinaryOp::Sub, v(&xs, &g.full), v(&mean, &g.row_bcast))?;
    let squares = b.unary(UnaryOp::Square, v(&d, &g.full))?;
    let var = b.reduce(ReduceOp::Mean, v(&squares, &g.full), &[1])?;
    let shifted = b.affine(v(&var, &g.per_row), 1.0, eps)?;
    let root = b.unary(UnaryOp::Sqrt, v(&shifted, &g.per_row))?;
    let rstd = b.unary(UnaryOp::Recip, v(&root, &g.per_row))?;
    let xhat = b.binary(BinaryOp::Mul, v(&d, &g.full), v(&rstd, &g.row_bcast))?;
    let scaled = b.binary(BinaryOp::Mul, v(&xhat, &g.full), v(&gs, &g.col_bcast))?;
    let y = b.binary(BinaryOp::Add, v(&scaled, &g.full), v(&bs, &g.col_bcast))?;
    let y = match plan.dtype {
        DType::F32 => y,
        t => b.cast(v(&y, &g.full), t)?,
    };
    Ok(LayerNormOut { y, mean, rstd })
}

/// [`Backend::layer_norm_backward`] from primitive ops, in f32 (each
/// gradient rounded once to `x`'s type).
pub fn compose_layer_norm_backward<B: Backend>(
    b: &B,
    x: View<'_, B::Storage>,
    gamma: View<'_, B::Storage>,
    mean: View<'_, B::Storage>,
    rstd: View<'_, B::Storage>,
    dy: View<'_, B::Storage>,
) -> Result<LayerNormGrads<B::Storage>> {
    let plan = LayerNormPlan::backward(x, gamma, mean, rstd, dy)?;
    let g = Grid::new(plan.rows, plan.cols)?;
    let v = |s, l| View::new(s, l);
    let (xs, gs, dys) = (f32_copy(b, x)?, f32_copy(b, gamma)?, f32_copy(b, dy)?);
    let (ms, rs) = (f32_copy(b, mean)?, f32_copy(b, rstd)?);
    let d = b.binary(BinaryOp::Sub, v(&xs, &g.full), v(&ms, &g.row_bcast))?;
    let xhat = b.binary(BinaryOp::Mul, v(&d, &g.full), v(&rs, &g.row_bcast))?;
    let gy = b.binary(BinaryOp::Mul, v(&dys, &g.full), v(&gs, &g.col_bcast))?;
    let gx = b.binary(BinaryOp::Mul, v(&gy, &g.full), v(&xhat, &g.full))?;
    let a = b.reduce(ReduceOp::Mean, v(&gy, &g.full), &[1])?;
    let c = b.reduce(ReduceOp::Mean, v(&gx, &g.full), &[1])?;
    let t = b.binary(BinaryOp::Sub, v(&gy, &g.full), v(&a, &g.row_bcast))?;
    let u = b.binary(BinaryOp::Mul, v(&xhat, &g.full), v(&c, &g.row_bcast))?;
    let t = b.binary(BinaryOp::Sub, v(&t, &g.full), v(&u, &g.full))?;
    let dx = b.binary(BinaryOp::Mul, v(&t, &g.full), v(&rs, &g.row_bcast))?;
    let dyx = b.binary(BinaryOp::Mul, v(&dys, &g.full), v(&xhat, &g.full))?;
    let dgamma = b.reduce(ReduceOp::Sum, v(&dyx, &g.full), &[0])?;
    let dbeta = b.reduce(ReduceOp::Sum, v(&dys, &g.full), &[0])?;
    let cols = Layout::contiguous(Shape::new(&[plan.cols])?);
    let back = |s: B::Storage, l: &Layout| match plan.dtype {
        DType::F32 => Ok(s),
        t => b.cast(View::new(&s, l), t),
    };
    Ok(LayerNormGrads {
        dx: back(dx, &g.full)?,
        dgamma: back(dgamma, &cols)?,
        dbeta: back(dbeta, &cols)?,
    })
}
