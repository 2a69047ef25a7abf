//! Embedding lookups: the default implementations of
//! [`Backend::embedding`] and [`Backend::embedding_backward`], composed
//! from primitive ops (a one-hot matrix times the table), so that any
//! backend has them. The lookup is exact (each output sums one nonzero
//! term); the backward pass is a GEMM, so deterministic on any backend
//! whose GEMM is.
//!
//! ```
//! use kiln_core::{DType, HostData, Tensor};
//! use kiln_cpu::CpuBackend;
//!
//! let b = CpuBackend::reference();
//! let table = Tensor::from_slice(&[0.0, 0.1, 1.0, 1.1, 2.0, 2.1], &[3, 2], &b)?; // 3 rows of 2
//! let ids = Tensor::from_host(HostData::U32(vec![2, 0, 2]), &[3], &b)?;
//! assert_eq!(ids.dtype(), DType::U32);
//! let rows = table.embedding(&ids)?;
//! assert_eq!(rows.dims(), [3, 2]);
//! assert_eq!(rows.to_vec_f32()?, [2.0, 2.1, 0.0, 0.1, 2.0, 2.1]);
//! // An id past the table is an error.
//! let bad = Tensor::from_host(HostData::U32(vec![3]), &[1], &b)?;
//! assert!(table.embedding(&bad).is_err());
//! # Ok::<(), kiln_core::Error>(())
//! ```

use crate::plan::EmbeddingPlan;
use crate::{Backend, BinaryOp, DType, Error, GemmEpilogue, HostData, Layout, Result, Shape, View};

/// The largest table the composition accepts: ids are compared as f32.
const MAX_ROWS: usize = 1 << 24;

/// The one-hot `[positions, vocab]` matrix of `ids` in `dtype`, after
/// checking every id is below `vocab` (one small download: a
/// synchronisation, which a backend's own kernel avoids).
fn one_hot<B: Backend>(
    b: &B,
    ids: View<'_, B::Storage>,
    plan: &EmbeddingPlan,
    dtype: DType,
) -> Result<B::Storage> {
    if plan.vocab > MAX_ROWS {
        return Err(Error::invalid(format!(
            "embedding: the composed lookup handles tables of up to {MAX_ROWS} rows, not {}",
            plan.vocab
        )));
    }
    let n = plan.positions;
    let ids_f = b.cast(ids, DType::F32)?;
    let row = Layout::contiguous(Shape::new(&[1, n])?);
    if n > 0 {
        let at = b.argmax(View::new(&ids_f, &row))?;
        let one = Layout::contiguous(Shape::new(&[1])?);
        let position = b.download(View::new(&at, &one))?.to_f64_vec()[0] as usize;
        let id = b.download(View::new(
            &ids_f,
            &Layout::new(Shape::new(&[1])?, vec![1], position)?,
        ))?;
        let id = id.to_f64_vec()[0];
        if id.is_nan() || id >= plan.vocab as f64 {
            return Err(plan.bad_id(position, Some(id as u32)));
        }
    }
    let iota = b.upload(&HostData::F32((0..plan.vocab).map(|v| v as f32).collect()))?;
    let shape = Shape::new(&[n, plan.vocab])?;
    let hot = b.binary(
        BinaryOp::Eq,
        View::new(&ids_f, &Layout::new(shape.clone(), vec![1, 0], 0)?),
        View::new(&iota, &Layout::new(shape.clone(), vec![0, 1], 0)?),
    )?;
    match dtype {
        DType::F32 => Ok(hot),
        t => b.cast(View::new(&hot, &Layout::contiguous(shape)), t),
    }
}

/// [`Backend::embedding`] as `one_hot(ids) · table`.
pub fn compose_embedding<B: Backend>(
    b: &B,
    table: View<'_, B::Storage>,
    ids: View<'_, B::Storage>,
) -> Result<B::Storage> {
    let plan = EmbeddingPlan::new(table, ids)?;
    let hot = one_hot(b, ids, &plan, plan.dtype)?;
    let (n, v, d) = (plan.positions, plan.vocab, plan.dim);
    let lh = Layout::contiguous(Shape::new(&[1, n, v])?);
    let s = table.layout.strides();
    let lt = Layout::new(
        Shape::new(&[1, v, d])?,
        vec![0, s[0], s[1]],
        table.layout.offset(),
    )?;
    b.gemm(
        View::new(&hot, &lh),
        View::new(table.storage, &lt),
        &GemmEpilogue::default(),
    )
}

/// [`Backend::embedding_backward`] as `one_hot(ids)ᵀ · dy`.
pub fn compose_embedding_backward<B: Backend>(
    b: &B,
    ids: View<'_, B::Storage>,
    dy: View<'_, B::Storage>,
    vocab: usize,
) -> Result<B::Storage> {
    let plan = EmbeddingPlan::backward(ids, dy, vocab)?;
    let hot = one_hot(b, ids, &plan, plan.dtype)?;
    let (n, v, d) = (plan.positions, plan.vocab, plan.dim);
    let dys = b.cast(dy, plan.dtype)?;
    let lht = Layout::new(Shape::new(&[1, v, n])?, vec![0, 1, v], 0)?;
    let ld = Layout::contiguous(Shape::new(&[1, n, d])?);
    b.gemm(
        View::new(&hot, &lht),
        View::new(&dys, &ld),
        &GemmEpilogue::default(),
    )
}
