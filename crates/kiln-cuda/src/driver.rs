//! The CUDA driver as a [`Launcher`]: one context and stream per device,
//! kiln's PTX loaded into it, launches through `cuLaunchKernel`.
//!
//! ```
//! use kiln_cuda::{device::driver_present, driver::Driver};
//!
//! // A machine without the driver gets an error, not a panic.
//! if !driver_present() {
//!     assert!(Driver::new(0).is_err());
//! }
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::any::Any;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result, CudaContext, CudaStream, LaunchConfig};
use kiln_core::{Error, Result};

use crate::alloc::RawMemory;
use crate::device::{self, driver_error, DeviceInfo, DeviceMemory};
use crate::kernels::Kernels;
use crate::launcher::Launcher;

/// One GPU through the driver.
pub struct Driver {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    info: DeviceInfo,
}

impl Driver {
    /// The GPU `ordinal`. Errors: no driver ("no CUDA driver found
    /// (libcuda.so.1)…"), no such device, or a driver failure.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !device::driver_present() {
            return Err(device::no_driver());
        }
        let count =
            CudaContext::device_count().map_err(|e| driver_error("counting GPUs", e))? as usize;
        if ordinal >= count {
            return Err(Error::Backend(format!(
                "cuda:{ordinal}: this machine has {count} CUDA device{}",
                if count == 1 { "" } else { "s" }
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error("opening the GPU", e))?;
        let stream = ctx.default_stream();
        let info = device::describe(&ctx)?;
        let kernels = Kernels::load(&ctx)?;
        Ok(Driver {
            ctx,
            stream,
            kernels,
            info,
        })
    }

    /// The stream every op is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn bind(&self, op: &str) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_error(op, e))
    }
}

impl Launcher for Driver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn memory(&self) -> Box<dyn RawMemory> {
        Box::new(DeviceMemory {
            ctx: Arc::clone(&self.ctx),
            stream: Arc::clone(&self.stream),
        })
    }

    unsafe fn launch(
        &self,
        op: &str,
        kernel: &'static str,
        cfg: &LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let f = self.kernels.get(kernel)?;
        self.bind(op)?;
        // SAFETY: the caller guarantees `args` matches the kernel's
        // parameters and its addresses are valid; the function belongs to
        // this context, which is current.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                self.stream.cu_stream(),
                args,
            )
        }
        .map_err(|e| driver_error(op, e))
    }

    unsafe fn upload(&self, op: &str, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind(op)?;
        // SAFETY: `dst` holds `src.len()` bytes (the caller's contract); the
        // source is pageable host memory, which the driver stages before
        // the call returns.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| driver_error(op, e))
    }

    unsafe fn download(&self, op: &str, src: u64, dst: &mut [u8]) -> Result<()> {
        if !dst.is_empty() {
            self.bind(op)?;
            // SAFETY: `src` holds `dst.len()` bytes (the caller's contract);
            // the stream is synchronised before `dst` is read.
            unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
                .map_err(|e| driver_error(op, e))?;
        }
        self.synchronize()
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("synchronize", e))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
