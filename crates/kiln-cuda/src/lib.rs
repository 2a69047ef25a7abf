//! # kiln-cuda
//!
//! The CUDA backend: [`CudaBackend`] implements [`kiln_core::Backend`] with
//! kiln's own kernels (`kernels/*.cu`, compiled to PTX by `ci/kernels.sh`
//! and embedded here), launched through `cudarc` on one context and stream
//! per device.
//!
//! - **No toolkit needed to build.** cudarc loads `libcuda.so.1` at run
//!   time; this crate builds, and its tests run, on a machine without CUDA.
//!   [`CudaBackend::new`] then returns a clear error.
//! - **Memory** comes from a caching allocator ([`alloc`]): after the first
//!   training step, no step calls `cuMemAlloc`. Uploads and downloads are
//!   stream-ordered; a download waits for the work before it.
//! - **Layouts and types.** Kernels compute on contiguous f32 (reading f16
//!   and bf16 widened, exactly); the strided, converting copy kernel gathers
//!   other views first, and results are rounded once to the operands' type —
//!   the CPU backend's semantics. GEMMs read strided operands of any float
//!   type directly; bf16 and f16 GEMMs use tensor cores (`mma.sync`) on compute
//!   capability 8.0+, and f32 GEMMs use TF32 tensor cores only when
//!   `KILN_CUDA_TF32=1` (TF32 rounds the inputs to 10-bit mantissas, which
//!   the f32 conformance bound does not allow).
//! - **Errors** from the driver become [`kiln_core::Error`]s naming the op.
//!
//! ```
//! use kiln_cuda::CudaBackend;
//!
//! // On a GPU machine this is the backend; without a driver (CI), a clear error.
//! match CudaBackend::new(0) {
//!     Ok(gpu) => println!("{gpu:?}"),
//!     Err(e) => assert!(e.to_string().contains("CUDA"), "{e}"),
//! }
//! # Ok::<(), kiln_core::Error>(())
//! ```

pub mod alloc;
pub mod device;
pub mod driver;
pub mod emulator;
pub mod kernels;
pub mod launch;
pub mod launcher;
pub mod launchers;
#[cfg(feature = "nccl")]
pub mod nccl;
#[cfg(feature = "planted-faults")]
pub mod planted;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::CudaStream;
use kiln_core::slow_path::SlowPaths;
use kiln_core::{
    conv, Activation, AdamStep, Backend, BackendStorage, BinaryOp, DType, Distribution, Error,
    GemmEpilogue, HostData, Layout, ReduceOp, Result, SgdStep, Shape, UnaryOp, View, Window2d,
};

use crate::alloc::{Allocator, Block, RawMemory};
use crate::device::DeviceInfo;
use crate::launch::{
    activation_code, binary_code, dtype_code, elementwise, gemm_kernel, gemm_tiles, per_row,
    reduce_code, split_k, unary_code, AttentionRows, ConvArg, DropoutArgs, EpilogueArg, GemmKernel,
    MatrixArg, PoolArg, Strided, SHORT_RUN,
};
use crate::launcher::Launcher;
use crate::launchers as k;

pub use device::{list as list_devices, DeviceInfo as Gpu};

/// Device memory holding `len` elements of one dtype.
#[derive(Clone)]
pub struct CudaStorage {
    block: Arc<Block<Box<dyn RawMemory>>>,
    dtype: DType,
    len: usize,
}

impl CudaStorage {
    /// The device address of element 0, for handing the buffer to other
    /// libraries on the backend's stream (the benchmarks' cuBLAS yardstick).
    pub fn device_ptr(&self) -> u64 {
        self.block.ptr()
    }

    /// The device address of element `i`.
    fn at(&self, i: usize) -> u64 {
        self.block.ptr() + (i * self.dtype.size_in_bytes()) as u64
    }
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaStorage({} × {}, {:?})",
            self.len, self.dtype, self.block
        )
    }
}

impl BackendStorage for CudaStorage {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
}

struct Inner {
    // First: blocks return to it, and it to the device, before the
    // launcher goes.
    alloc: Arc<Allocator<Box<dyn RawMemory>>>,
    device: Box<dyn Launcher>,
    labels: IndexCheck,
    ids: IndexCheck,
    slow: SlowPaths,
}

/// Softmax-CE checks its labels, and the embedding ops their ids, on the
/// device: the kernel writes 1 + the position of an index out of range into
/// `word`, and the next synchronisation or download reports it — no copy
/// of the indices to the host, no wait. One check per op family, so the
/// report names the right op.
struct IndexCheck {
    word: Block<Box<dyn RawMemory>>,
    /// The bound (classes, or table rows) of an op launched since the last
    /// check (0: none, nothing to read back).
    bound: AtomicU64,
}

impl IndexCheck {
    fn new(alloc: &Arc<Allocator<Box<dyn RawMemory>>>, device: &dyn Launcher) -> Result<Self> {
        let word = alloc.alloc("starting the CUDA backend", 8)?;
        // SAFETY: the block holds at least 8 bytes.
        unsafe { device.upload("starting the CUDA backend", word.ptr(), &[0; 8]) }?;
        Ok(IndexCheck {
            word,
            bound: AtomicU64::new(0),
        })
    }

    /// After a synchronisation: `(position, bound)` of an index out of
    /// range since the last check, if any (the flag is then cleared).
    fn take(&self, device: &dyn Launcher, op: &str) -> Result<Option<(usize, usize)>> {
        let bound = self.bound.swap(0, Ordering::SeqCst);
        if bound == 0 {
            return Ok(None);
        }
        let mut word = [0u8; 8];
        // SAFETY: the block holds 8 bytes.
        unsafe { device.download(op, self.word.ptr(), &mut word) }?;
        let bad = u64::from_le_bytes(word);
        if bad == 0 {
            return Ok(None);
        }
        // SAFETY: as above.
        unsafe { device.upload(op, self.word.ptr(), &[0; 8]) }?;
        Ok(Some(((bad - 1) as usize, bound as usize)))
    }
}

/// A GPU — or the host emulation of one — with kiln's kernels and memory.
/// Clones share them.
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
    tf32: bool,
    #[cfg(feature = "planted-faults")]
    fault: Option<planted::Fault>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({})", self.info())
    }
}

/// A contiguous run of elements on the device, and what keeps it alive.
struct Dense {
    ptr: u64,
    _keep: CudaStorage,
}

