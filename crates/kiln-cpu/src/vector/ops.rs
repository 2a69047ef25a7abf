//! The SIMD kernel sets' elementwise, reduction, softmax and optimiser
//! paths. Each entry handles the common case — contiguous operands of one
//! float type — and returns `None` for anything else, which the caller
//! sends to the reference kernel (strided views, mixed types, shape
//! errors).
//!
//! f16 and bf16 operands are widened to f32 with the vector conversions
//! (exact), run through the same f32 loops, and the result is rounded to
//! the operand type once on the way out — what the reference kernels
//! compute, so mixed-precision training runs on the vector paths too.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use kiln_core::{bf16, BinaryOp, DType, HostData, ReduceOp, UnaryOp, View};

use super::wide;
use crate::reference::elementwise::{
    backward_f32, binary_f32, gelu_backward_f32, unary_f32, GELU_C_F32, GELU_K2_F32,
};
use crate::workers::Workers;
use crate::KernelSet;

/// A vector kernel `out[i] = f(x[i])` (the transcendentals).
pub(crate) type MapKernel = unsafe fn(&[f32], &mut [f32]);

/// The elements of a contiguous view as f32: borrowed for f32, widened
/// (exactly) for f16 and bf16; `None` for other views.
/// bf16 is widened over `pool`'s threads where one is given.
fn contiguous<'a>(
    set: KernelSet,
    pool: Option<&Workers>,
    v: View<'a, HostData>,
) -> Option<Cow<'a, [f32]>> {
    let r = v
        .layout
        .contiguous_range()
        .filter(|r| r.end <= v.storage.len())?;
    super::convert::widen(set, pool, v.storage, r)
}

/// f32 results stored as `dtype` (rounded to nearest even for f16/bf16;
/// bf16 over `pool`'s threads where one is given).
fn narrow(set: KernelSet, pool: Option<&Workers>, dtype: DType, v: Vec<f32>) -> Option<HostData> {
    Some(match dtype {
        DType::F32 => HostData::F32(v),
        DType::BF16 => HostData::BF16(match pool {
            Some(pool) => super::convert::to_bf16_on(set, pool, &v),
            None => super::convert::to_bf16(set, &v),
        }),
        DType::F16 => HostData::F16(super::convert::to_f16(&v)?),
        _ => return None,
    })
}

/// The type shared by all `views`, if they share one.
fn common(views: &[View<'_, HostData>]) -> Option<DType> {
    let t = views.first()?.storage.dtype();
    views.iter().all(|v| v.storage.dtype() == t).then_some(t)
}

/// A view that repeats one contiguous block: zero strides on its leading
/// axes, row-major strides on the rest (a bias broadcast over rows). Returns
/// the block, as f32 (see [`contiguous`]).
fn periodic<'a>(set: KernelSet, v: View<'a, HostData>) -> Option<Cow<'a, [f32]>> {
    let (dims, strides) = (v.layout.dims(), v.layout.strides());
    let mut expect = 1;
    let mut split = dims.len();
    while split > 0 && (dims[split - 1] == 1 || strides[split - 1] == expect) {
        expect *= dims[split - 1];
        split -= 1;
    }
    if (0..split).any(|a| strides[a] != 0 && dims[a] != 1) || expect == 0 {
        return None;
    }
    let start = v.layout.offset();
    let end = start.checked_add(expect)?;
    if end > v.storage.len() {
        return None;
    }
    super::convert::widen(set, None, v.storage, start..end)
}

/// An operand broadcast along its trailing axes (stride 0 there, as a
/// `[rows…, 1]` sum widened back to `[rows…, n]` is): one value per run of
/// `n`, the leading axes compact. Returns the values and the run length.
fn per_row<'a>(set: KernelSet, v: View<'a, HostData>) -> Option<(Cow<'a, [f32]>, usize)> {
    let (dims, strides) = (v.layout.dims(), v.layout.strides());
    let mut split = dims.len();
    let mut inner = 1usize;
    while split > 0 && (dims[split - 1] == 1 || strides[split - 1] == 0) {
        inner *= dims[split - 1];
        split -= 1;
    }
    if inner <= 1 {
        return None;
    }
    let mut expect = 1usize;
    for a in (0..split).rev() {
        if dims[a] != 1 && strides[a] != expect {
            return None;
        }
        expect *= dims[a];
    }
    let start = v.layout.offset();
    let end = start.checked_add(expect)?;
    if end > v.storage.len() {
        return None;
    }
    Some((
        super::convert::widen(set, None, v.storage, start..end)?,
        inner,
    ))
}

