//! The `Backend` trait: the few dozen primitive ops a device must provide.
//!
//! Every op takes its operands as [`View`]s — storage plus an explicit
//! [`Layout`] — so transposed, sliced and broadcast operands reach the
//! backend without copies, and writes its result to fresh, contiguous
//! storage (the in-place optimiser updates are the exception). Higher-level
//! ops (linear layers, losses, autograd) are written once, over this trait,
//! in [`crate::Tensor`].
//!
//! Each op documents its numerical contract; the `kiln-conformance` suite
//! checks it against an f64 oracle.
//!
//! ```
//! use kiln_core::{Backend, HostData, Layout, Shape, View};
//! use kiln_cpu::CpuBackend;
//!
//! // Storage goes up once; every op then takes views: storage plus a layout.
//! let b = CpuBackend::reference();
//! let s = b.upload(&HostData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))?;
//! // The [2, 3] matrix seen transposed, read back as the [3, 2] it shows: no copy on the way.
//! let t = Layout::contiguous(Shape::new(&[2, 3])?).transpose(0, 1)?;
//! let down = b.download(View { storage: &s, layout: &t })?;
//! assert_eq!(down, HostData::F32(vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]));
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::fmt;

use crate::{Capabilities, DType, HostData, Layout, Result, Window2d};

/// What a backend's storage must be able to tell about itself.
pub trait BackendStorage: Clone + Send + Sync + 'static {
    /// The element type.
    fn dtype(&self) -> DType;
    /// The number of elements allocated.
    fn len(&self) -> usize;
    /// Whether no elements are allocated.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An operand: a storage and the layout through which an op reads it.
#[derive(Debug)]
pub struct View<'a, S> {
    /// The storage.
    pub storage: &'a S,
    /// How the op's logical elements map onto it.
    pub layout: &'a Layout,
}

impl<S> Clone for View<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S> Copy for View<'_, S> {}

impl<'a, S> View<'a, S> {
    /// Pairs a storage with a layout.
    pub fn new(storage: &'a S, layout: &'a Layout) -> Self {
        View { storage, layout }
    }
}

/// Elementwise maps of one operand.
///
/// Bounds ([`bounds::unary`](crate::bounds::unary)): `Neg`, `Abs`, `Relu`
/// are exact; `Sqrt`, `Square` and `Recip` are correctly rounded; in f32
/// `Exp` and `Log` are within 2 ulps, `Tanh` 3 and `Sigmoid` 4
/// ([`bounds::unary_ulps`](crate::bounds::unary_ulps)); in f16/bf16 every
/// transcendental is within 1 ulp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// −x
    Neg,
    /// |x|
    Abs,
    /// eˣ
    Exp,
    /// ln x
    Log,
    /// √x
    Sqrt,
    /// x²
    Square,
    /// 1/x
    Recip,
    /// max(x, 0); NaN propagates, −0 becomes +0.
    Relu,
    /// 1/(1+e⁻ˣ)
    Sigmoid,
    /// tanh x
    Tanh,
    /// GELU in the tanh form GPT-2 uses,
    /// `½x·(1 + tanh(√(2/π)·(x + 0.044715x³)))`, computed as the identical
    /// `x·σ(2√(2/π)·(x + 0.044715x³))`, which has no cancellation for
    /// negative x; GELU(−∞) = −0. Its derivative reads `x`.
    Gelu,
}

/// √(2/π)·2 and 0.044715: GELU's tanh form is `x·σ(GELU_K2·(x + GELU_C·x³))`.
pub const GELU_K2: f64 = 1.595_769_121_605_730_7;
/// The cubic coefficient of GELU's tanh form.
pub const GELU_C: f64 = 0.044_715;

/// `σ(s)` and `s` of GELU at `x`, in f64 (for the oracles and bounds).
pub fn gelu_parts_f64(x: f64) -> (f64, f64) {
    let s = GELU_K2 * x * (1.0 + GELU_C * x * x);
    (1.0 / (1.0 + (-s).exp()), s)
}

