//! The host emulation as a [`Launcher`]: kiln's CUDA kernels compiled for
//! the CPU by g++ (`kernels/host/emulator.cpp` over `kernels/host/shim.h`)
//! into a shared library, called with `cuLaunchKernel`'s convention — so a
//! [`crate::CudaBackend`] on an [`Emulator`] runs every line of the real
//! backend, its typed launchers, grids and views included, on a machine
//! with no GPU. Device memory is host memory (zeroed, 256-byte aligned)
//! behind the same caching allocator; launches are synchronous and
//! serialised, one device with one stream.
//!
//! Grid-stride kernels run their threads one after another; block-wide
//! kernels run each block's threads as fibers switched at `__syncthreads`,
//! so barriers, shared memory and warp shuffles behave as on a GPU for
//! kernels that follow CUDA's rules (what a serial schedule hides — races
//! between threads — only a GPU shows). The emulated device reports compute
//! capability 8.0 (so the tensor-core GEMMs run, through software
//! `mma.sync`, `ldmatrix` and `cp.async`) and [`EMULATED_SMS`]
//! multiprocessors.
//!
//! ```no_run
//! // Not run as a doc test: building the emulation compiles every kernel with
//! // g++ (about a minute); kiln-cuda's tests build it once and run the whole
//! // conformance suite on it.
//! use kiln_core::Tensor;
//! use kiln_cuda::CudaBackend;
//!
//! let gpu = CudaBackend::emulated()?; // the same backend code, kernels run on the CPU
//! let a = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0], &[2, 2], &gpu)?;
//! assert_eq!(a.matmul(&a)?.to_vec_f32()?, [7.0, 10.0, 15.0, 22.0]);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::any::Any;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

use cudarc::driver::LaunchConfig;
use kiln_core::{Error, Result};

use crate::alloc::{RawError, RawMemory};
use crate::device::DeviceInfo;
use crate::launcher::Launcher;

/// The multiprocessors the emulated device reports (grid sizes and split-K
/// depend on it: few, so grid-stride loops take several laps).
pub const EMULATED_SMS: u32 = 4;

/// Device memory the emulated device offers before reporting out of memory.
pub const EMULATED_MEMORY: usize = 8 << 30;

/// The sources the library is built from, embedded so that it can be built
/// wherever the crate is.
const SOURCES: &[(&str, &str)] = &[
    (
        "host/emulator.cpp",
        include_str!("../kernels/host/emulator.cpp"),
    ),
    ("host/shim.h", include_str!("../kernels/host/shim.h")),
    (
        "host/tc_emulation.h",
        include_str!("../kernels/host/tc_emulation.h"),
    ),
    ("common.cuh", include_str!("../kernels/common.cuh")),
    ("simt_gemm.cuh", include_str!("../kernels/simt_gemm.cuh")),
    ("tc_ops.cuh", include_str!("../kernels/tc_ops.cuh")),
    ("attention.cu", include_str!("../kernels/attention.cu")),
    ("conv.cu", include_str!("../kernels/conv.cu")),
    ("elementwise.cu", include_str!("../kernels/elementwise.cu")),
    ("gemm_simt.cu", include_str!("../kernels/gemm_simt.cu")),
    ("gemm_tc.cu", include_str!("../kernels/gemm_tc.cu")),
    ("embedding.cu", include_str!("../kernels/embedding.cu")),
    ("memory.cu", include_str!("../kernels/memory.cu")),
    ("norm.cu", include_str!("../kernels/norm.cu")),
    ("optim.cu", include_str!("../kernels/optim.cu")),
    ("pool.cu", include_str!("../kernels/pool.cu")),
    ("random.cu", include_str!("../kernels/random.cu")),
    ("reduce.cu", include_str!("../kernels/reduce.cu")),
    ("softmax.cu", include_str!("../kernels/softmax.cu")),
];

type LaunchFn = unsafe extern "C" fn(
    name: *const c_char,
    grid: *const u32,
    block: *const u32,
    shared_bytes: u32,
    args: *mut *mut c_void,
    params: usize,
    error: *mut c_char,
    error_len: usize,
) -> i32;
type CountFn = unsafe extern "C" fn() -> usize;
type NameFn = unsafe extern "C" fn(i: usize) -> *const c_char;

/// kiln's kernels on the CPU, behind the launch interface.
pub struct Emulator {
    launch: LaunchFn,
    names: Vec<String>,
    info: DeviceInfo,
    // Last: the functions above point into it.
    _library: libloading::Library,
}

impl Emulator {
    /// Builds the emulation library with `g++` (C++20) unless a build of
    /// the same sources is already in `dir`, and loads it. Errors: no
    /// `g++`, a failed build (its messages), a library that does not load.
    pub fn build_in(dir: &Path) -> Result<Self> {
        let lib = build_library(dir)?;
        Self::load(&lib)
    }

    /// [`Emulator::build_in`] the system's temporary folder.
    pub fn build() -> Result<Self> {
        Self::build_in(&std::env::temp_dir())
    }