/// The vector transcendental of `set` for `op`, if it has one.
pub(crate) fn transcendental(set: KernelSet, op: UnaryOp) -> Option<MapKernel> {
    #[cfg(target_arch = "x86_64")]
    {
        use super::{avx2, avx512};
        let k: MapKernel = match (set, op) {
            (KernelSet::Avx512, UnaryOp::Exp) => avx512::exp,
            (KernelSet::Avx512, UnaryOp::Sigmoid) => avx512::sigmoid,
            (KernelSet::Avx512, UnaryOp::Tanh) => avx512::tanh,
            (KernelSet::Avx512, UnaryOp::Log) => avx512::log,
            (KernelSet::Avx2, UnaryOp::Exp) => avx2::exp,
            (KernelSet::Avx2, UnaryOp::Sigmoid) => avx2::sigmoid,
            (KernelSet::Avx2, UnaryOp::Tanh) => avx2::tanh,
            (KernelSet::Avx2, UnaryOp::Log) => avx2::log,
            _ => return None,
        };
        Some(k)
    }
    #[cfg(target_arch = "aarch64")]
    {
        use super::neon;
        let k: MapKernel = match (set, op) {
            (KernelSet::Neon, UnaryOp::Exp) => neon::exp,
            (KernelSet::Neon, UnaryOp::Sigmoid) => neon::sigmoid,
            (KernelSet::Neon, UnaryOp::Tanh) => neon::tanh,
            (KernelSet::Neon, UnaryOp::Log) => neon::log,
            _ => return None,
        };
        Some(k)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (set, op);
        None
    }
}

/// Runs `kernel` over `x` into `out` (of `x`'s length).
fn apply(kernel: MapKernel, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "a vector kernel's input and output");
    // SAFETY: kernels come from `transcendental` for a set that was checked
    // against this processor when its backend was built.
    unsafe { kernel(x, out) };
}

/// [`apply`] into a fresh chunk: the vector kernels write whole vectors of
/// `f32`, so the chunk is zeroed first.
fn apply_fresh(kernel: MapKernel, x: &[f32], out: &mut [MaybeUninit<f32>]) {
    apply(kernel, x, crate::fresh::zeros(out));
}

/// Elements per task when an elementwise op is spread over the workers:
/// tens of microseconds of work against a fork of one or two.
const ELEMENTS_PER_TASK: usize = 1 << 15;

/// `n` outputs, with `f(first, out)` writing elements `first..first +
/// out.len()`: in tasks of about [`ELEMENTS_PER_TASK`] elements, cut at
/// multiples of `align` and balanced over `pool`'s threads
/// ([`Workers::balanced_chunk`]) when that makes more than one. Each
/// element is computed the same way whatever the cut.
///
/// Every caller's `f` writes its whole chunk: a `wide` loop (which checks
/// that its inputs cover the output) or [`apply_fresh`].
fn fill(
    pool: &Workers,
    n: usize,
    align: usize,
    f: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let chunk = pool.balanced_chunk(n, ELEMENTS_PER_TASK, align);
    // SAFETY: `f` writes every element of its chunk (above).
    unsafe { pool.filled(n, chunk, f) }
}

/// Elements a fused bf16 task converts at a time: its operands' f32
/// copies and its f32 result stay in the core's L1/L2 cache.
const BF16_SUB_CHUNK: usize = 1 << 12;