impl UnaryOp {
    /// Every unary op.
    pub const ALL: [UnaryOp; 11] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Square,
        UnaryOp::Recip,
        UnaryOp::Relu,
        UnaryOp::Sigmoid,
        UnaryOp::Tanh,
        UnaryOp::Gelu,
    ];

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Square => "square",
            UnaryOp::Recip => "recip",
            UnaryOp::Relu => "relu",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Gelu => "gelu",
        }
    }

    /// Whether [`Backend::unary_backward`] for this op reads only the forward
    /// output `y` (never `x`). The fused GEMM epilogue relies on it.
    pub fn backward_reads_only_output(self) -> bool {
        matches!(
            self,
            UnaryOp::Exp | UnaryOp::Sqrt | UnaryOp::Relu | UnaryOp::Sigmoid | UnaryOp::Tanh
        )
    }

    /// The op applied to one value in f64, the precision oracles use.
    pub fn eval_f64(self, x: f64) -> f64 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Square => x * x,
            UnaryOp::Recip => 1.0 / x,
            // NaN propagates; −0 maps to +0.
            UnaryOp::Relu => {
                if x.is_nan() || x > 0.0 {
                    x
                } else {
                    0.0
                }
            }
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Gelu => {
                if x == f64::NEG_INFINITY {
                    -0.0
                } else {
                    x * gelu_parts_f64(x).0
                }
            }
        }
    }

    /// dy/dx · dy in f64, given the input `x` and the output `y`.
    pub fn backward_f64(self, x: f64, y: f64, dy: f64) -> f64 {
        match self {
            UnaryOp::Neg => -dy,
            UnaryOp::Abs => {
                if x > 0.0 {
                    dy
                } else if x < 0.0 {
                    -dy
                } else {
                    0.0 * dy
                }
            }
            UnaryOp::Exp => dy * y,
            UnaryOp::Log => dy / x,
            UnaryOp::Sqrt => dy * 0.5 / y,
            UnaryOp::Square => dy * 2.0 * x,
            UnaryOp::Recip => -dy * y * y,
            UnaryOp::Relu => {
                if y > 0.0 {
                    dy
                } else {
                    0.0 * dy
                }
            }
            UnaryOp::Sigmoid => dy * y * (1.0 - y),
            UnaryOp::Tanh => dy * (1.0 - y * y),
            UnaryOp::Gelu => {
                let (sig, _) = gelu_parts_f64(x);
                let t = sig * (1.0 - sig);
                let slope = if t == 0.0 {
                    0.0
                } else {
                    x * t * GELU_K2 * (1.0 + 3.0 * GELU_C * x * x)
                };
                dy * (sig + slope)
            }
        }
    }
}

/// Elementwise ops of two operands of the same (already broadcast) shape.
///
/// Arithmetic is correctly rounded; `Maximum`/`Minimum` are exact and return
/// NaN if either operand is NaN; comparisons return 1 or 0 in the operand
/// dtype (false for NaN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// a + b
    Add,
    /// a − b
    Sub,
    /// a · b
    Mul,
    /// a / b
    Div,
    /// max(a, b), NaN-propagating
    Maximum,
    /// min(a, b), NaN-propagating
    Minimum,
    /// a == b → 1, else 0
    Eq,
    /// a > b → 1, else 0
    Gt,
    /// a ≥ b → 1, else 0
    Ge,
}

impl BinaryOp {
    /// Every binary op.
    pub const ALL: [BinaryOp; 9] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Maximum,
        BinaryOp::Minimum,
        BinaryOp::Eq,
        BinaryOp::Gt,
        BinaryOp::Ge,
    ];

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
            BinaryOp::Eq => "eq",
            BinaryOp::Gt => "gt",
            BinaryOp::Ge => "ge",
        }
    }

    /// The op on two values in f64.
    pub fn eval_f64(self, a: f64, b: f64) -> f64 {
        let flag = |c: bool| if c { 1.0 } else { 0.0 };
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Maximum => nan_or(a, b, f64::max),
            BinaryOp::Minimum => nan_or(a, b, f64::min),
            BinaryOp::Eq => flag(a == b),
            BinaryOp::Gt => flag(a > b),
            BinaryOp::Ge => flag(a >= b),
        }
    }
}

fn nan_or(a: f64, b: f64, f: fn(f64, f64) -> f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        f(a, b)
    }
}

/// Reductions over a set of axes.
///
/// `Sum`/`Mean` accumulate in f32 in a fixed order (bound γₙ·Σ|xᵢ|);
/// `Max`/`Min` are exact and NaN-propagating. Reducing an empty axis gives
/// 0 for `Sum`, NaN for `Mean`, −∞/+∞ for `Max`/`Min`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Σ
    Sum,
    /// Σ / n
    Mean,
    /// maximum
    Max,
    /// minimum
    Min,
}

impl ReduceOp {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }
}

/// An activation applied by a fused epilogue (GEMM today, conv later).
/// Each one's derivative is a function of its output alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Activation {
    /// The identity.
    #[default]
    None,
    /// max(x, 0)
    Relu,
    /// 1/(1+e⁻ˣ)
    Sigmoid,
    /// tanh x
    Tanh,
}

impl Activation {
    /// The unary op the activation applies, if any.
    pub fn as_unary(self) -> Option<UnaryOp> {
        match self {
            Activation::None => None,
            Activation::Relu => Some(UnaryOp::Relu),
            Activation::Sigmoid => Some(UnaryOp::Sigmoid),
            Activation::Tanh => Some(UnaryOp::Tanh),
        }
    }
}

