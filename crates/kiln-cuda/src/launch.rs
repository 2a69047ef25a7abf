//! Host-side launch logic: the `#[repr(C)]` argument structs the kernels
//! take (mirrors of the structs in `kernels/*.cuh`), kernel codes, and the
//! launch geometry of every kernel family. Pure functions, tested on the
//! CPU.
//!
//! ```
//! use kiln_core::{Layout, Shape};
//! use kiln_cuda::launch::Strided;
//!
//! // A transposed view, as the kernels' strided argument struct.
//! let l = Layout::contiguous(Shape::new(&[2, 3])?).transpose(0, 1)?;
//! let s = Strided::from_layout("copy", &l)?;
//! assert!(!s.is_contiguous());
//! assert!(Strided::from_layout("copy", &Layout::contiguous(Shape::new(&[6])?))?.is_contiguous());
//! # Ok::<(), kiln_core::Error>(())
//! ```

use cudarc::driver::{DeviceRepr, LaunchConfig};
use kiln_core::{Activation, BinaryOp, DType, Error, Layout, ReduceOp, Result, UnaryOp, Window2d};

/// Threads per block of the elementwise, reduction and softmax kernels.
pub const THREADS: u32 = 256;
/// The most dimensions a [`Strided`] view carries (after merging).
pub const MAX_RANK: usize = 6;
/// The GEMM tile (SIMT and tensor-core kernels alike): 128×128 per block.
pub const TILE: usize = 128;
/// The SIMT GEMM's k step (split-K chunks are multiples of it).
pub const SIMT_BK: usize = 8;

/// A view's element → storage map: `offset + Σ index·stride` (`Strided` in
/// `kernels/common.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strided {
    /// Number of dimensions used.
    pub rank: i32,
    /// Padding (the C struct's alignment).
    pub pad: i32,
    /// Storage index of element 0.
    pub offset: i64,
    /// Extents.
    pub dims: [i64; MAX_RANK],
    /// Strides, in elements.
    pub strides: [i64; MAX_RANK],
}

// SAFETY: a plain #[repr(C)] struct of integers, laid out as the kernels'
// `Strided` (two ints, then 13 i64s).
unsafe impl DeviceRepr for Strided {}

impl Strided {
    /// The layout's map, with size-1 dimensions dropped and dimensions that
    /// are contiguous with the next merged; an error if more than
    /// [`MAX_RANK`] remain.
    pub fn from_layout(op: &str, l: &Layout) -> Result<Self> {
        let mut dims: Vec<(i64, i64)> = Vec::new();
        for (&d, &s) in l.dims().iter().zip(l.strides()) {
            if d == 1 {
                continue;
            }
            let (d, s) = (d as i64, s as i64);
            match dims.last_mut() {
                Some((pd, ps)) if *ps == s * d => {
                    *pd *= d;
                    *ps = s;
                }
                _ => dims.push((d, s)),
            }
        }
        if dims.len() > MAX_RANK {
            return Err(Error::invalid(format!(
                "{op}: a view of {} non-mergeable dimensions; the CUDA backend takes at most {MAX_RANK} (make it contiguous first)",
                dims.len()
            )));
        }
        let mut s = Strided {
            rank: dims.len() as i32,
            pad: 0,
            offset: l.offset() as i64,
            dims: [1; MAX_RANK],
            strides: [0; MAX_RANK],
        };
        for (i, (d, st)) in dims.into_iter().enumerate() {
            s.dims[i] = d;
            s.strides[i] = st;
        }
        Ok(s)
    }

    /// Whether the view is its storage's elements `offset..offset + n` in order.
    pub fn is_contiguous(&self) -> bool {
        self.rank == 0 || (self.rank == 1 && self.strides[0] == 1)
    }
}

/// A strided matrix operand (`MatrixArg` in `kernels/simt_gemm.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixArg {
    /// Device address of the storage.
    pub data: u64,
    /// Element type code ([`dtype_code`]).
    pub dtype: i32,
    /// Padding.
    pub pad: i32,
    /// Storage index of element (0, 0, 0).
    pub offset: i64,
    /// Batch stride.
    pub bs: i64,
    /// Row stride.
    pub rs: i64,
    /// Column stride.
    pub cs: i64,
}

// SAFETY: #[repr(C)], integers only, laid out as the kernels' `MatrixArg`.
unsafe impl DeviceRepr for MatrixArg {}