impl CudaBackend {
    /// The GPU `ordinal`, through the CUDA driver. Errors: no driver ("no
    /// CUDA driver found (libcuda.so.1)…"), no such device, or a driver
    /// failure.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::on(Box::new(driver::Driver::new(ordinal)?))
    }

    /// The backend on the host emulation of a GPU
    /// ([`emulator::Emulator::build`]: kiln's kernels compiled for the CPU
    /// by g++), for testing every line of this backend without a GPU.
    pub fn emulated() -> Result<Self> {
        Self::on(Box::new(emulator::Emulator::build()?))
    }

    /// The backend on any [`Launcher`]. Errors: the device cannot give the
    /// backend its 8 bytes of bookkeeping memory.
    pub fn on(device: Box<dyn Launcher>) -> Result<Self> {
        kiln_core::slow_path::check_log_env()?;
        let tf32 = match kiln_core::env::setting("KILN_CUDA_TF32")?.as_deref() {
            None | Some("0") => false,
            Some("1") => true,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "KILN_CUDA_TF32={other:?}: expected 1 (f32 GEMMs on TF32 tensor cores) or 0 (exact f32, the default)"
                )))
            }
        };
        let alloc = Allocator::new(device.memory());
        let labels = IndexCheck::new(&alloc, &*device)?;
        let ids = IndexCheck::new(&alloc, &*device)?;
        Ok(CudaBackend {
            inner: Arc::new(Inner {
                alloc,
                device,
                labels,
                ids,
                slow: SlowPaths::new("cuda"),
            }),
            tf32,
            #[cfg(feature = "planted-faults")]
            fault: None,
        })
    }

    /// After a synchronisation: the error of a softmax-CE label or an
    /// embedding id out of range since the last check, if any (the flags
    /// are then cleared).
    fn check_labels(&self) -> Result<()> {
        let device = self.device();
        let labels = self.inner.labels.take(device, "softmax_cross_entropy")?;
        let ids = self.inner.ids.take(device, "embedding")?;
        if let Some((row, classes)) = labels {
            let plan = kiln_core::SoftmaxCePlan {
                rows: 0,
                classes,
                dtype: DType::F32,
            };
            return Err(plan.bad_label(row, None));
        }
        if let Some((position, vocab)) = ids {
            let plan = kiln_core::EmbeddingPlan {
                vocab,
                dim: 0,
                positions: 0,
                dtype: DType::F32,
            };
            return Err(plan.bad_id(position, None));
        }
        Ok(())
    }

    /// The same backend with `fault` planted in its host code.
    #[cfg(feature = "planted-faults")]
    pub fn with_planted_fault(mut self, fault: planted::Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    /// Whether the fault `name` is planted (never, without the feature).
    #[inline(always)]
    fn planted(&self, _name: &str) -> bool {
        #[cfg(feature = "planted-faults")]
        if let Some(f) = self.fault {
            return f.name() == _name;
        }
        false
    }

    /// The same device with f32 GEMMs on TF32 tensor cores (`on`) or exact
    /// f32 SIMT (the default, unless `KILN_CUDA_TF32=1`).
    pub fn with_tf32(mut self, on: bool) -> Self {
        self.tf32 = on;
        self
    }

    /// The device this backend runs on.
    pub fn info(&self) -> &DeviceInfo {
        self.inner.device.info()
    }

    /// The driver's stream every op is queued on; `None` on the host
    /// emulation.
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        self.inner
            .device
            .as_any()
            .downcast_ref::<driver::Driver>()
            .map(driver::Driver::stream)
    }

    /// The caching allocator's counters.
    pub fn memory_stats(&self) -> alloc::Stats {
        self.inner.alloc.stats()
    }

    fn device(&self) -> &dyn Launcher {
        self.inner.device.as_ref()
    }

    fn sms(&self) -> u32 {
        self.info().sms
    }

    fn empty(&self, op: &str, dtype: DType, len: usize) -> Result<CudaStorage> {
        let block = self
            .inner
            .alloc
            .alloc(op, len.saturating_mul(dtype.size_in_bytes()))?;
        Ok(CudaStorage {
            block: Arc::new(block),
            dtype,
            len,
        })
    }

    fn check_view(op: &str, v: View<'_, CudaStorage>) -> Result<()> {
        kiln_core::plan::check_view(op, v)
    }

    /// Copies `src` (any layout) into `dst` (through `dst_view`) converting
    /// types: the one data-movement kernel.
    fn copy(
        &self,
        op: &str,
        src: View<'_, CudaStorage>,
        dst: &CudaStorage,
        dst_view: Strided,
    ) -> Result<()> {
        let n = src.layout.numel();
        let Some(cfg) = elementwise(n, self.sms()) else {
            return Ok(());
        };
        let args = k::Copy {
            src: src.storage.block.ptr(),
            src_dtype: dtype_code(src.storage.dtype),
            view: Strided::from_layout(op, src.layout)?,
            dst: dst.block.ptr(),
            dst_dtype: dtype_code(dst.dtype),
            dst_view,
            n: n as i64,
        };
        // SAFETY: both views were checked against their storages.
        unsafe { args.launch(self.device(), op, &cfg) }
    }

    fn identity(n: usize) -> Strided {
        let mut s = Strided {
            rank: 1,
            pad: 0,
            offset: 0,
            dims: [1; launch::MAX_RANK],
            strides: [0; launch::MAX_RANK],
        };
        s.dims[0] = n as i64;
        s.strides[0] = 1;
        s
    }

    /// `v`'s elements, row-major, as a contiguous `dtype` run: the storage
    /// itself when it already is one, else a converted copy.
    /// A strided operand costs that extra pass over memory, and is counted
    /// as a slow path ([`Backend::slow_paths`]).
    fn dense(&self, op: &'static str, v: View<'_, CudaStorage>, dtype: DType) -> Result<Dense> {
        Self::check_view(op, v)?;
        let range = v.layout.contiguous_range();
        if v.storage.dtype == dtype {
            if let Some(r) = range.clone() {
                return Ok(Dense {
                    ptr: v.storage.at(r.start),
                    _keep: v.storage.clone(),
                });
            }
        }
        let n = v.layout.numel();
        if range.is_none() && n > 0 {
            self.inner
                .slow
                .record(op, "strided operand: compacted by a copy kernel first");
        }
        let out = self.empty(op, dtype, n)?;
        self.copy(op, v, &out, Self::identity(n))?;
        Ok(Dense {
            ptr: out.block.ptr(),
            _keep: out,
        })
    }

    /// `v` (`[n, rows, width]`) as an attention operand: read in place
    /// where it is f32 and each row's elements are adjacent, however far
    /// apart its rows and examples lie (heads side by side in a fused
    /// projection, a cache narrowed to its filled positions); otherwise
    /// compacted to f32 first, as [`CudaBackend::dense`].
    fn attention_rows(
        &self,
        op: &'static str,
        v: View<'_, CudaStorage>,
    ) -> Result<(Dense, AttentionRows)> {
        Self::check_view(op, v)?;
        let in_place = kiln_core::AttentionPlan::rows_in_place(v.layout);
        if let (DType::F32, Some((example, row))) = (v.storage.dtype, in_place) {
            let rows = AttentionRows {
                example: example as i64,
                row: row as i64,
            };
            let data = Dense {
                ptr: v.storage.at(v.layout.offset()),
                _keep: v.storage.clone(),
            };
            return Ok((data, rows));
        }
        let [rows, width] = [1, 2].map(|i| v.layout.dims().get(i).copied().unwrap_or(0));
        Ok((
            self.dense(op, v, DType::F32)?,
            AttentionRows::dense(rows, width),
        ))
    }

    /// Runs `f` with a fresh f32 buffer of `n` elements and returns it as
    /// `dtype` (converted once if `dtype` is not f32).
    fn f32_result(
        &self,
        op: &str,
        dtype: DType,
        n: usize,
        f: impl FnOnce(u64) -> Result<()>,
    ) -> Result<CudaStorage> {
        let out = self.empty(op, DType::F32, n)?;
        f(out.block.ptr())?;
        self.convert(op, out, dtype)
    }

    fn convert(&self, op: &str, s: CudaStorage, dtype: DType) -> Result<CudaStorage> {
        if s.dtype == dtype {
            return Ok(s);
        }
        let layout = Layout::contiguous(Shape::new(&[s.len])?);
        let out = self.empty(op, dtype, s.len)?;
        self.copy(op, View::new(&s, &layout), &out, Self::identity(s.len))?;
        Ok(out)
    }

    fn float_dtype(op: &'static str, d: DType) -> Result<DType> {
        if d.is_float() {
            Ok(d)
        } else {
            Err(Error::Unsupported {
                op,
                dtype: d,
                backend: "cuda".into(),
            })
        }
    }

    fn same_dtype(op: &'static str, a: DType, b: DType) -> Result<DType> {
        if a != b {
            return Err(Error::DType {
                op,
                expected: a,
                got: b,
            });
        }
        Self::float_dtype(op, a)
    }

    /// Reduces contiguous f32 `[rows, run]` rows into `rows` values.
    fn reduce_rows(
        &self,
        op: &str,
        x: u64,
        rows: usize,
        run: usize,
        code: i32,
    ) -> Result<CudaStorage> {
        let out = self.empty(op, DType::F32, rows)?;
        let (y, rows_i, run_i) = (out.block.ptr(), rows as i64, run as i64);
        if run <= SHORT_RUN {
            if let Some(cfg) = elementwise(rows, self.sms()) {
                let args = k::ReduceShortRows {
                    x,
                    y,
                    rows: rows_i,
                    run: run_i,
                    op: code,
                };
                // SAFETY: `x` holds rows·run f32s (the caller's), `out` rows.
                unsafe { args.launch(self.device(), op, &cfg) }?;
            }
        } else if let Some(cfg) = per_row(rows) {
            let args = k::ReduceRows {
                x,
                y,
                rows: rows_i,
                run: run_i,
                op: code,
            };
            // SAFETY: `x` holds rows·run f32s (the caller's), `out` rows.
            unsafe { args.launch(self.device(), op, &cfg) }?;
        }
        Ok(out)
    }

    /// If `v` is one contiguous row repeated over its leading axes (zero
    /// strides there), the layout of that row in the same storage.
    fn repeated_row(v: View<'_, CudaStorage>) -> Result<Option<Layout>> {
        let s = Strided::from_layout("binary", v.layout)?;
        if s.rank != 2 || s.strides[0] != 0 || s.strides[1] != 1 {
            return Ok(None);
        }
        Self::check_view("binary", v)?;
        let row = Layout::new(
            Shape::new(&[s.dims[1] as usize])?,
            vec![1],
            s.offset as usize,
        )?;
        Ok(Some(row))
    }
}