/// [`Backend::conv2d_pool`] composed of [`Backend::conv2d`] and
/// [`Backend::max_pool2d`]: the trait's default, for backends (or kernel
/// sets) without a fused version.
#[allow(clippy::too_many_arguments)]
pub fn compose_conv2d_pool<B: Backend>(
    b: &B,
    x: View<'_, B::Storage>,
    weight: View<'_, B::Storage>,
    bias: Option<View<'_, B::Storage>>,
    activation: Activation,
    conv: &Window2d,
    pool: &Window2d,
) -> Result<(B::Storage, B::Storage)> {
    let dims = crate::conv::conv2d_output(
        x.layout.dims(),
        weight.layout.dims(),
        bias.map(|b| b.layout.dims()),
        conv,
    )?;
    let y = b.conv2d(x, weight, bias, activation, conv)?;
    let layout = Layout::contiguous(crate::Shape::new(&dims)?);
    b.max_pool2d(View::new(&y, &layout), pool)
}

/// [`Backend::conv2d_pool_backward`] composed of the unfused backward ops:
/// the trait's default, for backends (or kernel sets) without a fused version.
#[allow(clippy::too_many_arguments)]
pub fn compose_conv2d_pool_backward<B: Backend>(
    b: &B,
    x: View<'_, B::Storage>,
    weight: View<'_, B::Storage>,
    pooled: View<'_, B::Storage>,
    argmax: View<'_, B::Storage>,
    dpooled: View<'_, B::Storage>,
    activation: Activation,
    conv: &Window2d,
    pool: &Window2d,
    need_dx: bool,
) -> Result<ConvGrads<B::Storage>> {
    let dims = crate::conv::conv2d_output(x.layout.dims(), weight.layout.dims(), None, conv)?;
    let routed = match activation.as_unary() {
        // The activation's derivative reads only its output.
        Some(u) => b.unary_backward(u, pooled, pooled, dpooled)?,
        None => b.affine(dpooled, 1.0, 0.0)?,
    };
    let dz = b.max_pool2d_backward(
        View::new(
            &routed,
            &Layout::contiguous(crate::Shape::new(dpooled.layout.dims())?),
        ),
        argmax,
        pool,
        [dims[2], dims[3]],
    )?;
    let dz_layout = Layout::contiguous(crate::Shape::new(&dims)?);
    let dzv = View::new(&dz, &dz_layout);
    let xd = x.layout.dims();
    let dx = if need_dx {
        Some(b.conv2d_backward_data(dzv, weight, conv, [xd[2], xd[3]])?)
    } else {
        None
    };
    let (dw, db) = b.conv2d_backward_filter(x, dzv, conv)?;
    Ok((dx, dw, db))
}

/// The gradients of a convolution: input (when asked for), weight, bias.
pub type ConvGrads<S> = (Option<S>, S, S);

/// The epilogue of a GEMM: `C := act(α·A·B + β·C₀ + bias)`.
///
/// When `beta_c` is `None`, β = 0 and no `C₀` is read (so it may hold NaN).
/// `bias` has `n` elements and is added to every row.
#[derive(Debug)]
pub struct GemmEpilogue<'a, S> {
    /// α, scaling the product.
    pub alpha: f32,
    /// β and `C₀` (`[batch, m, n]`), or `None` for β = 0.
    pub beta_c: Option<(f32, View<'a, S>)>,
    /// A bias of shape `[n]`, or `None`.
    pub bias: Option<View<'a, S>>,
    /// The activation applied last.
    pub activation: Activation,
}

impl<S> Default for GemmEpilogue<'_, S> {
    fn default() -> Self {
        GemmEpilogue {
            alpha: 1.0,
            beta_c: None,
            bias: None,
            activation: Activation::None,
        }
    }
}

/// Optimiser state as every backend stores it — Adam's moments `m` and `v`,
/// SGD's velocity: a value of magnitude below `f32::MIN_POSITIVE` (2⁻¹²⁶,
/// that is, a subnormal) becomes +0; anything else, NaN included, is kept.
/// The step then goes on with the stored value.
///
/// Why: a moment whose gradient stops (a dead unit, a weight reading an
/// input that is always zero) decays geometrically into the subnormal
/// range, and `β·x` of the smallest subnormal rounds back to itself, so the
/// state would stay subnormal for good; on x86 every instruction with a
/// subnormal operand or result then takes a microcode assist of a hundred
/// cycles or more. The seed CNN's epochs slowed from 1.02 s to 1.41 s by
/// the third on a Xeon (benches/RESULTS.md), all of it in the Adam update.
/// TensorFlow's CPU thread pools, which Keras' Adam runs on, flush
/// subnormals to zero for the same reason. The flush moves a parameter by
/// at most `lr_t·2⁻¹²⁶/ε` (Adam) or `lr·2⁻¹²⁶` (SGD) per step, and
/// [`crate::bounds::adam`] and [`crate::bounds::sgd`] allow it.
///
/// ```
/// use kiln_core::flush_state;
/// assert_eq!(flush_state(1e-39), 0.0);
/// assert_eq!(flush_state(-f32::MIN_POSITIVE), -f32::MIN_POSITIVE);
/// assert!(flush_state(f32::NAN).is_nan());
/// ```
#[inline(always)]
pub fn flush_state(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        0.0
    } else {
        x
    }
}