/// An operand's elements as the f32 loops read them: f32 in place (or f16
/// widened whole), or bf16 widened a chunk at a time where a task reads
/// it, into that thread's scratch — a bf16 tensor never gets a full-size
/// f32 copy.
enum Elems<'a> {
    F32(Cow<'a, [f32]>),
    Bf16(&'a [bf16]),
}

impl Elems<'_> {
    /// The elements of a contiguous view; `None` for other views.
    fn of(set: KernelSet, v: View<'_, HostData>) -> Option<Elems<'_>> {
        let r = v
            .layout
            .contiguous_range()
            .filter(|r| r.end <= v.storage.len())?;
        match v.storage {
            HostData::BF16(d) => Some(Elems::Bf16(&d[r])),
            other => Some(Elems::F32(super::convert::widen(set, None, other, r)?)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Elems::F32(d) => d.len(),
            Elems::Bf16(d) => d.len(),
        }
    }

    /// Runs `f` on elements `first..first + len` as f32.
    fn read<R>(&self, set: KernelSet, first: usize, len: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        let r = first..first + len;
        match self {
            Elems::F32(d) => f(&d[r]),
            Elems::Bf16(d) => crate::scratch::sized(r.len(), |s| {
                wide::from_bf16_into(set, &d[r], s);
                f(s)
            }),
        }
    }
}

/// [`fill`] stored as `dtype`. A bf16 result is rounded where it is
/// computed: each task runs `f` on sub-chunks of [`BF16_SUB_CHUNK`]
/// elements (cut at multiples of `align`) into the thread's scratch and
/// rounds them into its part of the output, so neither the f32 result nor
/// a bf16 operand's f32 copy ([`Elems`]) is ever whole in memory. The
/// values are bitwise those of computing in f32 and rounding once.
fn fill_as(
    set: KernelSet,
    pool: &Workers,
    dtype: DType,
    n: usize,
    align: usize,
    f: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Option<HostData> {
    if dtype != DType::BF16 {
        return narrow(set, Some(pool), dtype, fill(pool, n, align, f));
    }
    let align = align.max(1);
    let chunk = pool.balanced_chunk(n, ELEMENTS_PER_TASK, align);
    let sub = BF16_SUB_CHUNK.div_ceil(align) * align;
    let task = |first: usize, out: &mut [MaybeUninit<bf16>]| {
        for (j, part) in out.chunks_mut(sub).enumerate() {
            crate::scratch::sized(part.len(), |tmp| {
                // SAFETY: `f` writes only values (a `wide` loop or
                // `apply_fresh`), so `tmp` stays initialised.
                f(first + j * sub, unsafe { crate::fresh::as_slots(tmp) });
                wide::to_bf16_into(set, tmp, part);
            })
        }
    };
    // SAFETY: `task` writes every element of its chunk: `to_bf16_into`
    // writes a whole part (it asserts the lengths), and the parts cover it.
    Some(HostData::BF16(unsafe { pool.filled(n, chunk, task) }))
}

/// Expands `$body` once per variant of `$op`, with `$k` a constant equal to
/// it, so each loop is compiled for one op with no per-element dispatch.
macro_rules! specialise {
    ($op:expr, $ty:ident [$($v:ident),*], $k:ident => $body:expr) => {
        match $op {
            $($ty::$v => {
                const $k: $ty = $ty::$v;
                $body
            })*
        }
    };
}

/// `op(x)`.
pub(crate) fn unary(
    set: KernelSet,
    pool: &Workers,
    op: UnaryOp,
    x: View<'_, HostData>,
) -> Option<HostData> {
    let xs = Elems::of(set, x)?;
    let n = xs.len();
    let dtype = x.storage.dtype();
    match transcendental(set, op) {
        Some(kernel) => fill_as(set, pool, dtype, n, 1, |i, o| {
            xs.read(set, i, o.len(), |x| apply_fresh(kernel, x, o))
        }),
        None if op == UnaryOp::Gelu => {
            let sigmoid = transcendental(set, UnaryOp::Sigmoid)?;
            fill_as(set, pool, dtype, n, 1, |i, o| {
                xs.read(set, i, o.len(), |x| {
                    crate::scratch::sized(x.len(), |sig| {
                        gelu_sigmoid(set, sigmoid, x, sig);
                        wide::zip(set, x, sig, o, |x, g| if g == 0.0 { -0.0 } else { x * g });
                    })
                })
            })
        }
        None => {
            specialise!(op, UnaryOp[Neg, Abs, Exp, Log, Sqrt, Square, Recip, Relu, Sigmoid, Tanh, Gelu],
            OP => fill_as(set, pool, dtype, n, 1, |i, o| {
                xs.read(set, i, o.len(), |x| wide::map(set, x, o, |v| unary_f32(OP, v)))
            }))
        }
    }
}

/// GELU's `σ(K·x·(1 + C·x²))` for every x into `out`, with the set's
/// vector `sigmoid` (the same f32 operations as the reference's
/// `gelu_parts_f32`).
fn gelu_sigmoid(set: KernelSet, sigmoid: MapKernel, xs: &[f32], out: &mut [f32]) {
    crate::scratch::sized(xs.len(), |s| {
        wide::map(set, xs, s, |x| GELU_K2_F32 * x * (1.0 + GELU_C_F32 * x * x));
        apply(sigmoid, s, out);
    })
}

/// The gradient of `op` at `x` (with `y = op(x)`) times `dy`.
pub(crate) fn unary_backward(
    set: KernelSet,
    pool: &Workers,
    op: UnaryOp,
    x: View<'_, HostData>,
    y: View<'_, HostData>,
    dy: View<'_, HostData>,
) -> Option<HostData> {
    let shape = x.layout.shape();
    if y.layout.shape() != shape || dy.layout.shape() != shape {
        return None;
    }
    let dtype = common(&[x, y, dy])?;
    let (ys, dys) = (Elems::of(set, y)?, Elems::of(set, dy)?);
    let n = dys.len();
    if op == UnaryOp::Gelu {
        let xs = Elems::of(set, x)?;
        let sigmoid = transcendental(set, UnaryOp::Sigmoid)?;
        fill_as(set, pool, dtype, n, 1, |i, o| {
            xs.read(set, i, o.len(), |x| {
                dys.read(set, i, o.len(), |d| {
                    crate::scratch::sized(x.len(), |sig| {
                        gelu_sigmoid(set, sigmoid, x, sig);
                        wide::zip3(set, x, sig, d, o, gelu_backward_f32);
                    })
                })
            })
        })
    } else if op.backward_reads_only_output() {
        specialise!(op, UnaryOp[Neg, Abs, Exp, Log, Sqrt, Square, Recip, Relu, Sigmoid, Tanh, Gelu],
        OP => fill_as(set, pool, dtype, n, 1, |i, o| {
            ys.read(set, i, o.len(), |y| {
                dys.read(set, i, o.len(), |d| {
                    wide::zip(set, y, d, o, |y, d| backward_f32(OP, 0.0, y, d))
                })
            })
        }))
    } else {
        let xs = Elems::of(set, x)?;
        specialise!(op, UnaryOp[Neg, Abs, Exp, Log, Sqrt, Square, Recip, Relu, Sigmoid, Tanh, Gelu],
        OP => fill_as(set, pool, dtype, n, 1, |i, o| {
            xs.read(set, i, o.len(), |x| {
                ys.read(set, i, o.len(), |y| {
                    dys.read(set, i, o.len(), |d| {
                        wide::zip3(set, x, y, d, o, |x, y, d| backward_f32(OP, x, y, d))
                    })
                })
            })
        }))
    }
}

/// `x·mul + add`, fused.
pub(crate) fn affine(
    set: KernelSet,
    pool: &Workers,
    x: View<'_, HostData>,
    mul: f32,
    add: f32,
) -> Option<HostData> {
    let xs = Elems::of(set, x)?;
    fill_as(set, pool, x.storage.dtype(), xs.len(), 1, |i, o| {
        xs.read(set, i, o.len(), |x| {
            wide::map(set, x, o, |v| v.mul_add(mul, add))
        })
    })
}

/// `op(a, b)` for operands of one shape, either contiguous or one of them a
/// block repeated over leading axes (a broadcast row).
pub(crate) fn binary(
    set: KernelSet,
    pool: &Workers,
    op: BinaryOp,
    a: View<'_, HostData>,
    b: View<'_, HostData>,
) -> Option<HostData> {
    if a.layout.shape() != b.layout.shape() {
        return None;
    }
    let dtype = common(&[a, b])?;
    let n = a.layout.numel();
    // `x` against `b` repeated per row (`flip`: the operands' roles swapped).
    let rows = |x: &Elems<'_>, row: &[f32], flip: bool| {
        specialise!(op, BinaryOp[Add, Sub, Mul, Div, Maximum, Minimum, Eq, Gt, Ge],
        OP => fill_as(set, pool, dtype, n, row.len(), |i, o| {
            x.read(set, i, o.len(), |x| {
                if flip {
                    wide::zip_rows(set, x, row, o, |q, p| binary_f32(OP, p, q))
                } else {
                    wide::zip_rows(set, x, row, o, |p, q| binary_f32(OP, p, q))
                }
            })
        }))
    };
    // `x` against one value of `col` per run of `run` elements.
    let cols = |x: &Elems<'_>, col: &[f32], run: usize, flip: bool| {
        specialise!(op, BinaryOp[Add, Sub, Mul, Div, Maximum, Minimum, Eq, Gt, Ge],
        OP => fill_as(set, pool, dtype, n, run, |i, o| {
            let col = &col[i / run.max(1)..];
            x.read(set, i, o.len(), |x| {
                if flip {
                    wide::zip_cols(set, x, col, run, o, |q, p| binary_f32(OP, p, q))
                } else {
                    wide::zip_cols(set, x, col, run, o, |p, q| binary_f32(OP, p, q))
                }
            })
        }))
    };
    match (Elems::of(set, a), Elems::of(set, b)) {
        (Some(x), Some(y)) => {
            specialise!(op, BinaryOp[Add, Sub, Mul, Div, Maximum, Minimum, Eq, Gt, Ge],
            OP => fill_as(set, pool, dtype, n, 1, |i, o| {
                x.read(set, i, o.len(), |x| {
                    y.read(set, i, o.len(), |y| wide::zip(set, x, y, o, |p, q| binary_f32(OP, p, q)))
                })
            }))
        }
        (Some(x), None) => match periodic(set, b) {
            Some(row) => rows(&x, &row, false),
            None => {
                let (col, run) = per_row(set, b)?;
                cols(&x, &col, run, false)
            }
        },
        (None, Some(y)) => match periodic(set, a) {
            Some(row) => rows(&y, &row, true),
            None => {
                let (col, run) = per_row(set, a)?;
                cols(&y, &col, run, true)
            }
        },
        (None, None) => None,
    }
}

/// Sum or mean of a contiguous operand over leading axes `0..p` (summed in
/// row order, bitwise the reference) or trailing axes, every axis among
/// them (each run summed in sixteen interleaved lanes, combined pairwise).
pub(crate) fn reduce(
    set: KernelSet,
    op: ReduceOp,
    x: View<'_, HostData>,
    axes: &[usize],
) -> Option<HostData> {
    if !matches!(op, ReduceOp::Sum | ReduceOp::Mean) || axes.is_empty() {
        return None;
    }
    let xs = contiguous(set, None, x)?;
    let xs = &xs[..];
    let dims = x.layout.dims();
    let rank = dims.len();
    let leading = axes.iter().enumerate().all(|(i, &a)| a == i);
    let trailing = axes
        .iter()
        .enumerate()
        .all(|(i, &a)| a == rank - axes.len() + i);
    let run: usize = axes
        .iter()
        .map(|&a| dims.get(a).copied().unwrap_or(0))
        .product();
    if run == 0 || xs.is_empty() {
        return None;
    }
    // A reduction over every axis is both: it takes the interleaved lanes,
    // not one chain of dependent adds down a single column.
    let mut out = if trailing {
        wide::sum_runs(set, xs, run)
    } else if leading {
        wide::sum_rows(set, xs, xs.len() / run)
    } else {
        return None;
    };
    if op == ReduceOp::Mean {
        let n = run as f32;
        let sums = std::mem::take(&mut out);
        out = vec![0f32; sums.len()];
        wide::map(set, &sums, &mut out, |v| v / n);
    }
    narrow(set, None, x.storage.dtype(), out)
}

/// Softmax (or log-softmax) over the last axis of a contiguous operand,
/// with the set's vector exp.
pub(crate) fn softmax(set: KernelSet, x: View<'_, HostData>, log: bool) -> Option<HostData> {
    let xs = contiguous(set, None, x)?;
    let xs = &xs[..];
    let c = *x.layout.dims().last()?;
    let exp = transcendental(set, UnaryOp::Exp)?;
    if c == 0 {
        return None;
    }
    let mut out = vec![0f32; xs.len()];
    let mut shifted = vec![0f32; c];
    for (row, o) in xs.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        let (max, sum) = row_stats(set, exp, row, &mut shifted, o);
        if log {
            let lse = sum.ln();
            for (o, &v) in o.iter_mut().zip(row) {
                *o = v - max - lse;
            }
        } else {
            wide::scale(set, o, sum);
        }
    }
    narrow(set, None, x.storage.dtype(), out)
}

