//! `Var`: a trainable parameter whose storage optimisers update in place.
//!
//! ```
//! use kiln_core::{Tensor, Var};
//! use kiln_cpu::CpuBackend;
//!
//! let b = CpuBackend::reference();
//! let mut w = Var::from_tensor(&Tensor::from_slice(&[1.0, 2.0], &[2], &b)?)?;
//! // Ops on `as_tensor()` are recorded for autograd; `value()` is a detached copy.
//! let loss = w.as_tensor().square()?.sum_all()?;
//! let g = loss.backward()?;
//! assert_eq!(g.get_id(w.id()).unwrap().to_vec_f32()?, [2.0, 4.0]);
//! w.set(&Tensor::from_slice(&[0.5, 0.5], &[2], &b)?)?;
//! assert_eq!(w.value().to_vec_f32()?, [0.5, 0.5]);
//! // A value of another shape is refused.
//! assert!(w.set(&Tensor::from_slice(&[1.0], &[1], &b)?).is_err());
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::sync::Arc;

use crate::backend::BackendStorage;
use crate::tensor::TensorId;
use crate::{Backend, DType, Error, Layout, Result, Shape, Tensor};

/// A trainable tensor: contiguous storage with a stable id.
///
/// [`Var::as_tensor`] presents it to the graph as a leaf that requires
/// gradients (keyed by [`Var::id`] in the [`crate::GradStore`]).
/// [`Var::storage_mut`] gives optimisers in-place access; if a tensor from an
/// earlier forward pass still shares the storage, it is copied first, so that
/// tensor keeps the values it was computed with.
pub struct Var<B: Backend> {
    id: TensorId,
    storage: Arc<B::Storage>,
    layout: Layout,
    backend: B,
}

impl<B: Backend> Clone for Var<B> {
    /// A deep copy with a new id (an independent parameter).
    fn clone(&self) -> Self {
        Var {
            id: TensorId::new(),
            storage: Arc::new((*self.storage).clone()),
            layout: self.layout.clone(),
            backend: self.backend.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Var<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Var({:?}, {}, {})",
            self.id,
            self.layout.shape(),
            self.dtype()
        )
    }
}

impl<B: Backend> Var<B> {
    /// A parameter holding a contiguous copy of `t`'s values.
    pub fn from_tensor(t: &Tensor<B>) -> Result<Self> {
        let t = t.dense()?;
        let storage = Arc::clone(t.storage());
        Ok(Var {
            id: TensorId::new(),
            storage,
            layout: Layout::contiguous(t.shape().clone()),
            backend: t.backend().clone(),
        })
    }

    /// The id gradients of this parameter are keyed by.
    pub fn id(&self) -> TensorId {
        self.id
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        self.layout.shape()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The parameter as a graph leaf that requires gradients.
    pub fn as_tensor(&self) -> Tensor<B> {
        Tensor::leaf(
            Arc::clone(&self.storage),
            self.layout.clone(),
            self.backend.clone(),
            self.id,
        )
    }

    /// The parameter's current values, outside any graph.
    pub fn value(&self) -> Tensor<B> {
        self.as_tensor().detach()
    }

    /// The storage, for reading.
    pub fn storage(&self) -> &B::Storage {
        &self.storage
    }

    /// The storage, for in-place updates (copy-on-write if shared).
    pub fn storage_mut(&mut self) -> &mut B::Storage {
        Arc::make_mut(&mut self.storage)
    }

    /// Replaces the values with those of `t` (same shape and dtype).
    pub fn set(&mut self, t: &Tensor<B>) -> Result<()> {
        if t.shape() != self.shape() || t.dtype() != self.dtype() {
            return Err(Error::shape(
                "Var::set",
                format!(
                    "new value is {} {}, parameter is {} {}",
                    t.shape(),
                    t.dtype(),
                    self.shape(),
                    self.dtype()
                ),
            ));
        }
        let fresh = Var::from_tensor(t)?;
        self.storage = fresh.storage;
        Ok(())
    }
}