/// Hyper-parameters of one SGD step (PyTorch/Keras semantics):
/// `g ← g + wd·p; v ← μ·v + g; p ← p − lr·(nesterov ? g + μ·v : v)`, the
/// velocity stored flushed ([`flush_state`]) and used as stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    /// Learning rate.
    pub lr: f32,
    /// Momentum μ (0 disables the velocity buffer).
    pub momentum: f32,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// Hyper-parameters of one Adam/AdamW step, Keras formulation:
/// `m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
///  p ← p − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε)`,
/// preceded, for AdamW (`decoupled`), by `p ← p − lr·wd·p`, or, for Adam with
/// weight decay, by `g ← g + wd·p`. The moments are stored flushed
/// ([`flush_state`]) and the parameter's step uses them as stored; the step
/// is evaluated as `lr_t · (m / (√v + ε))` (the order of PyTorch's
/// `addcdiv`), so that a small `m` never makes a subnormal product `lr_t·m`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f32,
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// AdamW (decoupled decay) instead of L2 decay.
    pub decoupled: bool,
    /// The 1-based step number t.
    pub step: u64,
}

/// The per-step constants of an [`AdamStep`] every backend applies the same
/// way: the bias-corrected rate `lr·√(1−β₂ᵗ)/(1−β₁ᵗ)` (computed in f64,
/// rounded once), the decoupled decay factor `lr·wd` (AdamW, else 0) and
/// the L2 coefficient `wd` (Adam, else 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamSchedule {
    /// The bias-corrected learning rate.
    pub lr_t: f32,
    /// `p ← p − decay·p` before the step.
    pub decay: f32,
    /// `g ← g + l2·p` before the moments.
    pub l2: f32,
}

impl AdamStep {
    /// This step's constants; an error for step 0 (steps count from 1).
    pub fn schedule(&self) -> Result<AdamSchedule> {
        if self.step == 0 {
            return Err(crate::Error::invalid(
                "adam_update: the step number starts at 1",
            ));
        }
        let t = self.step.min(i32::MAX as u64) as i32;
        let (b1, b2) = (f64::from(self.beta1), f64::from(self.beta2));
        let lr_t = (f64::from(self.lr) * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t))) as f32;
        Ok(AdamSchedule {
            lr_t,
            decay: if self.decoupled {
                self.lr * self.weight_decay
            } else {
                0.0
            },
            l2: if self.decoupled {
                0.0
            } else {
                self.weight_decay
            },
        })
    }
}

/// A distribution for [`Backend::random`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distribution {
    /// Uniform on `[low, high)`.
    Uniform {
        /// Lower bound (inclusive).
        low: f64,
        /// Upper bound (exclusive).
        high: f64,
    },
    /// Normal with the given mean and standard deviation.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
}