/// Rows of the causal softmax per task: whole rows, a few thousand floats.
const CAUSAL_ROWS_PER_TASK: usize = 64;

/// The causal-masked softmax of a contiguous operand with the set's
/// vector exp: each row over the keys it sees, zeros after; blocks of rows
/// spread over `pool`, each written by the thread that computes it.
pub(crate) fn softmax_causal(
    set: KernelSet,
    pool: &Workers,
    x: View<'_, HostData>,
) -> Option<HostData> {
    let plan = kiln_core::CausalSoftmaxPlan::new(x).ok()?;
    let xs = contiguous(set, Some(pool), x)?;
    let exp = transcendental(set, UnaryOp::Exp)?;
    // No keys means no queries either (keys ≥ queries): nothing to do.
    let width = plan.keys.max(1);
    let rows = |first: usize, out: &mut [MaybeUninit<f32>]| {
        // A block is zeroed by the thread that fills it: the masked tail of
        // each row stays zero, the rest is overwritten.
        let out = crate::fresh::zeros(out);
        let mut shifted = vec![0f32; width];
        let at = first / width;
        for (r, o) in out.chunks_exact_mut(width).enumerate() {
            let seen = plan.visible(at + r);
            let row = &xs[(at + r) * width..][..seen];
            let o = &mut o[..seen];
            let (_, sum) = row_stats(set, exp, row, &mut shifted[..seen], o);
            wide::scale(set, o, sum);
        }
    };
    let chunk = CAUSAL_ROWS_PER_TASK * width;
    // SAFETY: `rows` writes every element of its block (zeros first).
    let out = unsafe { pool.filled(xs.len(), chunk, rows) };
    narrow(set, Some(pool), plan.dtype, out)
}

