//! [`Launcher`]: where the backend's kernels run. Two implementations: the
//! CUDA driver ([`crate::driver::Driver`]) and the host emulation
//! ([`crate::emulator::Emulator`]), which runs the same kernels on the CPU
//! with the same calling convention, so every line of [`crate::CudaBackend`]
//! — argument structs, geometry, dtype plumbing, views — is tested on
//! machines without a GPU.
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
use std::ffi::c_void;

use cudarc::driver::LaunchConfig;
use kiln_core::Result;

use crate::alloc::RawMemory;
use crate::device::DeviceInfo;

/// A device that runs kiln's kernels, as the backend sees it: memory,
/// transfers, launches in stream order.
///
/// Device addresses are `u64`s; for the host emulation they are host
/// addresses. Launches and uploads are queued in order; a download waits
/// for the work queued before it.
pub trait Launcher: Send + Sync + 'static {
    /// What the device is.
    fn info(&self) -> &DeviceInfo;

    /// The device's memory, for the caching allocator.
    fn memory(&self) -> Box<dyn RawMemory>;

    /// Launches `kernel` on `cfg`'s grid, as `cuLaunchKernel` does:
    /// `args[i]` points to the value of the kernel's parameter `i`. Errors
    /// name `op`.
    ///
    /// # Safety
    ///
    /// Each `args[i]` must point to a live value of exactly the type of the
    /// kernel's parameter `i` (the typed launchers of [`crate::launchers`]
    /// guarantee this), and every device address among the values must be
    /// valid for everything the kernel reads and writes on that grid.
    unsafe fn launch(
        &self,
        op: &str,
        kernel: &'static str,
        cfg: &LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<()>;

    /// Copies `src` to device address `dst`, in stream order.
    ///
    /// # Safety
    ///
    /// `dst` must be valid for `src.len()` bytes of writes.
    unsafe fn upload(&self, op: &str, dst: u64, src: &[u8]) -> Result<()>;

    /// Copies `dst.len()` bytes from device address `src` once the work
    /// queued before has finished, and returns when they have arrived.
    ///
    /// # Safety
    ///
    /// `src` must be valid for `dst.len()` bytes of reads.
    unsafe fn download(&self, op: &str, src: u64, dst: &mut [u8]) -> Result<()>;

    /// Waits for all queued work.
    fn synchronize(&self) -> Result<()>;

    /// The implementation, for callers that need its own API (cuBLAS on the
    /// driver's stream).
    fn as_any(&self) -> &dyn Any;
}