fn dims4(op: &'static str, d: &[usize]) -> Result<[usize; 4]> {
    d.try_into()
        .map_err(|_| Error::shape(op, format!("expected 4 dimensions, got {d:?}")))
}

impl Backend for CudaBackend {
    type Storage = CudaStorage;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.info().ordinal, self.info().name)
    }

    fn slow_paths(&self) -> Vec<kiln_core::slow_path::SlowPath> {
        self.inner.slow.snapshot()
    }

    fn full(&self, numel: usize, dtype: DType, value: f64) -> Result<CudaStorage> {
        let op = "full";
        let out = self.empty(op, dtype, numel)?;
        let Some(cfg) = elementwise(numel, self.sms()) else {
            return Ok(out);
        };
        let (dst, n) = (out.block.ptr(), numel as i64);
        match dtype {
            DType::F32 | DType::U32 => {
                let bits = if dtype == DType::F32 {
                    (value as f32).to_bits()
                } else {
                    value as u32
                };
                let args = k::FillB32 { dst, n, bits };
                // SAFETY: `out` holds `numel` 32-bit elements.
                unsafe { args.launch(self.device(), op, &cfg) }?;
            }
            DType::F16 | DType::BF16 => {
                let bits = if dtype == DType::F16 {
                    kiln_core::f16_from_f64(value).to_bits()
                } else {
                    kiln_core::bf16_from_f64(value).to_bits()
                };
                let args = k::FillB16 { dst, n, bits };
                // SAFETY: `out` holds `numel` 16-bit elements.
                unsafe { args.launch(self.device(), op, &cfg) }?;
            }
        }
        Ok(out)
    }

    fn upload(&self, data: &HostData) -> Result<CudaStorage> {
        let op = "upload";
        let out = self.empty(op, data.dtype(), data.len())?;
        // SAFETY: the block holds at least `as_bytes().len()` bytes.
        unsafe { self.device().upload(op, out.block.ptr(), data.as_bytes()) }?;
        Ok(out)
    }

    fn download(&self, src: View<'_, CudaStorage>) -> Result<HostData> {
        let op = "download";
        let dtype = src.storage.dtype;
        let n = src.layout.numel();
        let dense = self.dense(op, src, dtype)?;
        let mut bytes = vec![0u8; n * dtype.size_in_bytes()];
        // SAFETY: `dense` holds n contiguous elements, `bytes` is that long.
        unsafe { self.device().download(op, dense.ptr, &mut bytes) }?;
        self.check_labels()?;
        HostData::from_bytes(dtype, &bytes)
    }

    fn copy_strided(
        &self,
        src: View<'_, CudaStorage>,
        dst: &mut CudaStorage,
        dst_layout: &Layout,
    ) -> Result<()> {
        let op = "copy_strided";
        if src.layout.dims() != dst_layout.dims() || src.storage.dtype != dst.dtype {
            return Err(Error::shape(
                op,
                format!(
                    "source {} {}, destination {} {}",
                    src.layout.shape(),
                    src.storage.dtype,
                    dst_layout.shape(),
                    dst.dtype
                ),
            ));
        }
        Self::check_view(op, src)?;
        Self::check_view(op, View::new(dst, dst_layout))?;
        let dview = Strided::from_layout(op, dst_layout)?;
        self.copy(op, src, dst, dview)
    }

    fn cast(&self, src: View<'_, CudaStorage>, dtype: DType) -> Result<CudaStorage> {
        let op = "cast";
        Self::check_view(op, src)?;
        let n = src.layout.numel();
        let out = self.empty(op, dtype, n)?;
        self.copy(op, src, &out, Self::identity(n))?;
        Ok(out)
    }

    fn synchronize(&self) -> Result<()> {
        self.device().synchronize()?;
        self.check_labels()
    }

    fn gemm(
        &self,
        a: View<'_, CudaStorage>,
        b: View<'_, CudaStorage>,
        ep: &GemmEpilogue<'_, CudaStorage>,
    ) -> Result<CudaStorage> {
        let op = "gemm";
        let kiln_core::GemmPlan {
            batch,
            m,
            k,
            n,
            dtype,
        } = kiln_core::GemmPlan::new(a, b, ep)?;
        let dtype = Self::float_dtype(op, dtype)?;
        let bias = ep.bias.map(|v| self.dense(op, v, DType::F32)).transpose()?;
        let c0 = ep
            .beta_c
            .map(|(beta, v)| self.dense(op, v, DType::F32).map(|d| (beta, d)))
            .transpose()?;
        let out = self.empty(op, dtype, batch * m * n)?;
        let Some(mut cfg) = gemm_tiles(op, m, n, batch)? else {
            return Ok(out);
        };
        if self.planted("short-gemm-grid") && cfg.grid_dim.1 > 1 {
            cfg.grid_dim.1 -= 1;
        }
        let epa = EpilogueArg {
            out: out.block.ptr(),
            c0: c0.as_ref().map_or(0, |(_, d)| d.ptr),
            bias: bias.as_ref().map_or(0, |d| d.ptr),
            alpha: ep.alpha,
            beta: c0.as_ref().map_or(0.0, |(beta, _)| *beta),
            act: activation_code(ep.activation),
            dtype: dtype_code(dtype),
            m: m as i64,
            n: n as i64,
        };
        let (mi, ni, ki) = (m as i64, n as i64, k as i64);
        let kernel = if k == 0 {
            GemmKernel::Simt
        } else {
            gemm_kernel(dtype, k, n, self.info().compute_capability, self.tf32)
        };
        if kernel != GemmKernel::Simt {
            let (da, db) = (self.dense(op, a, dtype)?, self.dense(op, b, dtype)?);
            // The tensor-core kernels copy 16-byte chunks: operands starting
            // at an unaligned offset go to the SIMT kernel instead.
            if (da.ptr | db.ptr) % 16 == 0 {
                let (a, b, ep) = (da.ptr, db.ptr, epa);
                let (m, n, k) = (mi, ni, ki);
                let dev = self.device();
                // SAFETY: `da` and `db` are contiguous m×k and k×n runs of
                // `dtype`, the epilogue's buffers batch·m·n (checked above).
                unsafe {
                    match kernel {
                        GemmKernel::Bf16 => k::GemmBf16 { a, b, ep, m, n, k }.launch(dev, op, &cfg),
                        GemmKernel::F16 => k::GemmF16 { a, b, ep, m, n, k }.launch(dev, op, &cfg),
                        _ => k::GemmTf32 { a, b, ep, m, n, k }.launch(dev, op, &cfg),
                    }
                }?;
                return Ok(out);
            }
        }
        let matrix = |v: View<'_, CudaStorage>| {
            let s = v.layout.strides();
            MatrixArg {
                data: v.storage.block.ptr(),
                dtype: dtype_code(dtype),
                pad: 0,
                offset: v.layout.offset() as i64,
                bs: s[0] as i64,
                rs: s[1] as i64,
                cs: if self.planted("gemm-column-stride") {
                    s[1] as i64
                } else {
                    s[2] as i64
                },
            }
        };
        let args = k::GemmSimt {
            a: matrix(a),
            b: matrix(b),
            ep: epa,
            m: mi,
            n: ni,
            k: ki,
        };
        // SAFETY: both views were checked against their storages; the
        // epilogue's buffers hold batch·m·n elements.
        unsafe { args.launch(self.device(), op, &cfg) }?;
        Ok(out)
    }

    fn unary(&self, op: UnaryOp, x: View<'_, CudaStorage>) -> Result<CudaStorage> {
        let name = op.name();
        let dtype = Self::float_dtype(name, x.storage.dtype)?;
        let n = x.layout.numel();
        let xs = self.dense(name, x, DType::F32)?;
        self.f32_result(name, dtype, n, |y| {
            let Some(cfg) = elementwise(n, self.sms()) else {
                return Ok(());
            };
            let args = k::Unary {
                x: xs.ptr,
                y,
                n: n as i64,
                op: unary_code(op),
            };
            // SAFETY: `xs` and `y` hold n f32s.
            unsafe { args.launch(self.device(), name, &cfg) }
        })
    }

    fn unary_backward(
        &self,
        op: UnaryOp,
        x: View<'_, CudaStorage>,
        y: View<'_, CudaStorage>,
        dy: View<'_, CudaStorage>,
    ) -> Result<CudaStorage> {
        let name = "unary_backward";
        let shape = x.layout.shape();
        if y.layout.shape() != shape || dy.layout.shape() != shape {
            return Err(Error::shape(
                name,
                format!(
                    "x {}, y {}, dy {}",
                    shape,
                    y.layout.shape(),
                    dy.layout.shape()
                ),
            ));
        }
        let dtype = Self::same_dtype(name, x.storage.dtype, dy.storage.dtype)?;
        let n = x.layout.numel();
        let (xs, ys, ds) = (
            self.dense(name, x, DType::F32)?,
            self.dense(name, y, DType::F32)?,
            self.dense(name, dy, DType::F32)?,
        );
        self.f32_result(name, dtype, n, |dx| {
            let Some(cfg) = elementwise(n, self.sms()) else {
                return Ok(());
            };
            let args = k::UnaryBackward {
                x: xs.ptr,
                y: ys.ptr,
                dy: ds.ptr,
                dx,
                n: n as i64,
                op: unary_code(op),
            };
            // SAFETY: every operand holds n f32s.
            unsafe { args.launch(self.device(), name, &cfg) }
        })
    }

    fn affine(&self, x: View<'_, CudaStorage>, mul: f32, add: f32) -> Result<CudaStorage> {
        let name = "affine";
        let dtype = Self::float_dtype(name, x.storage.dtype)?;
        let n = x.layout.numel();
        let xs = self.dense(name, x, DType::F32)?;
        self.f32_result(name, dtype, n, |y| {
            let Some(cfg) = elementwise(n, self.sms()) else {
                return Ok(());
            };
            let args = k::Affine {
                x: xs.ptr,
                y,
                n: n as i64,
                mul,
                add,
            };
            // SAFETY: `xs` and `y` hold n f32s.
            unsafe { args.launch(self.device(), name, &cfg) }
        })
    }

    fn binary(
        &self,
        op: BinaryOp,
        a: View<'_, CudaStorage>,
        b: View<'_, CudaStorage>,
    ) -> Result<CudaStorage> {
        let name = op.name();
        if a.layout.shape() != b.layout.shape() {
            return Err(Error::shape(
                name,
                format!("operands {} and {}", a.layout.shape(), b.layout.shape()),
            ));
        }
        let dtype = Self::same_dtype(name, a.storage.dtype, b.storage.dtype)?;
        let n = a.layout.numel();
        // One operand a row repeated over the leading axes (a bias): read
        // the row in place instead of materialising the broadcast.
        let row = match (Self::repeated_row(b)?, Self::repeated_row(a)?) {
            (Some(r), _) => Some((a, b.storage, r, 0)),
            (None, Some(r)) => Some((b, a.storage, r, 1)),
            (None, None) => None,
        };
        if let Some((x, storage, row_layout, row_first)) = row {
            let len = row_layout.numel() as i64;
            let xs = self.dense(name, x, DType::F32)?;
            let rs = self.dense(name, View::new(storage, &row_layout), DType::F32)?;
            return self.f32_result(name, dtype, n, |y| {
                let Some(cfg) = elementwise(n, self.sms()) else {
                    return Ok(());
                };
                let args = k::BinaryRow {
                    a: xs.ptr,
                    row: rs.ptr,
                    y,
                    n: n as i64,
                    len,
                    op: binary_code(op),
                    row_first,
                };
                // SAFETY: `xs` and `y` hold n f32s, `rs` len.
                unsafe { args.launch(self.device(), name, &cfg) }
            });
        }
        let (xa, xb) = (
            self.dense(name, a, DType::F32)?,
            self.dense(name, b, DType::F32)?,
        );
        self.f32_result(name, dtype, n, |y| {
            let Some(cfg) = elementwise(n, self.sms()) else {
                return Ok(());
            };
            let (a, b) = if self.planted("swapped-binary-operands") {
                (xb.ptr, xa.ptr)
            } else {
                (xa.ptr, xb.ptr)
            };
            let args = k::Binary {
                a,
                b,
                y,
                n: n as i64,
                op: binary_code(op),
            };
            // SAFETY: every operand holds n f32s.
            unsafe { args.launch(self.device(), name, &cfg) }
        })
    }

    fn reduce(
        &self,
        op: ReduceOp,
        x: View<'_, CudaStorage>,
        axes: &[usize],
    ) -> Result<CudaStorage> {
        let name = op.name();
        let dtype = Self::float_dtype(name, x.storage.dtype)?;
        let kiln_core::ReducePlan {
            permuted,
            rows,
            run,
        } = kiln_core::ReducePlan::new(op, x.layout, axes)?;
        let xs = self.dense(name, View::new(x.storage, &permuted), DType::F32)?;
        let out = self.reduce_rows(name, xs.ptr, rows, run, reduce_code(op))?;
        self.convert(name, out, dtype)
    }

    fn argmax(&self, x: View<'_, CudaStorage>) -> Result<CudaStorage> {
        let name = "argmax";
        let dims = x.layout.dims();
        let Some(&c) = dims.last() else {
            return Err(Error::shape(name, "a scalar has no last axis"));
        };
        if c == 0 || c > u32::MAX as usize {
            return Err(Error::shape(
                name,
                format!("last axis has extent {c}; need 1..=2³²−1"),
            ));
        }
        Self::float_dtype(name, x.storage.dtype)?;
        let rows = x.layout.numel() / c;
        let xs = self.dense(name, x, DType::F32)?;
        let out = self.empty(name, DType::U32, rows)?;
        if let Some(cfg) = per_row(rows) {
            let args = k::ArgmaxRows {
                x: xs.ptr,
                y: out.block.ptr(),
                rows: rows as i64,
                run: c as i64,
            };
            // SAFETY: `xs` holds rows·c f32s, `out` rows u32s.
            unsafe { args.launch(self.device(), name, &cfg) }?;
        }
        Ok(out)
    }

    fn softmax(&self, x: View<'_, CudaStorage>, log: bool) -> Result<CudaStorage> {
        let name = if log { "log_softmax" } else { "softmax" };
        let dtype = Self::float_dtype(name, x.storage.dtype)?;
        let Some(&c) = x.layout.dims().last() else {
            return Err(Error::shape(name, "a scalar has no last axis"));
        };
        let n = x.layout.numel();
        let rows = n.checked_div(c).unwrap_or(0);
        let xs = self.dense(name, x, DType::F32)?;
        self.f32_result(name, dtype, n, |y| {
            let Some(cfg) = per_row(rows) else {
                return Ok(());
            };
            let args = k::SoftmaxRows {
                x: xs.ptr,
                y,
                rows: rows as i64,
                c: c as i64,
                log: i32::from(log),
            };
            // SAFETY: `xs` and `y` hold rows·c f32s.
            unsafe { args.launch(self.device(), name, &cfg) }
        })
    }

    fn embedding(
        &self,
        table: View<'_, CudaStorage>,
        ids: View<'_, CudaStorage>,
    ) -> Result<CudaStorage> {
        let name = "embedding";
        let plan = kiln_core::EmbeddingPlan::new(table, ids)?;
        let (n, d, v) = (plan.positions, plan.dim, plan.vocab);
        let ts = self.dense(name, table, DType::F32)?;
        let is = self.dense(name, ids, DType::U32)?;
        let out = self.f32_result(name, plan.dtype, n * d, |out| {
            // Width-0 rows still have their ids checked, a thread each.
            let Some(cfg) = elementwise(n * d.max(1), self.sms()) else {
                return Ok(());
            };
            let args = k::Embedding {
                table: ts.ptr,
                ids: is.ptr,
                out,
                positions: n as i64,
                dim: d as i64,
                vocab: v as i64,
                bad: self.inner.ids.word.ptr(),
            };
            // SAFETY: the table holds vocab·dim f32s, ids n u32s, out n·dim
            // f32s, the id word 8 bytes; ids ≥ vocab are not read through.
            unsafe { args.launch(self.device(), name, &cfg) }?;
            self.inner
                .ids
                .bound
                .store(v.max(1) as u64, Ordering::SeqCst);
            Ok(())
        })?;
        Ok(out)
    }

    fn embedding_backward(
        &self,
        ids: View<'_, CudaStorage>,
        dy: View<'_, CudaStorage>,
        vocab: usize,
    ) -> Result<CudaStorage> {
        let name = "embedding_backward";
        let plan = kiln_core::EmbeddingPlan::backward(ids, dy, vocab)?;
        let (n, d) = (plan.positions, plan.dim);
        let is = self.dense(name, ids, DType::U32)?;
        let ds = self.dense(name, dy, DType::F32)?;
        let dtable = self.full(vocab * d, DType::F32, 0.0)?;
        if let Some(cfg) = elementwise(d.max(1), self.sms()).filter(|_| n > 0) {
            let args = k::EmbeddingBackward {
                ids: is.ptr,
                dy: ds.ptr,
                dtable: dtable.block.ptr(),
                positions: n as i64,
                dim: d as i64,
                vocab: vocab as i64,
                bad: self.inner.ids.word.ptr(),
            };
            // SAFETY: ids hold n u32s, dy n·dim f32s, dtable vocab·dim f32s,
            // the id word 8 bytes; ids ≥ vocab are skipped.
            unsafe { args.launch(self.device(), name, &cfg) }?;
            self.inner
                .ids
                .bound
                .store(vocab.max(1) as u64, Ordering::SeqCst);
        }
        self.convert(name, dtable, plan.dtype)
    }

    fn layer_norm(
        &self,
        x: View<'_, CudaStorage>,
        gamma: View<'_, CudaStorage>,
        beta: View<'_, CudaStorage>,
        eps: f32,
    ) -> Result<kiln_core::LayerNormOut<CudaStorage>> {
        let name = "layer_norm";
        let plan = kiln_core::LayerNormPlan::new(x, gamma, beta, eps)?;
        let (rows, c) = (plan.rows, plan.cols);
        let xs = self.dense(name, x, DType::F32)?;
        let gs = self.dense(name, gamma, DType::F32)?;
        let bs = self.dense(name, beta, DType::F32)?;
        let mean = self.empty(name, DType::F32, rows)?;
        let rstd = self.empty(name, DType::F32, rows)?;
        let y = self.f32_result(name, plan.dtype, rows * c, |y| {
            let Some(cfg) = per_row(rows) else {
                return Ok(());
            };
            let args = k::LayerNorm {
                x: xs.ptr,
                gamma: gs.ptr,
                beta: bs.ptr,
                y,
                mean: mean.block.ptr(),
                rstd: rstd.block.ptr(),
                rows: rows as i64,
                c: c as i64,
                eps,
            };
            // SAFETY: x and y hold rows·c f32s, γ and β c, mean and rstd rows.
            unsafe { args.launch(self.device(), name, &cfg) }
        })?;
        Ok(kiln_core::LayerNormOut { y, mean, rstd })
    }

    fn layer_norm_backward(
        &self,
        x: View<'_, CudaStorage>,
        gamma: View<'_, CudaStorage>,
        mean: View<'_, CudaStorage>,
        rstd: View<'_, CudaStorage>,
        dy: View<'_, CudaStorage>,
    ) -> Result<kiln_core::LayerNormGrads<CudaStorage>> {
        let name = "layer_norm_backward";
        let plan = kiln_core::LayerNormPlan::backward(x, gamma, mean, rstd, dy)?;
        let (rows, c) = (plan.rows, plan.cols);
        let xs = self.dense(name, x, DType::F32)?;
        let gs = self.dense(name, gamma, DType::F32)?;
        let ms = self.dense(name, mean, DType::F32)?;
        let rs = self.dense(name, rstd, DType::F32)?;
        let ds = self.dense(name, dy, DType::F32)?;
        let dx = self.f32_result(name, plan.dtype, rows * c, |dx| {
            let Some(cfg) = per_row(rows) else {
                return Ok(());
            };
            let args = k::LayerNormBackwardDx {
                x: xs.ptr,
                gamma: gs.ptr,
                dy: ds.ptr,
                mean: ms.ptr,
                rstd: rs.ptr,
                dx,
                rows: rows as i64,
                c: c as i64,
            };
            // SAFETY: x, dy and dx hold rows·c f32s, γ c, mean and rstd rows.
            unsafe { args.launch(self.device(), name, &cfg) }
        })?;
        let dbeta = self.empty(name, DType::F32, c)?;
        let dgamma = self.f32_result(name, DType::F32, c, |dgamma| {
            let Some(cfg) = elementwise(c, self.sms()) else {
                return Ok(());
            };
            let args = k::LayerNormBackwardParams {
                x: xs.ptr,
                dy: ds.ptr,
                mean: ms.ptr,
                rstd: rs.ptr,
                dgamma,
                dbeta: dbeta.block.ptr(),
                rows: rows as i64,
                c: c as i64,
            };
            // SAFETY: x and dy hold rows·c f32s, mean and rstd rows, dγ and dβ c.
            unsafe { args.launch(self.device(), name, &cfg) }
        })?;
        Ok(kiln_core::LayerNormGrads {
            dx,
            dgamma: self.convert(name, dgamma, plan.dtype)?,
            dbeta: self.convert(name, dbeta, plan.dtype)?,
        })
    }

    fn softmax_causal(&self, x: View<'_, CudaStorage>) -> Result<CudaStorage> {
        let name = "softmax_causal";
        let plan = kiln_core::CausalSoftmaxPlan::new(x)?;
        let rows = plan.batch * plan.queries;
        let xs = self.dense(name, x, DType::F32)?;
        self.f32_result(name, plan.dtype, rows * plan.keys, |y| {
            let Some(cfg) = per_row(rows) else {
                return Ok(());
            };
            let args = k::SoftmaxCausal {
                x: xs.ptr,
                y,
                rows: rows as i64,
                queries: plan.queries as i64,
                keys: plan.keys as i64,
            };
            // SAFETY: `xs` and `y` hold rows·keys f32s.
            unsafe { args.launch(self.device(), name, &cfg) }
        })
    }

    fn attention_causal(
        &self,
        q: View<'_, CudaStorage>,
        k: View<'_, CudaStorage>,
        v: View<'_, CudaStorage>,
        options: &kiln_core::AttentionOptions,
    ) -> Result<CudaStorage> {
        let name = "attention_causal";
        let plan = kiln_core::AttentionPlan::new(q, k, v, options)?;
        let drop = DropoutArgs::of(&plan);
        let (rows, keys, d) = (plan.batch * plan.queries, plan.keys, plan.dim);
        let (q, qa) = self.attention_rows(name, q)?;
        let (k, ka) = self.attention_rows(name, k)?;
        let (v, va) = self.attention_rows(name, v)?;
        self.f32_result(name, plan.dtype, rows * d, |y| {
            let Some(cfg) = per_row(rows).filter(|_| d > 0) else {
                return Ok(());
            };
            let work = self.empty(name, DType::F32, cfg.grid_dim.0 as usize * keys)?;
            let args = k::AttentionCausal {
                q: q.ptr,
                qa,
                k: k.ptr,
                ka,
                v: v.ptr,
                va,
                y,
                work: work.block.ptr(),
                batch: plan.batch as i64,
                heads: plan.heads as i64,
                queries: plan.queries as i64,
                keys: keys as i64,
                d: d as i64,
                scale: plan.scale,
                seed: drop.seed,
                offset: drop.offset,
                rate: drop.rate,
                keep: drop.keep,
            };
            // SAFETY: the plan checked that q, k and v hold the rows their
            // AttentionRows address (batch problems of queries or keys
            // rows, d wide, in views inside their storage); y holds
            // rows·d f32s and work keys per block of the grid.
            unsafe { args.launch(self.device(), name, &cfg) }
        })
    }

    fn attention_causal_backward(
        &self,
        q: View<'_, CudaStorage>,
        k: View<'_, CudaStorage>,
        v: View<'_, CudaStorage>,
        dy: View<'_, CudaStorage>,
        options: &kiln_core::AttentionOptions,
    ) -> Result<kiln_core::AttentionGrads<CudaStorage>> {
        let name = "attention_causal_backward";
        let plan = kiln_core::AttentionPlan::backward(q, k, v, dy, options)?;
        let mut drop = DropoutArgs::of(&plan);
        if self.planted("attention-backward-without-dropout") {
            drop = DropoutArgs::of(&kiln_core::AttentionPlan {
                dropout: None,
                ..plan
            });
        }
        let scale = plan.scale;
        let (rows, keys, d) = (plan.batch * plan.queries, plan.keys, plan.dim);
        let key_rows = plan.batch * keys;
        let (q, qa) = self.attention_rows(name, q)?;
        let (k, ka) = self.attention_rows(name, k)?;
        let (v, va) = self.attention_rows(name, v)?;
        let (g, dya) = self.attention_rows(name, dy)?;
        let (batch, heads, queries) = (plan.batch as i64, plan.heads as i64, plan.queries as i64);
        let stats = self.empty(name, DType::F32, 3 * rows)?;
        let dq = self.f32_result(name, DType::F32, rows * d, |dq| {
            let Some(cfg) = per_row(rows).filter(|_| d > 0) else {
                return Ok(());
            };
            let work = self.empty(name, DType::F32, cfg.grid_dim.0 as usize * 2 * keys)?;
            let args = k::AttentionCausalBackwardQ {
                q: q.ptr,
                qa,
                k: k.ptr,
                ka,
                v: v.ptr,
                va,
                dy: g.ptr,
                dya,
                dq,
                stats: stats.block.ptr(),
                work: work.block.ptr(),
                batch,
                heads,
                queries,
                keys: keys as i64,
                d: d as i64,
                scale,
                seed: drop.seed,
                offset: drop.offset,
                rate: drop.rate,
                keep: drop.keep,
            };
            // SAFETY: the plan checked that q, k, v and dy hold the rows
            // their AttentionRows address (views inside their storage); dq
            // holds rows·d f32s, stats 3·rows, work 2·keys per block of
            // the grid.
            unsafe { args.launch(self.device(), name, &cfg) }
        })?;
        let dv = self.empty(name, DType::F32, key_rows * d)?;
        let dk = self.f32_result(name, DType::F32, key_rows * d, |dk| {
            let Some(cfg) = per_row(key_rows).filter(|_| d > 0) else {
                return Ok(());
            };
            let args = k::AttentionCausalBackwardKv {
                q: q.ptr,
                qa,
                k: k.ptr,
                ka,
                v: v.ptr,
                va,
                dy: g.ptr,
                dya,
                stats: stats.block.ptr(),
                dk,
                dv: dv.block.ptr(),
                batch,
                heads,
                queries,
                keys: keys as i64,
                d: d as i64,
                scale,
                seed: drop.seed,
                offset: drop.offset,
                rate: drop.rate,
                keep: drop.keep,
            };
            // SAFETY: as for the query kernel; dk and dv hold
            // batch·keys·d f32s, stats 3·rows (written by the query kernel
            // on the same stream).
            unsafe { args.launch(self.device(), name, &cfg) }
        })?;
        Ok(kiln_core::AttentionGrads {
            dq: self.convert(name, dq, plan.dtype)?,
            dk: self.convert(name, dk, plan.dtype)?,
            dv: self.convert(name, dv, plan.dtype)?,
        })
    }

    fn softmax_cross_entropy(
        &self,
        logits: View<'_, CudaStorage>,
        labels: View<'_, CudaStorage>,
    ) -> Result<(CudaStorage, CudaStorage)> {
        let name = "softmax_cross_entropy";
        let plan = kiln_core::SoftmaxCePlan::new(logits, labels)?;
        let dtype = Self::float_dtype(name, plan.dtype)?;
        let (rows, c) = (plan.rows, plan.classes);
        let xs = self.dense(name, logits, DType::F32)?;
        let ys = self.dense(name, labels, DType::U32)?;
        let loss = self.empty(name, DType::F32, rows)?;
        let grad = self.empty(name, DType::F32, rows * c)?;
        if let Some(cfg) = per_row(rows).filter(|_| c > 0) {
            let args = k::SoftmaxXent {
                logits: xs.ptr,
                labels: ys.ptr,
                loss: loss.block.ptr(),
                grad: grad.block.ptr(),
                rows: rows as i64,
                c: c as i64,
                bad: self.inner.labels.word.ptr(),
            };
            // SAFETY: logits and grad hold rows·c f32s, labels and loss
            // rows, the label word 8 bytes.
            unsafe { args.launch(self.device(), name, &cfg) }?;
            self.inner.labels.bound.store(c as u64, Ordering::SeqCst);
        }
        Ok((
            self.convert(name, loss, dtype)?,
            self.convert(name, grad, dtype)?,
        ))
    }

    fn conv2d(
        &self,
        x: View<'_, CudaStorage>,
        weight: View<'_, CudaStorage>,
        bias: Option<View<'_, CudaStorage>>,
        activation: Activation,
        window: &Window2d,
    ) -> Result<CudaStorage> {
        let name = "conv2d";
        let [n, o, oh, ow] = conv::conv2d_output(
            x.layout.dims(),
            weight.layout.dims(),
            bias.map(|b| b.layout.dims()),
            window,
        )?;
        let dtype = Self::same_dtype(name, x.storage.dtype, weight.storage.dtype)?;
        let xd = dims4(name, x.layout.dims())?;
        let (xs, ws) = (
            self.dense(name, x, DType::F32)?,
            self.dense(name, weight, DType::F32)?,
        );
        let bs = bias.map(|b| self.dense(name, b, DType::F32)).transpose()?;
        let out = self.empty(name, dtype, n * o * oh * ow)?;
        let p = ConvArg::new(xd, o, window, [oh, ow]);
        if let Some(cfg) = gemm_tiles(name, o, n * oh * ow, 1)? {
            let args = k::Conv2d {
                x: xs.ptr,
                w: ws.ptr,
                bias: bs.as_ref().map_or(0, |b| b.ptr),
                act: activation_code(activation),
                out: out.block.ptr(),
                dtype: dtype_code(dtype),
                p,
            };
            // SAFETY: the buffers hold the sizes `conv2d_output` checked.
            unsafe { args.launch(self.device(), name, &cfg) }?;
        }
        Ok(out)
    }

    fn conv2d_backward_data(
        &self,
        dy: View<'_, CudaStorage>,
        weight: View<'_, CudaStorage>,
        window: &Window2d,
        input: [usize; 2],
    ) -> Result<CudaStorage> {
        let name = "conv2d_backward_data";
        let [n, c, h, w] = conv::conv2d_backward_data_shape(
            dy.layout.dims(),
            weight.layout.dims(),
            window,
            input,
        )?;
        let dtype = Self::same_dtype(name, dy.storage.dtype, weight.storage.dtype)?;
        let dyd = dims4(name, dy.layout.dims())?;
        let (ds, ws) = (
            self.dense(name, dy, DType::F32)?,
            self.dense(name, weight, DType::F32)?,
        );
        let out = self.empty(name, dtype, n * c * h * w)?;
        let p = ConvArg::new([n, c, h, w], dyd[1], window, [dyd[2], dyd[3]]);
        if let Some(cfg) = elementwise(n * c * h * w, self.sms()) {
            let args = k::Conv2dBackwardData {
                dy: ds.ptr,
                w: ws.ptr,
                dx: out.block.ptr(),
                dtype: dtype_code(dtype),
                p,
            };
            // SAFETY: the buffers hold the sizes the shape check derived.
            unsafe { args.launch(self.device(), name, &cfg) }?;
        }
        Ok(out)
    }

    fn conv2d_backward_filter(
        &self,
        x: View<'_, CudaStorage>,
        dy: View<'_, CudaStorage>,
        window: &Window2d,
    ) -> Result<(CudaStorage, CudaStorage)> {
        let name = "conv2d_backward_filter";
        // The shape check returns the convolution's output [n, o, oh, ow].
        let [_, o, _, _] =
            conv::conv2d_backward_filter_shape(x.layout.dims(), dy.layout.dims(), window)?;
        let (c, [kh, kw]) = (x.layout.dims()[1], window.kernel);
        let dtype = Self::same_dtype(name, x.storage.dtype, dy.storage.dtype)?;
        let xd = dims4(name, x.layout.dims())?;
        let dyd = dims4(name, dy.layout.dims())?;
        let (xs, ds) = (
            self.dense(name, x, DType::F32)?,
            self.dense(name, dy, DType::F32)?,
        );
        let p = ConvArg::new(xd, o, window, [dyd[2], dyd[3]]);
        let cols = c * kh * kw;
        let k = xd[0] * dyd[2] * dyd[3];
        let (slices, chunk) = split_k(o, cols, k, self.sms());
        let ws = self.empty(name, DType::F32, slices * o * cols)?;
        let dw = self.empty(name, dtype, o * cols)?;
        if let Some(cfg) = gemm_tiles(name, o, cols, slices)? {
            let args = k::Conv2dBackwardFilter {
                x: xs.ptr,
                dy: ds.ptr,
                ws: ws.block.ptr(),
                chunk: chunk as i64,
                p,
            };
            // SAFETY: `ws` holds one o×cols slice per grid z; x and dy the
            // sizes the shape check derived.
            unsafe { args.launch(self.device(), name, &cfg) }?;
            let cfg = elementwise(o * cols, self.sms()).expect("o·cols > 0 here");
            let args = k::SumSplits {
                ws: ws.block.ptr(),
                splits: slices as i64,
                len: (o * cols) as i64,
                out: dw.block.ptr(),
                dtype: dtype_code(dtype),
            };
            // SAFETY: `ws` holds slices·len f32s, `dw` len elements.
            unsafe { args.launch(self.device(), name, &cfg) }?;
        }
        // The bias gradient: Σ dy over images and pixels, per filter.
        let db = self.reduce(ReduceOp::Sum, dy, &[0, 2, 3])?;
        Ok((dw, db))
    }

    fn max_pool2d(
        &self,
        x: View<'_, CudaStorage>,
        window: &Window2d,
    ) -> Result<(CudaStorage, CudaStorage)> {
        let name = "max_pool2d";
        let [n, c, oh, ow] = conv::pool2d_output(x.layout.dims(), window)?;
        let dtype = Self::float_dtype(name, x.storage.dtype)?;
        let xd = dims4(name, x.layout.dims())?;
        if xd[2] * xd[3] > u32::MAX as usize {
            return Err(Error::shape(
                name,
                format!(
                    "an input plane of {}×{} cells does not fit u32 indices",
                    xd[2], xd[3]
                ),
            ));
        }
        let xs = self.dense(name, x, DType::F32)?;
        let cells = n * c * oh * ow;
        let y = self.empty(name, dtype, cells)?;
        let at = self.empty(name, DType::U32, cells)?;
        if let Some(cfg) = elementwise(cells, self.sms()) {
            let p = PoolArg::new(xd, window, [oh, ow]);
            let args = k::MaxPool2d {
                x: xs.ptr,
                y: y.block.ptr(),
                dtype: dtype_code(dtype),
                argmax: at.block.ptr(),
                p,
            };
            // SAFETY: `xs` holds the input planes, `y` and `at` the cells.
            unsafe { args.launch(self.device(), name, &cfg) }?;
        }
        Ok((y, at))
    }

    fn max_pool2d_backward(
        &self,
        dy: View<'_, CudaStorage>,
        argmax: View<'_, CudaStorage>,
        window: &Window2d,
        input: [usize; 2],
    ) -> Result<CudaStorage> {
        let name = "max_pool2d_backward";
        // The shape check returns the pool's output; dx is the input's.
        let [n, c, _, _] =
            conv::pool2d_backward_shape(dy.layout.dims(), argmax.layout.dims(), window, input)?;
        let [h, w] = input;
        let dtype = Self::float_dtype(name, dy.storage.dtype)?;
        if argmax.storage.dtype != DType::U32 {
            return Err(Error::DType {
                op: name,
                expected: DType::U32,
                got: argmax.storage.dtype,
            });
        }
        let dyd = dims4(name, dy.layout.dims())?;
        let (ds, am) = (
            self.dense(name, dy, DType::F32)?,
            self.dense(name, argmax, DType::U32)?,
        );
        let cells = n * c * h * w;
        let dx = self.empty(name, dtype, cells)?;
        if let Some(cfg) = elementwise(cells, self.sms()) {
            let p = PoolArg::new([n, c, h, w], window, [dyd[2], dyd[3]]);
            let args = k::MaxPool2dBackward {
                dy: ds.ptr,
                argmax: am.ptr,
                dx: dx.block.ptr(),
                dtype: dtype_code(dtype),
                p,
            };
            // SAFETY: `ds` and `am` hold the output cells, `dx` the input's.
            unsafe { args.launch(self.device(), name, &cfg) }?;
        }
        Ok(dx)
    }

    fn sgd_update(
        &self,
        param: &mut CudaStorage,
        grad: &CudaStorage,
        velocity: Option<&mut CudaStorage>,
        step: &SgdStep,
    ) -> Result<()> {
        let name = "sgd_update";
        kiln_core::OptimizerPlan::sgd(&*param, grad, velocity.as_deref(), step)?;
        let Some(cfg) = elementwise(param.len, self.sms()) else {
            return Ok(());
        };
        let args = k::Sgd {
            p: param.block.ptr(),
            g: grad.block.ptr(),
            vel: velocity.map_or(0, |v| v.block.ptr()),
            n: param.len as i64,
            lr: step.lr,
            momentum: step.momentum,
            weight_decay: step.weight_decay,
            nesterov: i32::from(step.nesterov),
        };
        // SAFETY: every operand holds param.len f32s (`optim_check`).
        unsafe { args.launch(self.device(), name, &cfg) }
    }

    fn adam_update(
        &self,
        param: &mut CudaStorage,
        grad: &CudaStorage,
        m: &mut CudaStorage,
        v: &mut CudaStorage,
        step: &AdamStep,
    ) -> Result<()> {
        let name = "adam_update";
        let (_, kiln_core::AdamSchedule { lr_t, decay, l2 }) =
            kiln_core::OptimizerPlan::adam(&*param, grad, &*m, &*v, step)?;
        let Some(cfg) = elementwise(param.len, self.sms()) else {
            return Ok(());
        };
        let args = k::Adam {
            p: param.block.ptr(),
            g: grad.block.ptr(),
            m: m.block.ptr(),
            v: v.block.ptr(),
            n: param.len as i64,
            lr_t,
            beta1: step.beta1,
            beta2: step.beta2,
            eps: step.eps,
            decay,
            l2,
        };
        // SAFETY: every operand holds param.len f32s (`optim_check`).
        unsafe { args.launch(self.device(), name, &cfg) }
    }

    fn random(
        &self,
        dist: Distribution,
        numel: usize,
        dtype: DType,
        seed: u64,
        offset: u64,
    ) -> Result<CudaStorage> {
        let name = "random";
        let dtype = Self::float_dtype(name, dtype)?;
        dist.validate()?;
        let out = self.empty(name, dtype, numel)?;
        let (dst, n) = (out.block.ptr(), numel as i64);
        let Some(cfg) = elementwise(numel, self.sms()) else {
            return Ok(out);
        };
        let dtype = dtype_code(dtype);
        let dev = self.device();
        match dist {
            Distribution::Uniform { low, high } => {
                let args = k::Uniform {
                    dst,
                    dtype,
                    n,
                    seed,
                    offset,
                    low,
                    high,
                };
                // SAFETY: `out` holds numel elements of `dtype`.
                unsafe { args.launch(dev, name, &cfg) }?;
            }
            Distribution::Normal { mean, std } => {
                let args = k::Normal {
                    dst,
                    dtype,
                    n,
                    seed,
                    offset,
                    mean,
                    std,
                };
                // SAFETY: `out` holds numel elements of `dtype`.
                unsafe { args.launch(dev, name, &cfg) }?;
            }
        }
        Ok(out)
    }
}