/// The row's max and `Σ exp(x − max)`; leaves `exp(x − max)` in `exps`.
pub(crate) fn row_stats(
    set: KernelSet,
    exp: MapKernel,
    row: &[f32],
    shifted: &mut [f32],
    exps: &mut [f32],
) -> (f32, f32) {
    let max = wide::max(set, row);
    for (s, &v) in shifted.iter_mut().zip(row) {
        *s = v - max;
    }
    // SAFETY: `exp` came from `transcendental` for a checked set.
    unsafe { exp(shifted, exps) };
    (max, wide::sum(set, exps))
}

/// One row's softmax cross-entropy: its loss, and `softmax − onehot` into
/// `g` (`shifted` is scratch of the row's length).
fn sce_row(
    set: KernelSet,
    exp: MapKernel,
    row: &[f32],
    label: usize,
    shifted: &mut [f32],
    g: &mut [f32],
) -> f32 {
    let (max, sum) = row_stats(set, exp, row, shifted, g);
    wide::scale(set, g, sum);
    g[label] -= 1.0;
    (max + sum.ln()) - row[label]
}

/// Rows a block of the lane-per-row softmax cross-entropy takes.
const SCE_ROWS: usize = 16;

/// The widest rows the lane-per-row path takes: shorter than `wide::sum`'s
/// sixteen lanes, a row's sum is its elements added in order.
const SCE_MAX_CLASSES: usize = 15;

