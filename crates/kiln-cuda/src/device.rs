//! Finding GPUs, describing them, their memory, and turning driver errors
//! into kiln errors that name the op.
//!
//! ```
//! use kiln_cuda::device::{driver_present, list, no_driver};
//!
//! // Without an NVIDIA driver (a CI machine), every entry point says so clearly.
//! if !driver_present() {
//!     assert!(no_driver().to_string().contains("use --backend cpu"));
//!     assert!(list().is_err());
//! }
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUresult};
use cudarc::driver::{result, CudaContext, CudaStream, DriverError};
use kiln_core::{Error, Result};

use crate::alloc::{RawError, RawMemory};

/// What `kiln info` prints about a GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The ordinal (`cuda:N`).
    pub ordinal: usize,
    /// The marketing name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Total memory in bytes.
    pub memory_bytes: usize,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// The driver's CUDA version, e.g. `12.4`.
    pub driver: String,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} {} (compute {}.{}, {:.1} GiB, {} SMs, driver CUDA {})",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.memory_bytes as f64 / (1u64 << 30) as f64,
            self.sms,
            self.driver
        )
    }
}

/// The error for a machine without the CUDA driver library.
pub fn no_driver() -> Error {
    Error::Backend(
        "no CUDA driver found (libcuda.so.1): the CUDA backend needs an NVIDIA GPU and its driver; \
         use --backend cpu"
            .into(),
    )
}

/// Whether the driver library can be loaded. cudarc's dynamic loading
/// panics on first use without it, so every entry point asks this first.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A driver error as a kiln error naming `op`.
pub fn driver_error(op: &str, e: DriverError) -> Error {
    Error::Backend(format!("{op}: CUDA driver: {e}"))
}

/// The driver's CUDA version as `major.minor`.
fn driver_version() -> Result<String> {
    let mut v = 0i32;
    // SAFETY: writes one int; the library is present (checked by callers).
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| driver_error("cuDriverGetVersion", e))?;
    Ok(format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// Describes the device behind `ctx`.
pub fn describe(ctx: &Arc<CudaContext>) -> Result<DeviceInfo> {
    let op = "describing the GPU";
    let sms = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| driver_error(op, e))?;
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx.name().map_err(|e| driver_error(op, e))?,
        compute_capability: ctx.compute_capability().map_err(|e| driver_error(op, e))?,
        memory_bytes: ctx.total_mem().map_err(|e| driver_error(op, e))?,
        sms: sms.max(1) as u32,
        driver: driver_version()?,
    })
}

/// Every GPU the driver sees; an error where there is no driver.
pub fn list() -> Result<Vec<DeviceInfo>> {
    if !driver_present() {
        return Err(no_driver());
    }
    let n = CudaContext::device_count().map_err(|e| driver_error("counting GPUs", e))?;
    (0..n.max(0) as usize)
        .map(|i| {
            let ctx = CudaContext::new(i).map_err(|e| driver_error("opening a GPU", e))?;
            describe(&ctx)
        })
        .collect()
}

/// One device's memory, for the caching allocator: plain `cuMemAlloc` /
/// `cuMemFree` in the device's context.
pub struct DeviceMemory {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
}

impl RawMemory for DeviceMemory {
    fn alloc(&self, bytes: usize) -> std::result::Result<u64, RawError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| RawError::Other(e.to_string()))?;
        // SAFETY: the context is current on this thread; the pointer is
        // freed exactly once, by `free`.
        match unsafe { result::malloc_sync(bytes) } {
            Ok(p) => Ok(p),
            Err(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => Err(RawError::OutOfMemory),
            Err(e) => Err(RawError::Other(e.to_string())),
        }
    }

    fn free(&self, ptr: u64, _bytes: usize) {
        // Work still queued may use the block: finish it first.
        let _ = self.stream.synchronize();
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `alloc` and is no longer referenced.
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    fn mem_info(&self) -> Option<(usize, usize)> {
        self.ctx.mem_get_info().ok()
    }
}
