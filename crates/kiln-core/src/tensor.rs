//! `Tensor`: an n-dimensional array on a backend, with zero-copy views and
//! recorded ops for autograd.
//!
//! ```
//! use kiln_core::Tensor;
//! use kiln_cpu::CpuBackend;
//!
//! let b = CpuBackend::reference();
//! let x = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], &b)?;
//! // Views share storage: a transpose or a narrow copies nothing.
//! let t = x.transpose(0, 1)?;
//! assert_eq!(t.dims(), [3, 2]);
//! let col = x.narrow(1, 1, 1)?;
//! assert_eq!(col.to_vec_f32()?, [2.0, 5.0]);
//! // Elementwise ops broadcast; reductions take axes.
//! let y = x.add(&Tensor::from_slice(&[10.0, 20.0, 30.0], &[3], &b)?)?;
//! assert_eq!(y.sum(&[0], false)?.to_vec_f32()?, [25.0, 47.0, 69.0]);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::autograd::{is_grad_enabled, Op};
use crate::backend::{
    Activation, BackendStorage, BinaryOp, Distribution, GemmEpilogue, ReduceOp, UnaryOp, View,
};
use crate::{AttentionOptions, Backend, DType, Error, HostData, Layout, Result, Shape, Window2d};

/// A process-wide unique tensor identity (gradients are keyed by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    /// A fresh id.
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for TensorId {
    fn default() -> Self {
        Self::new()
    }
}

/// An immutable n-dimensional array on backend `B`.
///
/// Cloning is cheap (a reference count). Views share storage. When gradient
/// recording is on and an operand requires gradients, the result remembers
/// the op that made it, and [`Tensor::backward`] can differentiate through it.
pub struct Tensor<B: Backend>(Arc<Inner<B>>);

struct Inner<B: Backend> {
    id: TensorId,
    storage: Arc<B::Storage>,
    layout: Layout,
    backend: B,
    requires_grad: bool,
    op: Option<Op<B>>,
}

impl<B: Backend> Clone for Tensor<B> {
    fn clone(&self) -> Self {
        Tensor(Arc::clone(&self.0))
    }
}

impl<B: Backend> fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({}, {}, {}{})",
            self.shape(),
            self.dtype(),
            self.0.backend.name(),
            if self.requires_grad() { ", grad" } else { "" }
        )
    }
}

impl<B: Backend> Tensor<B> {
    // ----- construction ---------------------------------------------------

    pub(crate) fn build(
        storage: Arc<B::Storage>,
        layout: Layout,
        backend: B,
        id: TensorId,
        requires_grad: bool,
        op: Option<Op<B>>,
    ) -> Self {
        Tensor(Arc::new(Inner {
            id,
            storage,
            layout,
            backend,
            requires_grad,
            op,
        }))
    }

    /// A tensor that records nothing, over existing storage.
    pub fn from_storage(storage: Arc<B::Storage>, layout: Layout, backend: &B) -> Result<Self> {
        if layout.span()? > storage.len() {
            return Err(Error::invalid(format!(
                "layout of shape {} reaches element {} but the storage holds {}",
                layout.shape(),
                layout.span()?,
                storage.len()
            )));
        }
        Ok(Self::build(
            storage,
            layout,
            backend.clone(),
            TensorId::new(),
            false,
            None,
        ))
    }

    /// The result of an op on `self`: contiguous, recording `op` if any input needs gradients.
    fn result(
        &self,
        storage: B::Storage,
        dims: &[usize],
        op: impl FnOnce() -> Op<B>,
    ) -> Result<Self> {
        let layout = Layout::contiguous(Shape::new(dims)?);
        self.with_op(Arc::new(storage), layout, op)
    }

    fn with_op(
        &self,
        storage: Arc<B::Storage>,
        layout: Layout,
        op: impl FnOnce() -> Op<B>,
    ) -> Result<Self> {
        let op = is_grad_enabled()
            .then(op)
            .filter(|op| op.inputs().iter().any(|t| t.requires_grad()));
        Ok(Self::build(
            storage,
            layout,
            self.0.backend.clone(),
            TensorId::new(),
            op.is_some(),
            op,
        ))
    }

    /// Uploads host data as a tensor of shape `dims`.
    pub fn from_host(data: HostData, dims: &[usize], backend: &B) -> Result<Self> {
        let shape = Shape::new(dims)?;
        if data.len() != shape.numel() {
            return Err(Error::shape(
                "from_host",
                format!(
                    "{} elements do not fill shape {shape} ({} elements)",
                    data.len(),
                    shape.numel()
                ),
            ));
        }
        let storage = backend.upload_owned(data)?;
        Self::from_storage(Arc::new(storage), Layout::contiguous(shape), backend)
    }

    /// An f32 tensor from a slice.
    pub fn from_slice(data: &[f32], dims: &[usize], backend: &B) -> Result<Self> {
        Self::from_host(HostData::F32(data.to_vec()), dims, backend)
    }