/// [`sce_row`] for `SCE_ROWS` rows of `c ≤ SCE_MAX_CLASSES` classes at
/// once, a row in each lane: the class scores of a classifier's head (10
/// wide) took 63 ns a row one at a time, most of it calls over 10
/// elements. The same operations in the same order per row — the max as
/// `wide::max` takes it, `exp` of the shifted logits (the same lane-wise
/// polynomial), their sum in order plus the empty lanes' zero as
/// `wide::sum` adds it, the division, `ln` — so the same bits (NaN where
/// that path gives NaN; which NaN comes out of a sum of two is not fixed).
#[inline(always)]
fn sce_rows_loop(
    exp: MapKernel,
    xs: &[f32],
    c: usize,
    labels: &[u32],
    loss: &mut [f32],
    grad: &mut [f32],
) {
    const R: usize = SCE_ROWS;
    let mut cols = [[0f32; R]; SCE_MAX_CLASSES];
    for (r, row) in xs.chunks_exact(c).take(R).enumerate() {
        for (col, &v) in cols.iter_mut().zip(row) {
            col[r] = v;
        }
    }
    let cols = &cols[..c];
    let (mut max, mut nan) = ([f32::NEG_INFINITY; R], [false; R]);
    for col in cols {
        for r in 0..R {
            nan[r] |= col[r].is_nan();
            max[r] = if col[r] > max[r] { col[r] } else { max[r] };
        }
    }
    for (m, &n) in max.iter_mut().zip(&nan) {
        if n {
            *m = f32::NAN;
        }
    }
    let mut exps = [[0f32; R]; SCE_MAX_CLASSES];
    let mut sum = [0f32; R];
    for (col, e) in cols.iter().zip(&mut exps) {
        let mut shifted = [0f32; R];
        for r in 0..R {
            shifted[r] = col[r] - max[r];
        }
        // SAFETY: `exp` came from `transcendental` for a checked set.
        unsafe { exp(&shifted, e) };
        for r in 0..R {
            sum[r] += e[r];
        }
    }
    for (r, (g, l)) in grad.chunks_exact_mut(c).zip(loss).take(R).enumerate() {
        // `wide::sum`: its sixteen lanes' total (none here: 0) plus the tail.
        let s = 0.0 + sum[r];
        let label = labels[r] as usize;
        for (g, e) in g.iter_mut().zip(&exps) {
            *g = e[r] / s;
        }
        g[label] -= 1.0;
        *l = (max[r] + s.ln()) - cols[label][r];
    }
}