    /// Loads an emulation library built from `kernels/host/emulator.cpp`.
    pub fn load(path: &Path) -> Result<Self> {
        let io = |e: libloading::Error| {
            Error::Backend(format!(
                "loading the CUDA host emulation {}: {e}",
                path.display()
            ))
        };
        // SAFETY: the library is kiln's own emulation, whose initialisers
        // only build static tables.
        let library = unsafe { libloading::Library::new(path) }.map_err(io)?;
        // SAFETY: the symbols have these C signatures (emulator.cpp).
        let (launch, count, name) = unsafe {
            (
                *library.get::<LaunchFn>(b"kiln_host_launch\0").map_err(io)?,
                *library.get::<CountFn>(b"kiln_host_kernels\0").map_err(io)?,
                *library
                    .get::<NameFn>(b"kiln_host_kernel_name\0")
                    .map_err(io)?,
            )
        };
        // SAFETY: `count` takes nothing; `name(i)` for i < count returns a
        // static NUL-terminated string.
        let names = unsafe {
            (0..count())
                .map(|i| CStr::from_ptr(name(i)).to_string_lossy().into_owned())
                .collect()
        };
        Ok(Emulator {
            launch,
            names,
            info: DeviceInfo {
                ordinal: 0,
                name: "kiln host emulation (CPU)".into(),
                compute_capability: (8, 0),
                memory_bytes: EMULATED_MEMORY,
                sms: EMULATED_SMS,
                driver: "emulated".into(),
            },
            _library: library,
        })
    }

    /// The kernels the library holds.
    pub fn kernels(&self) -> &[String] {
        &self.names
    }
}

/// Builds (or finds) the library for the embedded sources under `dir`.
fn build_library(dir: &Path) -> Result<PathBuf> {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for (name, text) in SOURCES {
        for b in name.bytes().chain(text.bytes()) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let root = dir.join(format!("kiln-cuda-host-{hash:016x}"));
    let lib = root.join("libkiln_cuda_host.so");
    if lib.exists() {
        return Ok(lib);
    }
    let io = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", root.display()), e);
    // Each build in its own folder, renamed into place: concurrent builders
    // never see a half-written library.
    let scratch = dir.join(format!(
        "kiln-cuda-host-{hash:016x}.{}.tmp",
        std::process::id()
    ));
    for (name, text) in SOURCES {
        let path = scratch.join(name);
        std::fs::create_dir_all(path.parent().expect("a file in a folder"))
            .map_err(|e| io("creating", e))?;
        std::fs::write(&path, text).map_err(|e| io("writing into", e))?;
    }
    let out = scratch.join("libkiln_cuda_host.so");
    let result = Command::new("g++")
        .args([
            "-std=c++20",
            "-O2",
            "-march=native",
            "-fPIC",
            "-shared",
            "-pthread",
            "-I",
        ])
        .arg(&scratch)
        .arg(scratch.join("host/emulator.cpp"))
        .arg("-o")
        .arg(&out)
        .output()
        .map_err(|e| {
            Error::Backend(format!(
                "building the CUDA host emulation needs g++ (C++20): {e}"
            ))
        })?;
    if !result.status.success() {
        return Err(Error::Backend(format!(
            "building the CUDA host emulation failed:\n{}",
            String::from_utf8_lossy(&result.stderr)
        )));
    }
    match std::fs::rename(&scratch, &root) {
        Ok(()) => {}
        // Another process finished first: use its build.
        Err(_) if lib.exists() => {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        Err(e) => return Err(io("moving the build to", e)),
    }
    Ok(lib)
}

impl Launcher for Emulator {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn memory(&self) -> Box<dyn RawMemory> {
        Box::new(HostMemory)
    }

    unsafe fn launch(
        &self,
        op: &str,
        kernel: &'static str,
        cfg: &LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let name = CString::new(kernel).expect("kernel names have no NUL");
        let grid = [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2];
        let block = [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2];
        let mut error = [0 as c_char; 512];
        // SAFETY: the caller guarantees `args` matches the kernel's
        // parameters and its addresses (host addresses here) are valid;
        // the library checks the name, arity and geometry itself.
        let status = unsafe {
            (self.launch)(
                name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                cfg.shared_mem_bytes,
                args.as_mut_ptr(),
                args.len(),
                error.as_mut_ptr(),
                error.len(),
            )
        };
        if status == 0 {
            return Ok(());
        }
        // SAFETY: the library wrote a NUL-terminated message into `error`.
        let why = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy();
        Err(Error::Backend(format!("{op}: emulated launch: {why}")))
    }

    unsafe fn upload(&self, _op: &str, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: `dst` is a host address valid for `src.len()` bytes (the
        // caller's contract), in a block that does not overlap `src`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn download(&self, _op: &str, src: u64, dst: &mut [u8]) -> Result<()> {
        // SAFETY: `src` is a host address valid for `dst.len()` bytes (the
        // caller's contract); launches are synchronous, so it is final.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The emulated device's memory: zeroed host allocations.
struct HostMemory;

/// The alignment of every allocation (`cudaMalloc` gives at least 256).
const ALIGN: usize = 256;

impl RawMemory for HostMemory {
    fn alloc(&self, bytes: usize) -> std::result::Result<u64, RawError> {
        if bytes > EMULATED_MEMORY {
            return Err(RawError::OutOfMemory);
        }
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), ALIGN)
            .map_err(|e| RawError::Other(e.to_string()))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        if p.is_null() {
            Err(RawError::OutOfMemory)
        } else {
            Ok(p as u64)
        }
    }

    fn free(&self, ptr: u64, bytes: usize) {
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), ALIGN)
            .expect("the layout `alloc` accepted");
        // SAFETY: `ptr` came from `alloc` with this size and is no longer
        // referenced (the allocator's contract).
        unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
    }

    fn mem_info(&self) -> Option<(usize, usize)> {
        None
    }
}