impl Distribution {
    /// Checks the parameters: finite, `low ≤ high`, `std ≥ 0`.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Distribution::Uniform { low, high } => {
                if !(low.is_finite() && high.is_finite() && low <= high) {
                    return Err(crate::Error::invalid(format!(
                        "uniform: need finite low ≤ high, got [{low}, {high})"
                    )));
                }
            }
            Distribution::Normal { mean, std } => {
                if !(mean.is_finite() && std.is_finite() && std >= 0.0) {
                    return Err(crate::Error::invalid(format!(
                        "normal: need finite mean and std ≥ 0, got {mean}, {std}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// How a reduction over `axes` walks its operand: the layout with the kept
/// axes first and the reduced ones last (so it is `rows` runs of `run`
/// elements, row-major), checked once for every backend.
#[derive(Clone, Debug, PartialEq)]
pub struct ReducePlan {
    /// The operand's layout, permuted.
    pub permuted: Layout,
    /// Results: the product of the kept extents.
    pub rows: usize,
    /// Elements folded into each result: the product of the reduced extents.
    pub run: usize,
}

impl ReducePlan {
    /// The plan for reducing `layout` over `axes` (sorted, unique, in range).
    pub fn new(op: ReduceOp, layout: &Layout, axes: &[usize]) -> Result<Self> {
        let rank = layout.rank();
        if axes.windows(2).any(|w| w[0] >= w[1]) || axes.iter().any(|&a| a >= rank) {
            return Err(crate::Error::invalid(format!(
                "{}: axes {axes:?} must be sorted, unique and below the rank {rank}",
                op.name()
            )));
        }
        let perm: Vec<usize> = (0..rank)
            .filter(|a| !axes.contains(a))
            .chain(axes.iter().copied())
            .collect();
        let dims = layout.dims();
        Ok(ReducePlan {
            permuted: layout.permute(&perm)?,
            rows: (0..rank)
                .filter(|a| !axes.contains(a))
                .map(|a| dims[a])
                .product(),
            run: axes.iter().map(|&a| dims[a]).product(),
        })
    }
}

/// A compute device: memory plus the primitive ops kiln is built from.
///
/// Implementations are cheap handles (`Clone` shares the device). Unless an
/// op says otherwise, operands may have any layout, results are contiguous,
/// float ops accept f32, f16 and bf16 (computing in at least f32), and every
/// failure is an [`crate::Error`] — never a panic.
pub trait Backend: Clone + Send + Sync + fmt::Debug + 'static {
    /// Device memory holding elements of one dtype.
    type Storage: BackendStorage;

    /// A short name including the kernel set, e.g. `cpu:scalar`.
    fn name(&self) -> String;

    // ----- memory -------------------------------------------------------

    /// `numel` elements of `dtype`, all equal to `value` (rounded to the dtype).
    fn full(&self, numel: usize, dtype: DType, value: f64) -> Result<Self::Storage>;

    /// Copies host data to the device.
    fn upload(&self, data: &HostData) -> Result<Self::Storage>;

    /// Moves host data to the device. The default copies through
    /// [`Backend::upload`]; a backend whose storage is host memory takes the
    /// buffer without a copy.
    fn upload_owned(&self, data: HostData) -> Result<Self::Storage> {
        self.upload(&data)
    }

    /// Copies the elements of `src` to the host, in row-major order of its layout.
    fn download(&self, src: View<'_, Self::Storage>) -> Result<HostData>;

    /// Copies the elements of `src` into `dst` through `dst_layout` (same
    /// shape, same dtype). Exact.
    fn copy_strided(
        &self,
        src: View<'_, Self::Storage>,
        dst: &mut Self::Storage,
        dst_layout: &Layout,
    ) -> Result<()>;

    /// A new storage holding the elements of `src` row-major in its
    /// layout's shape (same dtype). Exact. The default fills a storage and
    /// copies into it with [`Backend::copy_strided`]; a backend that can
    /// gather in one pass, without the fill, overrides it.
    fn contiguous(&self, src: View<'_, Self::Storage>) -> Result<Self::Storage> {
        let mut dst = self.full(src.layout.numel(), src.storage.dtype(), 0.0)?;
        let layout = Layout::contiguous(src.layout.shape().clone());
        self.copy_strided(src, &mut dst, &layout)?;
        Ok(dst)
    }

    /// Converts to another dtype: exact when widening, round-to-nearest-even
    /// when narrowing; NaN stays NaN. Float to u32 truncates toward zero and
    /// saturates; NaN becomes 0.
    fn cast(&self, src: View<'_, Self::Storage>, dtype: DType) -> Result<Self::Storage>;

    /// Waits until all queued work has finished.
    fn synchronize(&self) -> Result<()>;

    // ----- compute ------------------------------------------------------

    /// Batched GEMM: `a` is `[batch, m, k]`, `b` is `[batch, k, n]` (any
    /// strides, so transposes are free), result `[batch, m, n]` with the
    /// [`GemmEpilogue`] applied. Bound per element: γₖ·Σ|aᵢbᵢ| before the epilogue.
    fn gemm(
        &self,
        a: View<'_, Self::Storage>,
        b: View<'_, Self::Storage>,
        epilogue: &GemmEpilogue<'_, Self::Storage>,
    ) -> Result<Self::Storage>;

    /// `op(x)` elementwise.
    fn unary(&self, op: UnaryOp, x: View<'_, Self::Storage>) -> Result<Self::Storage>;

    /// `dx = op'(x) · dy`, given the forward input `x` and output `y`; all of
    /// one shape. Ops for which [`UnaryOp::backward_reads_only_output`] holds
    /// never read `x`.
    fn unary_backward(
        &self,
        op: UnaryOp,
        x: View<'_, Self::Storage>,
        y: View<'_, Self::Storage>,
        dy: View<'_, Self::Storage>,
    ) -> Result<Self::Storage>;

    /// `x·mul + add` elementwise, computed as one fused multiply-add in f32 and
    /// rounded once.
    fn affine(&self, x: View<'_, Self::Storage>, mul: f32, add: f32) -> Result<Self::Storage>;

    /// `op(a, b)` elementwise; both layouts have the same shape (broadcast
    /// operands arrive with stride-0 layouts) and dtype.
    fn binary(
        &self,
        op: BinaryOp,
        a: View<'_, Self::Storage>,
        b: View<'_, Self::Storage>,
    ) -> Result<Self::Storage>;

    /// Reduces over `axes` (sorted, unique); the result keeps every dimension,
    /// with extent 1 on the reduced ones.
    fn reduce(
        &self,
        op: ReduceOp,
        x: View<'_, Self::Storage>,
        axes: &[usize],
    ) -> Result<Self::Storage>;

    /// Index of the maximum along the last axis (first one on ties; a NaN
    /// counts as the maximum), as u32, shape without the last axis.
    fn argmax(&self, x: View<'_, Self::Storage>) -> Result<Self::Storage>;

    /// Softmax (or log-softmax when `log`) along the last axis, computed with
    /// the row maximum subtracted.
    fn softmax(&self, x: View<'_, Self::Storage>, log: bool) -> Result<Self::Storage>;

    /// Rows of `table` (`[vocab, dim]`) picked by the u32 `ids` (any
    /// shape): the ids' shape plus `[dim]`, in the table's type, equal in
    /// value to the table's entries (kiln's kernels copy the bits; the
    /// default composition may turn −0 into +0, and needs a finite table). An
    /// id ≥ vocab is an error ([`crate::plan::EmbeddingPlan::bad_id`]) —
    /// from this call or, on a device that checks ids where they live, from
    /// the next [`Backend::synchronize`] or [`Backend::download`]. The
    /// default composes primitive ops
    /// ([`crate::embedding::compose_embedding`]; it synchronises to check
    /// the ids).
    fn embedding(
        &self,
        table: View<'_, Self::Storage>,
        ids: View<'_, Self::Storage>,
    ) -> Result<Self::Storage> {
        crate::embedding::compose_embedding(self, table, ids)
    }

    /// The gradient of [`Backend::embedding`] with respect to the table:
    /// `[vocab, dim]` in `dy`'s type, row `v` the sum of the `dy` rows
    /// whose id is `v`, in position order — a deterministic scatter-add (no
    /// result may depend on thread timing). Bound: a sum of that many terms
    /// ([`bounds::dot`](crate::bounds::dot)).
    fn embedding_backward(
        &self,
        ids: View<'_, Self::Storage>,
        dy: View<'_, Self::Storage>,
        vocab: usize,
    ) -> Result<Self::Storage> {
        crate::embedding::compose_embedding_backward(self, ids, dy, vocab)
    }

    /// Softmax over the last axis of `[…, T, S]` scores with a causal
    /// mask: query row `i` sees keys `0..=i + S − T` (`S ≥ T`; `S − T`
    /// earlier keys, as from a cache), the rest get probability 0 and are
    /// not read ([`crate::plan::CausalSoftmaxPlan`]). Bound: the softmax's
    /// over the visible keys ([`bounds::SoftmaxRow`](crate::bounds::SoftmaxRow)),
    /// the masked entries exactly 0. Its gradient is the softmax's (the
    /// masked probabilities are 0). The default composes primitive ops
    /// ([`crate::attention::compose_softmax_causal`]).
    fn softmax_causal(&self, x: View<'_, Self::Storage>) -> Result<Self::Storage> {
        crate::attention::compose_softmax_causal(self, x)
    }

    /// Causal scaled-dot-product attention: for queries `q` `[batch, T, D]`
    /// and keys and values `k`, `v` `[batch, S, D]` (`S ≥ T`; any strides),
    /// `P̃·v` with `P = softmax_causal(scale·q·kᵀ)` and `P̃` its dropout
    /// ([`crate::attention::AttentionDropout`]; `P` itself without), in
    /// `[batch, T, D]` contiguous in the operands' type, computed in f32
    /// ([`crate::plan::AttentionPlan`]). Query `i` sees keys
    /// `0..=i + S − T`. With `options.heads = h > 1` the last axis holds
    /// `h` heads side by side, each its own problem
    /// ([`AttentionOptions::with_heads`](crate::AttentionOptions::with_heads));
    /// a backend whose kernel takes one head per problem can run it
    /// through [`crate::attention::attention_heads_folded`].
    /// Bound: [`bounds::attention`](crate::bounds::attention).
    /// The default composes primitive ops and holds the `[batch, T, S]`
    /// probabilities in memory ([`crate::attention::compose_attention_causal`]);
    /// a fused kernel streams them instead, drawing the dropout factors
    /// where it needs them.
    fn attention_causal(
        &self,
        q: View<'_, Self::Storage>,
        k: View<'_, Self::Storage>,
        v: View<'_, Self::Storage>,
        options: &crate::attention::AttentionOptions,
    ) -> Result<Self::Storage> {
        crate::attention::compose_attention_causal(self, q, k, v, options)
    }

    /// The gradients of [`Backend::attention_causal`] with respect to `q`,
    /// `k` and `v` given `dy` (`q`'s shape), the probabilities recomputed
    /// from `q` and `k` and the dropout factors drawn again (the same
    /// `options` as forward; heads side by side as there, through
    /// [`crate::attention::attention_backward_heads_folded`] for a kernel
    /// of one head per problem). Every sum runs in a fixed order: no result
    /// depends on thread timing. Bound:
    /// [`bounds::attention_backward`](crate::bounds::attention_backward).
    /// The default composes primitive ops
    /// ([`crate::attention::compose_attention_causal_backward`]).
    fn attention_causal_backward(
        &self,
        q: View<'_, Self::Storage>,
        k: View<'_, Self::Storage>,
        v: View<'_, Self::Storage>,
        dy: View<'_, Self::Storage>,
        options: &crate::attention::AttentionOptions,
    ) -> Result<crate::attention::AttentionGrads<Self::Storage>> {
        crate::attention::compose_attention_causal_backward(self, q, k, v, dy, options)
    }

    /// Layer normalisation over the last axis (see [`crate::norm`]):
    /// `y = (x − μ)·rstd·γ + β` per row with `rstd = 1/√(σ² + ε)`, the
    /// statistics in f32 whatever `x`'s type, returned for the backward
    /// pass. `γ`, `β` are `[cols]` of `x`'s type; `eps` finite, positive
    /// ([`crate::plan::LayerNormPlan`]). Bound:
    /// [`bounds::LayerNormRow`](crate::bounds::LayerNormRow). The default
    /// composes primitive ops ([`crate::norm::compose_layer_norm`]).
    fn layer_norm(
        &self,
        x: View<'_, Self::Storage>,
        gamma: View<'_, Self::Storage>,
        beta: View<'_, Self::Storage>,
        eps: f32,
    ) -> Result<crate::norm::LayerNormOut<Self::Storage>> {
        crate::norm::compose_layer_norm(self, x, gamma, beta, eps)
    }

    /// The gradients of [`Backend::layer_norm`] given `dy`, from the
    /// forward pass's `mean` and `rstd` (f32, one per row). `dγ` and `dβ`
    /// sum over rows in a fixed order: no result depends on thread timing.
    /// The default composes primitive ops
    /// ([`crate::norm::compose_layer_norm_backward`]).
    fn layer_norm_backward(
        &self,
        x: View<'_, Self::Storage>,
        gamma: View<'_, Self::Storage>,
        mean: View<'_, Self::Storage>,
        rstd: View<'_, Self::Storage>,
        dy: View<'_, Self::Storage>,
    ) -> Result<crate::norm::LayerNormGrads<Self::Storage>> {
        crate::norm::compose_layer_norm_backward(self, x, gamma, mean, rstd, dy)
    }

    /// Fused softmax cross-entropy: `logits` is `[n, c]`, `labels` is u32
    /// `[n]` with values in `0..c`. Returns the per-row loss
    /// `−log softmax(x)[label]` (`[n]`) and its gradient with respect to the
    /// logits, `softmax(x) − onehot(label)` (`[n, c]`). A label out of range
    /// is an error: from this call, or — on a device that checks labels
    /// where they live instead of copying them to the host — from the next
    /// [`Backend::synchronize`] or [`Backend::download`], which then
    /// returns it instead of data.
    fn softmax_cross_entropy(
        &self,
        logits: View<'_, Self::Storage>,
        labels: View<'_, Self::Storage>,
    ) -> Result<(Self::Storage, Self::Storage)>;

    /// 2-D convolution (cross-correlation, as every framework computes it)
    /// of `x` `[n, c, h, w]` with `weight` `[o, c, kh, kw]` over `window`
    /// (zero padding), plus `bias` `[o]` per output channel, then
    /// `activation`: `[n, o, oh, ow]`. Shapes are checked by
    /// [`crate::conv::conv2d_output`]. Each output is a dot product of
    /// length `c·kh·kw` and carries that bound.
    fn conv2d(
        &self,
        x: View<'_, Self::Storage>,
        weight: View<'_, Self::Storage>,
        bias: Option<View<'_, Self::Storage>>,
        activation: Activation,
        window: &Window2d,
    ) -> Result<Self::Storage>;

    /// The gradient of [`Backend::conv2d`] (before bias and activation) with
    /// respect to its input: `dy` `[n, o, oh, ow]` and `weight`
    /// `[o, c, kh, kw]` give `dx` `[n, c, h, w]` for an input of
    /// `input = [h, w]`.
    fn conv2d_backward_data(
        &self,
        dy: View<'_, Self::Storage>,
        weight: View<'_, Self::Storage>,
        window: &Window2d,
        input: [usize; 2],
    ) -> Result<Self::Storage>;

    /// The gradients of [`Backend::conv2d`] (before bias and activation)
    /// with respect to the weight and the bias: from `x` `[n, c, h, w]` and
    /// `dy` `[n, o, oh, ow]`, `dw` `[o, c, kh, kw]` and `db` `[o]` (the sum
    /// of `dy` over everything but the channel).
    fn conv2d_backward_filter(
        &self,
        x: View<'_, Self::Storage>,
        dy: View<'_, Self::Storage>,
        window: &Window2d,
    ) -> Result<(Self::Storage, Self::Storage)>;

    /// Max-pooling of `x` `[n, c, h, w]` over `window` (padding counts as
    /// −∞): the maxima `[n, c, oh, ow]` and, as u32 of the same shape, where
    /// each came from — its index `i·w + j` in the input plane, the first
    /// maximum in row-major window order, NaN counting as maximal. Exact.
    fn max_pool2d(
        &self,
        x: View<'_, Self::Storage>,
        window: &Window2d,
    ) -> Result<(Self::Storage, Self::Storage)>;

    /// The gradient of [`Backend::max_pool2d`]: each `dy` cell added to the
    /// input cell its `argmax` names, in row-major order of `dy`; `[n, c,
    /// h, w]` for an input of `input = [h, w]`.
    fn max_pool2d_backward(
        &self,
        dy: View<'_, Self::Storage>,
        argmax: View<'_, Self::Storage>,
        window: &Window2d,
        input: [usize; 2],
    ) -> Result<Self::Storage>;

    /// Convolution, activation and max-pooling in one:
    /// `max_pool2d(conv2d(x, weight, bias, activation, conv), pool)` — the
    /// pooled maxima and where each came from (its index in the
    /// convolution's output plane). A backend may fuse them so the
    /// convolution's output never leaves its caches; the default composes
    /// [`Backend::conv2d`] and [`Backend::max_pool2d`]. Either way the result
    /// is bitwise that composition on the same backend.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_pool(
        &self,
        x: View<'_, Self::Storage>,
        weight: View<'_, Self::Storage>,
        bias: Option<View<'_, Self::Storage>>,
        activation: Activation,
        conv: &Window2d,
        pool: &Window2d,
    ) -> Result<(Self::Storage, Self::Storage)> {
        compose_conv2d_pool(self, x, weight, bias, activation, conv, pool)
    }

    /// The gradients of [`Backend::conv2d_pool`] from `dpooled` and the
    /// forward's `pooled` and `argmax`: `dx` (only if `need_dx`), `dw` and
    /// `db`. The activation's derivative is taken at the pooled values —
    /// each routed cell's own output — so the convolution's output is not
    /// needed. The default composes the unfused backward ops.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_pool_backward(
        &self,
        x: View<'_, Self::Storage>,
        weight: View<'_, Self::Storage>,
        pooled: View<'_, Self::Storage>,
        argmax: View<'_, Self::Storage>,
        dpooled: View<'_, Self::Storage>,
        activation: Activation,
        conv: &Window2d,
        pool: &Window2d,
        need_dx: bool,
    ) -> Result<ConvGrads<Self::Storage>> {
        compose_conv2d_pool_backward(
            self, x, weight, pooled, argmax, dpooled, activation, conv, pool, need_dx,
        )
    }

    /// One fused SGD step on contiguous `param`, `grad` and optional
    /// `velocity` (required when momentum ≠ 0), updated in place; the
    /// velocity is stored with subnormals flushed to zero ([`flush_state`];
    /// the conformance suite fails a backend that stores one).
    fn sgd_update(
        &self,
        param: &mut Self::Storage,
        grad: &Self::Storage,
        velocity: Option<&mut Self::Storage>,
        step: &SgdStep,
    ) -> Result<()>;

    /// One fused Adam/AdamW step on contiguous `param`, `grad`, `m` and `v`,
    /// updated in place; the moments are stored with subnormals flushed to
    /// zero ([`flush_state`]; the conformance suite fails a backend that
    /// stores one).
    fn adam_update(
        &self,
        param: &mut Self::Storage,
        grad: &Self::Storage,
        m: &mut Self::Storage,
        v: &mut Self::Storage,
        step: &AdamStep,
    ) -> Result<()>;

    /// `numel` draws from `dist`, element `i` from the Philox4x32-10 stream
    /// of `seed` at counter `offset`, exactly as [`crate::rng`] defines it, so
    /// every backend draws the same numbers for the same seed.
    fn random(
        &self,
        dist: Distribution,
        numel: usize,
        dtype: DType,
        seed: u64,
        offset: u64,
    ) -> Result<Self::Storage>;

    // ----- self-description ---------------------------------------------

    /// What the backend declares about itself: where its kernels switch
    /// algorithm (the conformance suite aims at those sizes), which checks
    /// it does not support and which it expects to fail. The default is
    /// kiln's own kernels' switch points, everything supported.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// The calls so far (by this backend and its clones) that ran on a
    /// slower path than the op's fast kernel — a SIMD set's scalar loops
    /// for a strided or mixed-dtype operand, a host fallback — per op and
    /// reason, counted with a [`SlowPaths`](crate::slow_path::SlowPaths).
    /// `kiln bench` and `kiln train` print them. The default: none.
    fn slow_paths(&self) -> Vec<crate::slow_path::SlowPath> {
        Vec::new()
    }

    // ----- host work ----------------------------------------------------

    /// Offers `work` to the threads this backend runs its ops on, to do
    /// while they wait for the next op, for as long as `work` lives (the
    /// backend holds it weakly, and forgets it once it is dropped or has
    /// panicked). Returns whether the backend took it: the default has no
    /// such threads and returns `false` (a device's host side; a CPU
    /// backend on one thread), and the caller then runs the work on a
    /// thread of its own. See [`crate::idle`].
    fn lend_idle_threads(&self, work: std::sync::Weak<dyn crate::IdleWork>) -> bool {
        let _ = work;
        false
    }
}