wide::per_set! {
    /// [`sce_rows_loop`] compiled for the kernel set.
    fn sce_rows(exp: MapKernel, xs: &[f32], c: usize, labels: &[u32], loss: &mut [f32], grad: &mut [f32]) -> () = sce_rows_loop;
}

/// Fused softmax cross-entropy of contiguous `[n, c]` logits against valid
/// labels (the caller checked shapes and ranges): per-row loss and the
/// gradient `softmax − onehot`. Rows of at most [`SCE_MAX_CLASSES`] go
/// [`SCE_ROWS`] at a time, a row per lane (the MLP's 128 × 10 took 8.1 µs
/// a row at a time on the Emerald Rapids Xeon).
pub(crate) fn softmax_cross_entropy(
    set: KernelSet,
    logits: View<'_, HostData>,
    labels: &[u32],
) -> Option<(HostData, HostData)> {
    let xs = contiguous(set, None, logits)?;
    let xs = &xs[..];
    let c = *logits.layout.dims().last()?;
    let exp = transcendental(set, UnaryOp::Exp)?;
    if c == 0 || labels.len() * c != xs.len() {
        return None;
    }
    let mut loss = vec![0f32; labels.len()];
    let mut grad = vec![0f32; xs.len()];
    let blocked = if c <= SCE_MAX_CLASSES {
        labels.len() / SCE_ROWS * SCE_ROWS
    } else {
        0
    };
    for (((x, g), l), y) in xs[..blocked * c]
        .chunks_exact(SCE_ROWS * c)
        .zip(grad.chunks_exact_mut(SCE_ROWS * c))
        .zip(loss.chunks_exact_mut(SCE_ROWS))
        .zip(labels.chunks_exact(SCE_ROWS))
    {
        sce_rows(set, exp, x, c, y, l, g);
    }
    let mut shifted = vec![0f32; c];
    for ((row, g), (l, &label)) in xs[blocked * c..]
        .chunks_exact(c)
        .zip(grad[blocked * c..].chunks_exact_mut(c))
        .zip(loss[blocked..].iter_mut().zip(&labels[blocked..]))
    {
        *l = sce_row(set, exp, row, label as usize, &mut shifted, g);
    }
    let dtype = logits.storage.dtype();
    Some((
        narrow(set, None, dtype, loss)?,
        narrow(set, None, dtype, grad)?,
    ))
}