/// The GEMM epilogue (`EpilogueArg` in `kernels/simt_gemm.cuh`):
/// `out = act(α·acc + β·C₀ + bias[col])` stored as `dtype`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpilogueArg {
    /// Output buffer (contiguous `[batch, m, n]`).
    pub out: u64,
    /// C₀ (contiguous f32 `[batch, m, n]`) or 0.
    pub c0: u64,
    /// Bias (f32 `[n]`) or 0.
    pub bias: u64,
    /// α.
    pub alpha: f32,
    /// β.
    pub beta: f32,
    /// Activation code ([`activation_code`]).
    pub act: i32,
    /// Output type code.
    pub dtype: i32,
    /// Rows.
    pub m: i64,
    /// Columns.
    pub n: i64,
}

// SAFETY: #[repr(C)]: three pointers, two floats, two ints, two i64s, as
// the kernels' `EpilogueArg`.
unsafe impl DeviceRepr for EpilogueArg {}

/// Convolution geometry (`ConvArg` in `kernels/conv.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvArg {
    /// Images, input channels, input height and width.
    pub n: i64,
    /// Input channels.
    pub c: i64,
    /// Input height.
    pub h: i64,
    /// Input width.
    pub w: i64,
    /// Filters.
    pub o: i64,
    /// Kernel height.
    pub kh: i64,
    /// Kernel width.
    pub kw: i64,
    /// Vertical stride.
    pub sh: i64,
    /// Horizontal stride.
    pub sw: i64,
    /// Top padding.
    pub pt: i64,
    /// Left padding.
    pub pl: i64,
    /// Output height.
    pub oh: i64,
    /// Output width.
    pub ow: i64,
}

// SAFETY: #[repr(C)], thirteen i64s, as the kernels' `ConvArg`.
unsafe impl DeviceRepr for ConvArg {}

impl ConvArg {
    /// The geometry of `[n, c, h, w]` inputs, `o` filters, `window`, output `[oh, ow]`.
    pub fn new(input: [usize; 4], o: usize, window: &Window2d, out: [usize; 2]) -> Self {
        let [n, c, h, w] = input.map(|v| v as i64);
        ConvArg {
            n,
            c,
            h,
            w,
            o: o as i64,
            kh: window.kernel[0] as i64,
            kw: window.kernel[1] as i64,
            sh: window.stride[0] as i64,
            sw: window.stride[1] as i64,
            pt: window.padding[0] as i64,
            pl: window.padding[2] as i64,
            oh: out[0] as i64,
            ow: out[1] as i64,
        }
    }
}

/// Pooling geometry (`PoolArg` in `kernels/pool.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolArg {
    /// Planes (images × channels).
    pub planes: i64,
    /// Input height.
    pub h: i64,
    /// Input width.
    pub w: i64,
    /// Window height.
    pub kh: i64,
    /// Window width.
    pub kw: i64,
    /// Vertical stride.
    pub sh: i64,
    /// Horizontal stride.
    pub sw: i64,
    /// Top padding.
    pub pt: i64,
    /// Left padding.
    pub pl: i64,
    /// Output height.
    pub oh: i64,
    /// Output width.
    pub ow: i64,
}

// SAFETY: #[repr(C)], eleven i64s, as the kernels' `PoolArg`.
unsafe impl DeviceRepr for PoolArg {}

impl PoolArg {
    /// Pooling `[n, c, h, w]` planes over `window` into `[oh, ow]`.
    pub fn new(x: [usize; 4], window: &Window2d, out: [usize; 2]) -> Self {
        let [n, c, h, w] = x.map(|v| v as i64);
        PoolArg {
            planes: n * c,
            h,
            w,
            kh: window.kernel[0] as i64,
            kw: window.kernel[1] as i64,
            sh: window.stride[0] as i64,
            sw: window.stride[1] as i64,
            pt: window.padding[0] as i64,
            pl: window.padding[2] as i64,
            oh: out[0] as i64,
            ow: out[1] as i64,
        }
    }
}

/// The kernels' element type code.
pub fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::U32 => 3,
    }
}

/// The kernels' unary op code (`OP_*` in `kernels/common.cuh`).
pub fn unary_code(op: UnaryOp) -> i32 {
    match op {
        UnaryOp::Neg => 0,
        UnaryOp::Abs => 1,
        UnaryOp::Exp => 2,
        UnaryOp::Log => 3,
        UnaryOp::Sqrt => 4,
        UnaryOp::Square => 5,
        UnaryOp::Recip => 6,
        UnaryOp::Relu => 7,
        UnaryOp::Sigmoid => 8,
        UnaryOp::Tanh => 9,
        UnaryOp::Gelu => 10,
    }
}