    /// A tensor with every element equal to `value`.
    pub fn full(dims: &[usize], value: f64, dtype: DType, backend: &B) -> Result<Self> {
        let shape = Shape::new(dims)?;
        let storage = backend.full(shape.numel(), dtype, value)?;
        Self::from_storage(Arc::new(storage), Layout::contiguous(shape), backend)
    }

    /// Zeros.
    pub fn zeros(dims: &[usize], dtype: DType, backend: &B) -> Result<Self> {
        Self::full(dims, 0.0, dtype, backend)
    }

    /// Ones.
    pub fn ones(dims: &[usize], dtype: DType, backend: &B) -> Result<Self> {
        Self::full(dims, 1.0, dtype, backend)
    }

    /// Ones of this tensor's shape and dtype.
    pub fn ones_like(&self) -> Result<Self> {
        Self::ones(self.dims(), self.dtype(), self.backend())
    }

    /// Draws from `dist` with the counter-based RNG (see [`crate::rng`]):
    /// the same `seed` and `offset` give the same numbers on every backend.
    pub fn random(
        dims: &[usize],
        dist: Distribution,
        dtype: DType,
        seed: u64,
        offset: u64,
        backend: &B,
    ) -> Result<Self> {
        let shape = Shape::new(dims)?;
        let storage = backend.random(dist, shape.numel(), dtype, seed, offset)?;
        Self::from_storage(Arc::new(storage), Layout::contiguous(shape), backend)
    }

    // ----- accessors --------------------------------------------------------

    /// The unique id (gradients are keyed by it).
    pub fn id(&self) -> TensorId {
        self.0.id
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        self.0.layout.shape()
    }

    /// The extents of the dimensions.
    pub fn dims(&self) -> &[usize] {
        self.0.layout.dims()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.layout.rank()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.0.layout.numel()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.0.storage.dtype()
    }