/// Casts between f32 and f16/bf16 of contiguous operands, bitwise the
/// scalar conversions (see `super::convert`); bf16 casts are spread over
/// `pool`.
pub(crate) fn cast(
    set: KernelSet,
    pool: &Workers,
    x: View<'_, HostData>,
    dtype: kiln_core::DType,
) -> Option<HostData> {
    use kiln_core::DType;
    let range = x
        .layout
        .contiguous_range()
        .filter(|r| r.end <= x.storage.len())?;
    Some(match (x.storage, dtype) {
        (HostData::F32(d), DType::BF16) => {
            HostData::BF16(super::convert::to_bf16_on(set, pool, &d[range]))
        }
        (HostData::BF16(d), DType::F32) => {
            HostData::F32(super::convert::from_bf16_on(set, pool, &d[range]))
        }
        (HostData::F32(d), DType::F16) => HostData::F16(super::convert::to_f16(&d[range])?),
        (HostData::F16(d), DType::F32) => HostData::F32(super::convert::from_f16(&d[range])?),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Layout, Shape};

    /// Rows of up to [`SCE_MAX_CLASSES`] classes taken a row per lane give
    /// the row-by-row path's bits — ±∞, −0 and far-apart logits included —
    /// and NaN where it gives NaN (a NaN's sign and payload are not fixed
    /// by the language when two NaNs meet in a sum: a row holding a
    /// negative NaN checks that it stays NaN), on every set this processor
    /// runs (NEON under qemu in `ci/neon.sh`); wider rows and the last rows
    /// short of a block take that path.
    #[test]
    fn softmax_cross_entropy_by_lanes_gives_the_row_paths_bits() {
        let sets = [KernelSet::Avx512, KernelSet::Avx2, KernelSet::Neon];
        for set in sets.into_iter().filter(|s| s.available()) {
            let exp = transcendental(set, UnaryOp::Exp).unwrap();
            for c in [1, 2, 9, 10, 15, 16, 17] {
                for n in [16, 37, 128] {
                    let mut x: Vec<f32> = (0..n * c)
                        .map(|i| ((i * 7919) % 211) as f32 / 9.0 - 11.0)
                        .collect();
                    let specials = [
                        f32::NAN,
                        f32::INFINITY,
                        f32::NEG_INFINITY,
                        -0.0,
                        88.0,
                        -90.0,
                    ];
                    for (k, v) in specials.into_iter().enumerate() {
                        x[(3 * k + 1) % n * c + k % c] = v;
                    }
                    // A row of −∞ only, and one of equal logits.
                    x[5 * c..6 * c].fill(f32::NEG_INFINITY);
                    x[9 * c..10 * c].fill(0.25);
                    x[12 * c + c / 2] = -f32::NAN;
                    let labels: Vec<u32> = (0..n).map(|i| ((i * 7) % c) as u32).collect();
                    let storage = HostData::F32(x.clone());
                    let layout = Layout::contiguous(Shape::new(&[n, c]).unwrap());
                    let (loss, grad) =
                        softmax_cross_entropy(set, View::new(&storage, &layout), &labels).unwrap();
                    let (HostData::F32(loss), HostData::F32(grad)) = (loss, grad) else {
                        panic!("f32 in, f32 out");
                    };
                    // Bits, with every NaN one value.
                    let bits = |v: &f32| if v.is_nan() { u32::MAX } else { v.to_bits() };
                    let mut shifted = vec![0f32; c];
                    let mut g = vec![0f32; c];
                    for (i, row) in x.chunks_exact(c).enumerate() {
                        let l = sce_row(set, exp, row, labels[i] as usize, &mut shifted, &mut g);
                        assert_eq!(
                            bits(&loss[i]),
                            bits(&l),
                            "loss, {set:?}, [{n}, {c}], row {i}"
                        );
                        let got: Vec<u32> = grad[i * c..(i + 1) * c].iter().map(bits).collect();
                        let want: Vec<u32> = g.iter().map(bits).collect();
                        assert_eq!(got, want, "gradient, {set:?}, [{n}, {c}], row {i}");
                    }
                }
            }
        }
    }
}