/// The epilogue activation code (`OP_NONE` for none).
pub fn activation_code(a: Activation) -> i32 {
    a.as_unary().map_or(255, unary_code)
}

/// The kernels' binary op code (`B_*` in `kernels/elementwise.cu`).
pub fn binary_code(op: BinaryOp) -> i32 {
    match op {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        BinaryOp::Div => 3,
        BinaryOp::Maximum => 4,
        BinaryOp::Minimum => 5,
        BinaryOp::Eq => 6,
        BinaryOp::Gt => 7,
        BinaryOp::Ge => 8,
    }
}

/// The kernels' reduction code (`R_*` in `kernels/reduce.cu`).
pub fn reduce_code(op: ReduceOp) -> i32 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Mean => 1,
        ReduceOp::Max => 2,
        ReduceOp::Min => 3,
    }
}

/// A grid-stride launch over `n` elements: 256-thread blocks, enough of
/// them to cover `n` but at most 32 per SM (the loop covers the rest).
/// `None` for `n = 0` (nothing to launch).
pub fn elementwise(n: usize, sms: u32) -> Option<LaunchConfig> {
    if n == 0 {
        return None;
    }
    let blocks = n.div_ceil(THREADS as usize).min(sms.max(1) as usize * 32) as u32;
    Some(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The longest row a reduction folds in one thread
/// (`kiln_reduce_short_rows`) rather than in a block of [`THREADS`].
pub const SHORT_RUN: usize = 32;

/// One 256-thread block per row (grid-stride over rows beyond 65,535).
pub fn per_row(rows: usize) -> Option<LaunchConfig> {
    if rows == 0 {
        return None;
    }
    Some(LaunchConfig {
        grid_dim: (rows.min(65_535) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The 128×128-tile GEMM grid: x over columns, y over rows, z over the
/// batch (or the split-K slices). An error past the grid's limits.
pub fn gemm_tiles(op: &str, m: usize, n: usize, z: usize) -> Result<Option<LaunchConfig>> {
    if m == 0 || n == 0 || z == 0 {
        return Ok(None);
    }
    let (gx, gy) = (n.div_ceil(TILE), m.div_ceil(TILE));
    if gx > i32::MAX as usize || gy > 65_535 || z > 65_535 {
        return Err(Error::invalid(format!(
            "{op}: a {m}×{n} result in {z} slices exceeds the CUDA grid (at most 65,535 tile rows and slices)"
        )));
    }
    Ok(Some(LaunchConfig {
        grid_dim: (gx as u32, gy as u32, z as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }))
}

/// How to split a GEMM's k range over grid z-slices so that a small
/// output (few tiles) still fills the GPU: `(slices, chunk)`, chunks a
/// multiple of [`SIMT_BK`] and at least 512 long, about two blocks per SM.
pub fn split_k(m: usize, n: usize, k: usize, sms: u32) -> (usize, usize) {
    let tiles = m.div_ceil(TILE).max(1) * n.div_ceil(TILE).max(1);
    let want = (2 * sms.max(1) as usize).div_ceil(tiles).max(1);
    let by_length = k.div_ceil(512).max(1);
    let slices = want.min(by_length).min(65_535);
    let chunk = k.div_ceil(slices).div_ceil(SIMT_BK) * SIMT_BK;
    let chunk = chunk.max(SIMT_BK);
    (k.div_ceil(chunk).max(1), chunk)
}

/// Which GEMM kernel runs: the tensor-core kernels need contiguous
/// row-major operands with `k` and `n` multiples of 8 (BF16 and F16,
/// 16-byte cp.async of 8 elements) or 4 (TF32), and a device of compute
/// capability 8.0 or newer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// `kiln_gemm_simt`: any layout and type, f32 FMA.
    Simt,
    /// `kiln_gemm_bf16`: bf16 tensor cores.
    Bf16,
    /// `kiln_gemm_f16`: f16 tensor cores.
    F16,
    /// `kiln_gemm_tf32`: f32 operands rounded to tf32 on tensor cores.
    Tf32,
}

/// The kernel for a `dtype` GEMM of `k`×`n` B on a device of compute
/// capability `cc`, with TF32 allowed or not (f32 GEMMs default to exact
/// f32 SIMT; TF32 is opt-in, since it changes the numerics).
pub fn gemm_kernel(dtype: DType, k: usize, n: usize, cc: (i32, i32), tf32: bool) -> GemmKernel {
    let tensor_cores = cc.0 >= 8;
    match dtype {
        DType::BF16 if tensor_cores && k.is_multiple_of(8) && n.is_multiple_of(8) => {
            GemmKernel::Bf16
        }
        DType::F16 if tensor_cores && k.is_multiple_of(8) && n.is_multiple_of(8) => GemmKernel::F16,
        DType::F32 if tf32 && tensor_cores && k.is_multiple_of(4) && n.is_multiple_of(4) => {
            GemmKernel::Tf32
        }
        _ => GemmKernel::Simt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Shape;

    #[test]
    fn argument_structs_match_the_kernels_layouts() {
        use std::mem::{align_of, size_of};
        assert_eq!(size_of::<Strided>(), 8 + 8 + 2 * 6 * 8);
        assert_eq!(size_of::<MatrixArg>(), 48);
        assert_eq!(size_of::<EpilogueArg>(), 56);
        assert_eq!(std::mem::offset_of!(EpilogueArg, alpha), 24);
        assert_eq!(std::mem::offset_of!(EpilogueArg, m), 40);
        assert_eq!(size_of::<ConvArg>(), 13 * 8);
        assert_eq!(size_of::<PoolArg>(), 11 * 8);
        assert_eq!(align_of::<Strided>(), 8);
    }

    #[test]
    fn views_merge_contiguous_dimensions() {
        let l = Layout::contiguous(Shape::new(&[2, 3, 4, 5, 6, 7, 8]).unwrap());
        let s = Strided::from_layout("t", &l).unwrap();
        assert_eq!((s.rank, s.dims[0], s.strides[0]), (1, 40_320, 1));
        assert!(s.is_contiguous());
        // A transpose keeps two dimensions; size-1 axes vanish.
        let t = Layout::contiguous(Shape::new(&[1, 3, 4]).unwrap())
            .transpose(1, 2)
            .unwrap();
        let s = Strided::from_layout("t", &t).unwrap();
        assert_eq!(s.rank, 2);
        assert_eq!((&s.dims[..2], &s.strides[..2]), (&[4, 3][..], &[1, 4][..]));
        assert!(!s.is_contiguous());
        // A broadcast row has stride 0.
        let b = Layout::contiguous(Shape::new(&[5]).unwrap())
            .broadcast_as(&Shape::new(&[3, 5]).unwrap())
            .unwrap();
        let s = Strided::from_layout("t", &b).unwrap();
        assert_eq!((&s.dims[..2], &s.strides[..2]), (&[3, 5][..], &[0, 1][..]));
        // Eight dimensions that cannot merge are an error naming the op.
        let p = Layout::contiguous(Shape::new(&[2; 8]).unwrap())
            .permute(&[7, 6, 5, 4, 3, 2, 1, 0])
            .unwrap();
        let e = Strided::from_layout("copy", &p).unwrap_err().to_string();
        assert!(e.contains("copy") && e.contains("at most 6"), "{e}");
    }

    #[test]
    fn elementwise_grids_cover_every_element() {
        assert!(elementwise(0, 132).is_none());
        for (n, sms) in [
            (1, 132),
            (255, 132),
            (256, 132),
            (257, 132),
            (10_000_019, 132),
            (7, 0),
        ] {
            let c = elementwise(n, sms).unwrap();
            assert_eq!(c.block_dim, (256, 1, 1));
            let threads = c.grid_dim.0 as usize * 256;
            // Either one thread per element, or the 32-per-SM cap and a loop.
            assert!(
                threads >= n || c.grid_dim.0 == sms.max(1) * 32,
                "{n}: {c:?}"
            );
            assert!(c.grid_dim.0 >= 1);
        }
    }

    #[test]
    fn gemm_grids_tile_the_output() {
        assert!(gemm_tiles("g", 0, 5, 1).unwrap().is_none());
        let c = gemm_tiles("g", 4096, 4096, 1).unwrap().unwrap();
        assert_eq!(c.grid_dim, (32, 32, 1));
        let c = gemm_tiles("g", 129, 1, 7).unwrap().unwrap();
        assert_eq!(c.grid_dim, (1, 2, 7));
        let e = gemm_tiles("gemm", 128 * 70_000, 8, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gemm") && e.contains("exceeds the CUDA grid"),
            "{e}"
        );
    }

    #[test]
    fn split_k_covers_k_exactly_once() {
        // The CNN's filter gradient: 32 × 9 output, k = 128·26·26.
        for (m, n, k, sms) in [
            (32, 9, 86_528, 132),
            (64, 5408, 128, 132),
            (1, 1, 1, 132),
            (32, 9, 7, 1),
        ] {
            let (slices, chunk) = split_k(m, n, k, sms);
            assert!(slices >= 1 && chunk % SIMT_BK == 0 && chunk > 0);
            assert!(slices * chunk >= k, "{k}: {slices}×{chunk}");
            assert!((slices - 1) * chunk < k, "an empty slice for k = {k}");
        }
        let (slices, _) = split_k(32, 9, 86_528, 132);
        assert!(slices >= 100, "{slices} slices cannot fill 132 SMs");
    }

    #[test]
    fn tensor_cores_only_where_they_apply() {
        let h100 = (9, 0);
        assert_eq!(
            gemm_kernel(DType::BF16, 4096, 4096, h100, false),
            GemmKernel::Bf16
        );
        assert_eq!(
            gemm_kernel(DType::BF16, 4095, 4096, h100, false),
            GemmKernel::Simt
        );
        assert_eq!(
            gemm_kernel(DType::BF16, 64, 64, (7, 5), false),
            GemmKernel::Simt
        );
        assert_eq!(
            gemm_kernel(DType::F32, 4096, 4096, h100, false),
            GemmKernel::Simt
        );
        assert_eq!(
            gemm_kernel(DType::F32, 4096, 4096, h100, true),
            GemmKernel::Tf32
        );
        assert_eq!(
            gemm_kernel(DType::F32, 4096, 10, h100, true),
            GemmKernel::Simt
        );
        assert_eq!(
            gemm_kernel(DType::F16, 4096, 4096, h100, false),
            GemmKernel::F16
        );
        assert_eq!(
            gemm_kernel(DType::F16, 4096, 12, h100, false),
            GemmKernel::Simt
        );
    }

    #[test]
    fn codes_match_the_kernels() {
        assert_eq!(dtype_code(DType::BF16), 2);
        assert_eq!(unary_code(UnaryOp::Tanh), 9);
        assert_eq!(activation_code(Activation::None), 255);
        assert_eq!(activation_code(Activation::Relu), 7);
        assert_eq!(binary_code(BinaryOp::Ge), 8);
        assert_eq!(reduce_code(ReduceOp::Min), 3);
    }
}

/// The attention kernels' dropout arguments: the Philox stream, the rate
/// and the kept weights' factor — rate 0 and factor 1 (nothing drawn)
/// without dropout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutArgs {
    /// The stream's seed.
    pub seed: u64,
    /// The stream's starting counter.
    pub offset: u64,
    /// The probability of dropping a weight.
    pub rate: f32,
    /// `1/(1 − rate)`, as [`kiln_core::AttentionDropout::keep_scale`].
    pub keep: f32,
}

impl DropoutArgs {
    /// `plan`'s dropout as kernel arguments.
    pub fn of(plan: &kiln_core::AttentionPlan) -> Self {
        match plan.dropout {
            Some(d) => DropoutArgs {
                seed: d.seed,
                offset: d.offset,
                rate: d.rate,
                keep: d.keep_scale(),
            },
            None => DropoutArgs {
                seed: 0,
                offset: 0,
                rate: 0.0,
                keep: 1.0,
            },
        }
    }
}

/// Where an attention operand's rows lie (`AttentionRows` in
/// `kernels/attention.cu`): row `i` of problem `b = e·heads + h` starts
/// `e·example + h·D + i·row` elements into the operand's data — the
/// layout of [`kiln_core::AttentionPlan::row_start`] for heads side by
/// side in a row, any distance apart.
///
/// ```
/// use kiln_cuda::launch::AttentionRows;
///
/// // One head, [n, 5, 8] contiguous.
/// assert_eq!(AttentionRows::dense(5, 8), AttentionRows { example: 40, row: 8 });
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionRows {
    /// Elements from one example's first row to the next's.
    pub example: i64,
    /// Elements from one row to the next.
    pub row: i64,
}

// SAFETY: #[repr(C)], two i64s, as the kernels' `AttentionRows`.
unsafe impl DeviceRepr for AttentionRows {}

impl AttentionRows {
    /// Contiguous `[n, rows, width]` data: each row `width` wide (all of
    /// an example's heads), the rows and examples adjacent.
    pub fn dense(rows: usize, width: usize) -> Self {
        AttentionRows {
            example: (rows * width) as i64,
            row: width as i64,
        }
    }
}