    /// The layout into the storage.
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }

    /// The storage, shared with every view of it.
    pub fn storage(&self) -> &Arc<B::Storage> {
        &self.0.storage
    }

    /// The storage and layout, as backend ops take them.
    pub fn view(&self) -> View<'_, B::Storage> {
        View::new(&self.0.storage, &self.0.layout)
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.0.backend
    }

    /// Whether gradients flow to this tensor.
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }

    pub(crate) fn op(&self) -> Option<&Op<B>> {
        self.0.op.as_ref()
    }

    /// The same data, cut from the graph (no gradient flows through).
    pub fn detach(&self) -> Self {
        Self::build(
            Arc::clone(&self.0.storage),
            self.0.layout.clone(),
            self.0.backend.clone(),
            TensorId::new(),
            false,
            None,
        )
    }

    /// A leaf that requires gradients, with a given id (how [`crate::Var`]
    /// presents its parameter to the graph).
    pub(crate) fn leaf(storage: Arc<B::Storage>, layout: Layout, backend: B, id: TensorId) -> Self {
        Self::build(storage, layout, backend, id, true, None)
    }

    // ----- host transfer ------------------------------------------------

    /// Copies the elements to the host, in row-major order.
    pub fn to_host(&self) -> Result<HostData> {
        self.backend().download(self.view())
    }

    /// The elements as f32 (converting f16/bf16 exactly).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        match self.to_host()? {
            HostData::F32(v) => Ok(v),
            HostData::U32(_) => Err(Error::DType {
                op: "to_vec_f32",
                expected: DType::F32,
                got: DType::U32,
            }),
            other => Ok(other.to_f32_vec()),
        }
    }

    /// The elements of a u32 tensor.
    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        match self.to_host()? {
            HostData::U32(v) => Ok(v),
            other => Err(Error::DType {
                op: "to_vec_u32",
                expected: DType::U32,
                got: other.dtype(),
            }),
        }
    }

    /// The value of a one-element tensor, as f32.
    pub fn to_scalar_f32(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "to_scalar",
                format!("tensor of shape {} is not a single element", self.shape()),
            ));
        }
        Ok(self.to_vec_f32()?[0])
    }

    // ----- views ----------------------------------------------------------

    fn view_op(&self, layout: Layout, op: impl FnOnce() -> Op<B>) -> Result<Self> {
        self.with_op(Arc::clone(&self.0.storage), layout, op)
    }

    /// The same elements under another shape; copies only if the layout is
    /// not contiguous.
    pub fn reshape(&self, dims: &[usize]) -> Result<Self> {
        let shape = Shape::new(dims)?;
        match self.layout().reshape(&shape)? {
            Some(l) => self.view_op(l, || Op::Reshape { x: self.clone() }),
            None => self.contiguous()?.reshape(dims),
        }
    }

    /// Collapses dimensions `axis..` into one.
    pub fn flatten_from(&self, axis: usize) -> Result<Self> {
        if axis > self.rank() {
            return Err(Error::invalid(format!(
                "flatten_from({axis}): tensor has rank {}",
                self.rank()
            )));
        }
        let mut dims = self.dims()[..axis].to_vec();
        dims.push(self.dims()[axis..].iter().product());
        self.reshape(&dims)
    }

    /// Inserts a dimension of extent 1 at `axis`.
    pub fn unsqueeze(&self, axis: usize) -> Result<Self> {
        if axis > self.rank() {
            return Err(Error::invalid(format!(
                "unsqueeze({axis}): tensor has rank {}",
                self.rank()
            )));
        }
        let mut dims = self.dims().to_vec();
        dims.insert(axis, 1);
        let mut strides = self.layout().strides().to_vec();
        strides.insert(axis, 0);
        let l = Layout::new(Shape::new(&dims)?, strides, self.layout().offset())?;
        self.view_op(l, || Op::Reshape { x: self.clone() })
    }

    /// Swaps two dimensions (a view).
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Self> {
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        if d0 >= perm.len() || d1 >= perm.len() {
            return Err(Error::invalid(format!(
                "transpose({d0}, {d1}): tensor has rank {}",
                self.rank()
            )));
        }
        perm.swap(d0, d1);
        self.permute(&perm)
    }

    /// The transpose of a matrix (a view).
    pub fn t(&self) -> Result<Self> {
        if self.rank() != 2 {
            return Err(Error::shape(
                "t",
                format!("expected a matrix, got shape {}", self.shape()),
            ));
        }
        self.transpose(0, 1)
    }

    /// Reorders dimensions (a view).
    pub fn permute(&self, perm: &[usize]) -> Result<Self> {
        let l = self.layout().permute(perm)?;
        self.view_op(l, || Op::Permute {
            x: self.clone(),
            perm: perm.to_vec(),
        })
    }

    /// Elements `start..start + len` of dimension `dim` (a view).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        let l = self.layout().narrow(dim, start, len)?;
        self.view_op(l, || Op::Narrow {
            x: self.clone(),
            dim,
            start,
        })
    }

    /// Broadcasts to `dims` (a view with stride-0 dimensions).
    pub fn broadcast_as(&self, dims: &[usize]) -> Result<Self> {
        if dims == self.dims() {
            return Ok(self.clone());
        }
        let l = self.layout().broadcast_as(&Shape::new(dims)?)?;
        self.view_op(l, || Op::Broadcast { x: self.clone() })
    }

    /// A contiguous copy, or `self` if already contiguous.
    pub fn contiguous(&self) -> Result<Self> {
        if self.layout().is_contiguous() {
            return Ok(self.clone());
        }
        let dst = self.backend().contiguous(self.view())?;
        self.result(dst, self.dims(), || Op::Reshape { x: self.clone() })
    }

    /// `self` if its storage holds exactly its elements in row-major order
    /// from index 0 (what in-place kernels need), else such a copy.
    /// Records nothing.
    pub fn dense(&self) -> Result<Self> {
        if self.layout().contiguous_range() == Some(0..self.storage().len()) {
            return Ok(self.detach());
        }
        let dst = self.backend().contiguous(self.view())?;
        let layout = Layout::contiguous(self.shape().clone());
        Tensor::from_storage(Arc::new(dst), layout, self.backend())
    }

    /// A contiguous copy of `self` with `src` written over elements
    /// `start..start + src.dims()[dim]` of dimension `dim`. Records nothing.
    pub fn write_slice(&self, dim: usize, start: usize, src: &Tensor<B>) -> Result<Self> {
        let dst = self.backend().contiguous(self.view())?;
        src.written_over(dst, Layout::contiguous(self.shape().clone()), dim, start)
    }

    /// [`Tensor::write_slice`] that consumes `self`: when `self` is dense
    /// and nothing else holds it or its storage (a gradient being
    /// accumulated, a decoder's key/value cache), `src` is written into
    /// that storage in place instead of a copy of it. Records nothing.
    ///
    /// ```
    /// use kiln_core::Tensor;
    /// let b = kiln_cpu::CpuBackend::reference();
    /// let cache = Tensor::zeros(&[2, 4], kiln_core::DType::F32, &b)?;
    /// let row = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0], &[1, 4], &b)?;
    /// let cache = cache.into_written(0, 1, &row)?;
    /// assert_eq!(cache.to_vec_f32()?, [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]);
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn into_written(self, dim: usize, start: usize, src: &Tensor<B>) -> Result<Self> {
        if self.layout().contiguous_range() != Some(0..self.storage().len()) {
            return self.write_slice(dim, start, src);
        }
        let full = Layout::contiguous(self.shape().clone());
        match Arc::try_unwrap(self.0) {
            Ok(inner) => {
                let dst = match Arc::try_unwrap(inner.storage) {
                    Ok(dst) => dst,
                    Err(shared) => inner
                        .backend
                        .contiguous(View::new(&shared, &inner.layout))?,
                };
                src.written_over(dst, full, dim, start)
            }
            Err(shared) => Tensor(shared).write_slice(dim, start, src),
        }
    }

    /// Zeros of shape `dims` with `self` written over elements
    /// `start..start + self.dims()[dim]` of dimension `dim` (the gradient
    /// of a slice). Records nothing.
    pub(crate) fn placed_in_zeros(&self, dims: &[usize], dim: usize, start: usize) -> Result<Self> {
        let shape = Shape::new(dims)?;
        let dst = self.backend().full(shape.numel(), self.dtype(), 0.0)?;
        self.written_over(dst, Layout::contiguous(shape), dim, start)
    }

    /// `dst` (row-major `full`) with `self` copied over its window
    /// `start..start + self.dims()[dim]` of dimension `dim`, as a tensor.
    fn written_over(
        &self,
        mut dst: B::Storage,
        full: Layout,
        dim: usize,
        start: usize,
    ) -> Result<Self> {
        let len = self.dims().get(dim).copied().unwrap_or(0);
        let window = full.narrow(dim, start, len)?;
        if window.dims() != self.dims() {
            return Err(Error::shape(
                "write_slice",
                format!(
                    "source {} does not fit window {}",
                    self.shape(),
                    window.shape()
                ),
            ));
        }
        self.backend()
            .copy_strided(self.view(), &mut dst, &window)?;
        Tensor::from_storage(Arc::new(dst), full, self.backend())
    }

    // ----- elementwise ----------------------------------------------------

    /// Applies a unary op elementwise.
    pub fn unary(&self, op: UnaryOp) -> Result<Self> {
        let s = self.backend().unary(op, self.view())?;
        self.result(s, self.dims(), || Op::Unary {
            op,
            x: self.clone(),
        })
    }

    pub(crate) fn unary_backward(&self, op: UnaryOp, y: &Self, dy: &Self) -> Result<Self> {
        let s = self
            .backend()
            .unary_backward(op, self.view(), y.view(), dy.view())?;
        Tensor::from_storage(
            Arc::new(s),
            Layout::contiguous(self.shape().clone()),
            self.backend(),
        )
    }

    /// −x
    pub fn neg(&self) -> Result<Self> {
        self.unary(UnaryOp::Neg)
    }
    /// |x|
    pub fn abs(&self) -> Result<Self> {
        self.unary(UnaryOp::Abs)
    }
    /// eˣ
    pub fn exp(&self) -> Result<Self> {
        self.unary(UnaryOp::Exp)
    }
    /// ln x
    pub fn log(&self) -> Result<Self> {
        self.unary(UnaryOp::Log)
    }
    /// √x
    pub fn sqrt(&self) -> Result<Self> {
        self.unary(UnaryOp::Sqrt)
    }
    /// x²
    pub fn square(&self) -> Result<Self> {
        self.unary(UnaryOp::Square)
    }
    /// 1/x
    pub fn recip(&self) -> Result<Self> {
        self.unary(UnaryOp::Recip)
    }
    /// max(x, 0)
    pub fn relu(&self) -> Result<Self> {
        self.unary(UnaryOp::Relu)
    }
    /// 1/(1+e⁻ˣ)
    pub fn sigmoid(&self) -> Result<Self> {
        self.unary(UnaryOp::Sigmoid)
    }
    /// tanh x
    pub fn tanh(&self) -> Result<Self> {
        self.unary(UnaryOp::Tanh)
    }

    /// GELU, the tanh form GPT-2 uses ([`UnaryOp::Gelu`]).
    pub fn gelu(&self) -> Result<Self> {
        self.unary(UnaryOp::Gelu)
    }

    /// `x·mul + add`, elementwise.
    pub fn affine(&self, mul: f32, add: f32) -> Result<Self> {
        let s = self.backend().affine(self.view(), mul, add)?;
        self.result(s, self.dims(), || Op::Affine {
            x: self.clone(),
            mul,
        })
    }

    /// A binary op with NumPy broadcasting.
    pub fn binary(&self, op: BinaryOp, rhs: &Self) -> Result<Self> {
        if self.dtype() != rhs.dtype() {
            return Err(Error::DType {
                op: op.name(),
                expected: self.dtype(),
                got: rhs.dtype(),
            });
        }
        let shape = Shape::broadcast(op.name(), self.shape(), rhs.shape())?;
        let la = self.layout().broadcast_as(&shape)?;
        let lb = rhs.layout().broadcast_as(&shape)?;
        let s = self.backend().binary(
            op,
            View::new(self.storage(), &la),
            View::new(rhs.storage(), &lb),
        )?;
        self.result(s, shape.dims(), || Op::Binary {
            op,
            a: self.clone(),
            b: rhs.clone(),
        })
    }

    /// a + b (broadcasting)
    pub fn add(&self, rhs: &Self) -> Result<Self> {
        self.binary(BinaryOp::Add, rhs)
    }
    /// a − b (broadcasting)
    pub fn sub(&self, rhs: &Self) -> Result<Self> {
        self.binary(BinaryOp::Sub, rhs)
    }
    /// a · b (broadcasting)
    pub fn mul(&self, rhs: &Self) -> Result<Self> {
        self.binary(BinaryOp::Mul, rhs)
    }
    /// a / b (broadcasting)
    pub fn div(&self, rhs: &Self) -> Result<Self> {
        self.binary(BinaryOp::Div, rhs)
    }
    /// max(a, b) (broadcasting)
    pub fn maximum(&self, rhs: &Self) -> Result<Self> {
        self.binary(BinaryOp::Maximum, rhs)
    }
    /// min(a, b) (broadcasting)
    pub fn minimum(&self, rhs: &Self) -> Result<Self> {
        self.binary(BinaryOp::Minimum, rhs)
    }

    /// Converts to another dtype.
    pub fn cast(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let s = self.backend().cast(self.view(), dtype)?;
        let differentiable = dtype.is_float() && self.dtype().is_float();
        let r = self.result(s, self.dims(), || Op::Cast { x: self.clone() })?;
        Ok(if differentiable { r } else { r.detach() })
    }

    // ----- linear algebra -------------------------------------------------

    /// Batched GEMM with a fused epilogue: `act(α·self·rhs + bias)`, where
    /// `self` is `[batch, m, k]`, `rhs` is `[batch, k, n]` and `bias` is `[n]`.
    pub fn gemm(
        &self,
        rhs: &Self,
        alpha: f32,
        bias: Option<&Self>,
        activation: Activation,
    ) -> Result<Self> {
        let (a, b) = (self.dims(), rhs.dims());
        if a.len() != 3 || b.len() != 3 || a[0] != b[0] || a[2] != b[1] {
            return Err(Error::shape(
                "gemm",
                format!(
                    "expected [batch, m, k] and [batch, k, n], got {} and {}",
                    self.shape(),
                    rhs.shape()
                ),
            ));
        }
        if let Some(bias) = bias {
            if bias.dims() != [b[2]] {
                return Err(Error::shape(
                    "gemm",
                    format!("bias has shape {}, expected [{}]", bias.shape(), b[2]),
                ));
            }
        }
        for t in [Some(rhs), bias].into_iter().flatten() {
            if t.dtype() != self.dtype() {
                return Err(Error::DType {
                    op: "gemm",
                    expected: self.dtype(),
                    got: t.dtype(),
                });
            }
        }
        let epilogue = GemmEpilogue {
            alpha,
            beta_c: None,
            bias: bias.map(|t| t.view()),
            activation,
        };
        let s = self.backend().gemm(self.view(), rhs.view(), &epilogue)?;
        self.result(s, &[a[0], a[1], b[2]], || Op::Gemm {
            a: self.clone(),
            b: rhs.clone(),
            bias: bias.cloned(),
            activation,
            alpha,
        })
    }

    /// Matrix product of two matrices (`[m, k]·[k, n]`) or two equal-batch
    /// stacks (`[b, m, k]·[b, k, n]`).
    pub fn matmul(&self, rhs: &Self) -> Result<Self> {
        let (a, b) = (self.dims(), rhs.dims());
        if a.len() == b.len() && a.len() >= 2 && a[a.len() - 1] != b[b.len() - 2] {
            return Err(Error::shape(
                "matmul",
                format!(
                    "{} · {}: the left operand's columns ({}) must equal the right one's rows ({})",
                    self.shape(),
                    rhs.shape(),
                    a[a.len() - 1],
                    b[b.len() - 2]
                ),
            ));
        }
        match (self.rank(), rhs.rank()) {
            (2, 2) => self
                .unsqueeze(0)?
                .gemm(&rhs.unsqueeze(0)?, 1.0, None, Activation::None)?
                .reshape(&[self.dims()[0], rhs.dims()[1]]),
            (3, 3) => self.gemm(rhs, 1.0, None, Activation::None),
            _ => Err(Error::shape(
                "matmul",
                format!(
                    "expected two matrices or two batches of matrices, got {} and {}",
                    self.shape(),
                    rhs.shape()
                ),
            )),
        }
    }

    /// A dense layer in one fused GEMM: `act(self·weight + bias)` with
    /// `self` `[n, in]`, `weight` `[in, out]`, `bias` `[out]`.
    pub fn linear(
        &self,
        weight: &Self,
        bias: Option<&Self>,
        activation: Activation,
    ) -> Result<Self> {
        if self.rank() != 2 || weight.rank() != 2 || self.dims()[1] != weight.dims()[0] {
            return Err(Error::shape(
                "linear",
                format!(
                    "input {} does not fit weight {} (expected [n, {}])",
                    self.shape(),
                    weight.shape(),
                    weight.dims().first().copied().unwrap_or(0)
                ),
            ));
        }
        self.unsqueeze(0)?
            .gemm(&weight.unsqueeze(0)?, 1.0, bias, activation)?
            .reshape(&[self.dims()[0], weight.dims()[1]])
    }

    // ----- convolution and pooling -----------------------------------------

    /// 2-D convolution of this `[n, c, h, w]` tensor with `weight`
    /// `[o, c, kh, kw]` over `window`, plus `bias` `[o]`, then `activation`
    /// (fused): `[n, o, oh, ow]`.
    pub fn conv2d(
        &self,
        weight: &Self,
        bias: Option<&Self>,
        activation: Activation,
        window: &Window2d,
    ) -> Result<Self> {
        let dims =
            crate::conv::conv2d_output(self.dims(), weight.dims(), bias.map(|b| b.dims()), window)?;
        let s = self.backend().conv2d(
            self.view(),
            weight.view(),
            bias.map(|b| b.view()),
            activation,
            window,
        )?;
        self.result(s, &dims, || Op::Conv2d {
            x: self.clone(),
            weight: weight.clone(),
            bias: bias.cloned(),
            activation,
            window: *window,
        })
    }

    /// [`Tensor::conv2d`] then [`Tensor::max_pool2d`] as one op: the same
    /// result, bitwise, without keeping the convolution's output (the
    /// backend may fuse the two; the backward pass needs only the pooled
    /// values and where they came from).
    pub fn conv2d_pool(
        &self,
        weight: &Self,
        bias: Option<&Self>,
        activation: Activation,
        conv: &Window2d,
        pool: &Window2d,
    ) -> Result<Self> {
        let conv_dims =
            crate::conv::conv2d_output(self.dims(), weight.dims(), bias.map(|b| b.dims()), conv)?;
        let dims = crate::conv::pool2d_output(&conv_dims, pool)?;
        let (s, argmax) = self.backend().conv2d_pool(
            self.view(),
            weight.view(),
            bias.map(|b| b.view()),
            activation,
            conv,
            pool,
        )?;
        self.result(s, &dims, || Op::Conv2dPool {
            x: self.clone(),
            weight: weight.clone(),
            bias: bias.cloned(),
            activation,
            conv: *conv,
            pool: *pool,
            argmax: Arc::new(argmax),
        })
    }

    /// Rows of this `[vocab, dim]` table picked by the u32 `ids` (any
    /// shape; [`Backend::embedding`]): the ids' shape plus `[dim]`. The
    /// table's gradient sums the rows' gradients in position order.
    pub fn embedding(&self, ids: &Self) -> Result<Self> {
        let s = self.backend().embedding(self.view(), ids.view())?;
        let mut dims = ids.dims().to_vec();
        dims.push(self.dims().get(1).copied().unwrap_or(0));
        self.result(s, &dims, || Op::Embedding {
            table: self.clone(),
            ids: ids.clone(),
        })
    }

    /// Causal-masked softmax over the last axis of `[…, T, S]` scores
    /// ([`Backend::softmax_causal`]): row `i` sees keys `0..=i + S − T`.
    pub fn softmax_causal(&self) -> Result<Self> {
        let s = self.backend().softmax_causal(self.view())?;
        // The softmax's gradient, y·(g − Σ g·y), is right as it is: the
        // masked probabilities are 0, so are their gradients.
        self.result(s, self.dims(), || Op::Softmax {
            x: self.clone(),
            log: false,
        })
    }

    /// Causal scaled-dot-product attention ([`Backend::attention_causal`]):
    /// `softmax_causal(scale·self·kᵀ)·v` for queries `self` `[batch, T, D]`
    /// and keys and values `[batch, S, D]`, `S ≥ T`. The backward pass
    /// recomputes the probabilities instead of keeping the `[batch, T, S]`
    /// matrix.
    ///
    /// ```
    /// use kiln_core::Tensor;
    /// use kiln_cpu::CpuBackend;
    ///
    /// let b = CpuBackend::reference();
    /// let q = Tensor::from_slice(&[1.0, 0.0, 0.0, 1.0], &[1, 2, 2], &b)?;
    /// let v = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0], &[1, 2, 2], &b)?;
    /// let y = q.attention_causal(&q, &v, 1.0)?.to_vec_f32()?;
    /// // The first query sees only the first key: its value, exactly.
    /// assert_eq!(&y[..2], [1.0, 2.0]);
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn attention_causal(&self, k: &Self, v: &Self, scale: f32) -> Result<Self> {
        self.attention_causal_with(k, v, &AttentionOptions::new(scale))
    }

    /// [`Tensor::attention_causal`] with any [`AttentionOptions`]: dropout
    /// on the probabilities while training, drawn inside the fused kernel
    /// (and drawn again backward) — exactly the weights
    /// [`Tensor::dropout`] would drop from the `[batch, T, S]`
    /// probabilities with the same stream, which are never stored.
    ///
    /// ```
    /// use kiln_core::{AttentionDropout, AttentionOptions, Tensor};
    /// use kiln_cpu::CpuBackend;
    ///
    /// let b = CpuBackend::reference();
    /// let q = Tensor::from_slice(&[0.5; 16], &[1, 4, 4], &b)?;
    /// let v = Tensor::from_slice(&(0..16).map(|x| x as f32).collect::<Vec<_>>(), &[1, 4, 4], &b)?;
    /// let drop = AttentionOptions::new(0.5).with_dropout(AttentionDropout::new(0.5, 3, 0)?);
    /// let fused = q.attention_causal_with(&q, &v, &drop)?.to_vec_f32()?;
    /// // The same as dropping the stored probabilities with the same stream.
    /// let p = q.matmul(&q.transpose(1, 2)?)?.affine(0.5, 0.0)?.softmax_causal()?;
    /// let composed = p.dropout(0.5, 3, 0)?.matmul(&v)?.to_vec_f32()?;
    /// for (a, b) in fused.iter().zip(&composed) {
    ///     assert!((a - b).abs() < 1e-5);
    /// }
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn attention_causal_with(
        &self,
        k: &Self,
        v: &Self,
        options: &AttentionOptions,
    ) -> Result<Self> {
        let y = self
            .backend()
            .attention_causal(self.view(), k.view(), v.view(), options)?;
        self.result(y, self.dims(), || Op::AttentionCausal {
            q: self.clone(),
            k: k.clone(),
            v: v.clone(),
            options: *options,
        })
    }

    /// Layer normalisation over the last axis ([`Backend::layer_norm`]):
    /// `(x − μ)/√(σ² + eps)·gamma + beta` per row, `gamma` and `beta` of
    /// shape `[last]`.
    pub fn layer_norm(&self, gamma: &Self, beta: &Self, eps: f32) -> Result<Self> {
        let out = self
            .backend()
            .layer_norm(self.view(), gamma.view(), beta.view(), eps)?;
        self.result(out.y, self.dims(), || Op::LayerNorm {
            x: self.clone(),
            gamma: gamma.clone(),
            beta: beta.clone(),
            mean: Arc::new(out.mean),
            rstd: Arc::new(out.rstd),
        })
    }

    /// Max-pooling of this `[n, c, h, w]` tensor over `window`.
    pub fn max_pool2d(&self, window: &Window2d) -> Result<Self> {
        let dims = crate::conv::pool2d_output(self.dims(), window)?;
        let (s, argmax) = self.backend().max_pool2d(self.view(), window)?;
        self.result(s, &dims, || Op::MaxPool2d {
            x: self.clone(),
            argmax: Arc::new(argmax),
            window: *window,
        })
    }

    /// Inverted dropout: each element is zeroed with probability `rate` and
    /// the rest scaled by `1/(1 − rate)`, the keep/drop draws coming from
    /// the Philox stream `(seed, offset)` — the same on every backend.
    pub fn dropout(&self, rate: f32, seed: u64, offset: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&rate) {
            return Err(Error::invalid(format!(
                "dropout: rate {rate} must be in [0, 1)"
            )));
        }
        if rate == 0.0 {
            return Ok(self.clone());
        }
        let u = Tensor::random(
            self.dims(),
            Distribution::Uniform {
                low: 0.0,
                high: 1.0,
            },
            DType::F32,
            seed,
            offset,
            self.backend(),
        )?;
        let threshold = Tensor::full(&[1], f64::from(rate), DType::F32, self.backend())?
            .broadcast_as(self.dims())?;
        // keep = (u ≥ rate) / (1 − rate): a constant mask, no gradient.
        let keep = u
            .binary(BinaryOp::Ge, &threshold)?
            .affine(1.0 / (1.0 - rate), 0.0)?
            .cast(self.dtype())?;
        self.mul(&keep)
    }

    // ----- reductions -----------------------------------------------------

    fn normalize_axes(&self, axes: &[usize]) -> Result<Vec<usize>> {
        let mut v = axes.to_vec();
        v.sort_unstable();
        v.dedup();
        if let Some(&a) = v.last().filter(|&&a| a >= self.rank()) {
            return Err(Error::invalid(format!(
                "axis {a} is out of range for a tensor of shape {}",
                self.shape()
            )));
        }
        Ok(v)
    }

    /// Reduces over `axes`, keeping them with extent 1.
    pub fn reduce_keepdim(&self, op: ReduceOp, axes: &[usize]) -> Result<Self> {
        let axes = self.normalize_axes(axes)?;
        let s = self.backend().reduce(op, self.view(), &axes)?;
        let mut dims = self.dims().to_vec();
        for &a in &axes {
            dims[a] = 1;
        }
        self.result(s, &dims, || Op::Reduce {
            op,
            x: self.clone(),
            axes,
        })
    }

    /// Reduces over `axes`, keeping them when `keepdim`.
    pub fn reduce(&self, op: ReduceOp, axes: &[usize], keepdim: bool) -> Result<Self> {
        let r = self.reduce_keepdim(op, axes)?;
        if keepdim {
            return Ok(r);
        }
        let axes = self.normalize_axes(axes)?;
        let dims: Vec<usize> = (0..self.rank())
            .filter(|a| !axes.contains(a))
            .map(|a| self.dims()[a])
            .collect();
        r.reshape(&dims)
    }

    /// Σ over `axes`.
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Result<Self> {
        self.reduce(ReduceOp::Sum, axes, keepdim)
    }
    /// Mean over `axes`.
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Result<Self> {
        self.reduce(ReduceOp::Mean, axes, keepdim)
    }
    /// Maximum over `axes`.
    pub fn max(&self, axes: &[usize], keepdim: bool) -> Result<Self> {
        self.reduce(ReduceOp::Max, axes, keepdim)
    }
    /// Minimum over `axes`.
    pub fn min(&self, axes: &[usize], keepdim: bool) -> Result<Self> {
        self.reduce(ReduceOp::Min, axes, keepdim)
    }
    /// Σ of every element, as a scalar.
    pub fn sum_all(&self) -> Result<Self> {
        let axes: Vec<usize> = (0..self.rank()).collect();
        self.sum(&axes, false)
    }
    /// Mean of every element, as a scalar.
    pub fn mean_all(&self) -> Result<Self> {
        let axes: Vec<usize> = (0..self.rank()).collect();
        self.mean(&axes, false)
    }

    /// Sums a broadcast result back to `dims` (the gradient of a broadcast).
    pub fn sum_to(&self, dims: &[usize]) -> Result<Self> {
        if self.dims() == dims {
            return Ok(self.clone());
        }
        let lead = self.rank().checked_sub(dims.len()).ok_or_else(|| {
            Error::shape(
                "sum_to",
                format!("cannot sum {} to the higher-rank {dims:?}", self.shape()),
            )
        })?;
        let axes: Vec<usize> = (0..self.rank())
            .filter(|&a| a < lead || (dims[a - lead] == 1 && self.dims()[a] != 1))
            .collect();
        self.reduce_keepdim(ReduceOp::Sum, &axes)?.reshape(dims)
    }

    /// Index of the maximum along the last axis, as u32.
    pub fn argmax(&self) -> Result<Self> {
        if self.rank() == 0 {
            return Err(Error::shape("argmax", "a scalar has no last axis"));
        }
        let s = self.backend().argmax(self.view())?;
        let dims = &self.dims()[..self.rank() - 1];
        Tensor::from_storage(
            Arc::new(s),
            Layout::contiguous(Shape::new(dims)?),
            self.backend(),
        )
    }

    // ----- softmax and losses -----------------------------------------------

    fn softmax_impl(&self, log: bool) -> Result<Self> {
        if self.rank() == 0 {
            return Err(Error::shape("softmax", "a scalar has no last axis"));
        }
        let s = self.backend().softmax(self.view(), log)?;
        self.result(s, self.dims(), || Op::Softmax {
            x: self.clone(),
            log,
        })
    }

    /// Softmax along the last axis.
    pub fn softmax(&self) -> Result<Self> {
        self.softmax_impl(false)
    }

    /// Log-softmax along the last axis.
    pub fn log_softmax(&self) -> Result<Self> {
        self.softmax_impl(true)
    }

    /// Mean softmax cross-entropy of `[n, c]` logits against u32 class
    /// labels `[n]`, fused: one pass computes the loss and its gradient.
    pub fn softmax_cross_entropy(&self, labels: &Self) -> Result<Self> {
        if self.rank() != 2 || labels.dims() != [self.dims()[0]] {
            return Err(Error::shape(
                "softmax_cross_entropy",
                format!(
                    "logits {} and labels {} do not fit (expected [n, classes] and [n])",
                    self.shape(),
                    labels.shape()
                ),
            ));
        }
        if labels.dtype() != DType::U32 {
            return Err(Error::DType {
                op: "softmax_cross_entropy",
                expected: DType::U32,
                got: labels.dtype(),
            });
        }
        let n = self.dims()[0];
        let (loss, grad) = self
            .backend()
            .softmax_cross_entropy(self.view(), labels.view())?;
        let contiguous = |d: &[usize]| Shape::new(d).map(Layout::contiguous);
        let per_row = Tensor::from_storage(Arc::new(loss), contiguous(&[n])?, self.backend())?;
        let mean = per_row.mean(&[0], false)?;
        if !(is_grad_enabled() && self.requires_grad()) {
            return Ok(mean);
        }
        let dlogits =
            Tensor::from_storage(Arc::new(grad), contiguous(self.dims())?, self.backend())?
                .affine(1.0 / n.max(1) as f32, 0.0)?;
        Ok(Self::build(
            Arc::clone(mean.storage()),
            mean.layout().clone(),
            self.backend().clone(),
            TensorId::new(),
            true,
            Some(Op::SoftmaxCrossEntropy {
                logits: self.clone(),
                dlogits,
            }),
        ))
    }
}
