//! NCCL all-reduces of CUDA storage, in place, on the backend's stream (the
//! cargo feature `nccl`).
//!
//! One communicator per process and GPU. NCCL's unique id is made by rank 0
//! ([`NcclComm::unique_id`]) and handed to the other ranks by the caller —
//! kiln-dist broadcasts it over MPI, as llm.c does. NCCL is loaded at run
//! time like the driver (cudarc's dynamic loading): the build needs no
//! NCCL, and a machine without it gets an error that says where to find
//! it. cudarc looks for `libnccl.so` (not the `libnccl.so.2` that NCCL
//! installs): a folder holding a `libnccl.so` link to it goes on
//! `LD_LIBRARY_PATH`, as `ci/gpu.sh` does.

use std::ffi::{c_char, c_void};
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::CudaStream;
use cudarc::nccl::{result, sys};
use kiln_core::{BackendStorage, DType, Error, Result};

use crate::{CudaBackend, CudaStorage};

/// The bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// An NCCL communicator: this process's rank of a world of GPUs, its
/// collectives queued on one CUDA backend's stream.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    /// NCCL calls on one communicator must not overlap.
    calls: Mutex<()>,
}

// SAFETY: the communicator handle is an opaque pointer NCCL lets any thread
// use; calls on it are serialised by `calls`.
unsafe impl Send for NcclComm {}
// SAFETY: as above — every use of `comm` after construction holds `calls`.
unsafe impl Sync for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {})", self.rank, self.world)
    }
}

/// Whether NCCL's library can be loaded, or the error that says how to get it.
fn library() -> Result<()> {
    // SAFETY: the probe only opens the library (dlopen); no symbol is called.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    Err(Error::Backend(
        "NCCL's library was not found (cudarc loads it as libnccl.so): install NCCL — \
         `pip install nvidia-nccl-cu12`, or the system's libnccl2 — and put a folder holding \
         libnccl.so (a link to its libnccl.so.2) on LD_LIBRARY_PATH; or train with \
         `--distributed mpi`, which reduces gradients through host memory"
            .into(),
    ))
}

fn nccl_error(op: &str, e: result::NcclError) -> Error {
    Error::Backend(format!(
        "NCCL {op} failed: {:?} (NCCL_DEBUG=WARN prints NCCL's own account)",
        e.0
    ))
}

/// NCCL's version as `major.minor.patch`.
pub fn version() -> Result<String> {
    library()?;
    let v = result::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e))?;
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

impl NcclComm {
    /// A new unique id, made on rank 0 and given to every rank's
    /// [`NcclComm::new`].
    pub fn unique_id() -> Result<[u8; ID_BYTES]> {
        library()?;
        let id = result::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// Joins the world of `world` ranks as `rank`, on `backend`'s GPU and
    /// stream. Every rank calls it with the same id; it returns once all
    /// have joined.
    pub fn new(
        backend: &CudaBackend,
        rank: usize,
        world: usize,
        id: &[u8; ID_BYTES],
    ) -> Result<Self> {
        if world == 0 || rank >= world || i32::try_from(world).is_err() {
            return Err(Error::invalid(format!(
                "NCCL: rank {rank} of a world of {world}"
            )));
        }
        let stream = backend
            .stream()
            .ok_or_else(|| {
                Error::Backend("NCCL needs a GPU: this CUDA backend is the host emulation".into())
            })?
            .clone();
        library()?;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Backend(format!("NCCL: binding the GPU's context: {e}")))?;
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as c_char),
        };
        let mut comm = MaybeUninit::uninit();
        // SAFETY: NCCL writes the communicator handle into `comm` before
        // returning success; the rank and world fit an i32 (checked above).
        unsafe { result::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32) }
            .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        // SAFETY: initialised by the successful call above.
        let comm = unsafe { comm.assume_init() };
        Ok(NcclComm {
            comm,
            stream,
            rank,
            world,
            calls: Mutex::new(()),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Replaces `buf` on every rank by the element-wise sum of every rank's
    /// `buf`, queued on the backend's stream after the ops that wrote it
    /// and before those that read it. `buf` must not share its memory
    /// with another storage (a clone), which would change with it.
    pub fn all_reduce_sum(&self, buf: &mut CudaStorage) -> Result<()> {
        if Arc::strong_count(&buf.block) != 1 {
            return Err(Error::invalid(
                "NCCL all-reduce: the buffer shares its memory with another storage",
            ));
        }
        let dtype = match buf.dtype() {
            DType::F32 => sys::ncclDataType_t::ncclFloat32,
            DType::F16 => sys::ncclDataType_t::ncclFloat16,
            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
            DType::U32 => sys::ncclDataType_t::ncclUint32,
        };
        let ptr = buf.device_ptr() as *mut c_void;
        let _held = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: `ptr` is this storage's device allocation of `len`
        // elements of `dtype` on the communicator's GPU, owned by `buf`
        // alone (checked above); every op of the backend is queued on this
        // same stream, so the memory is not reused before the reduction
        // has run; NCCL allows the same send and receive buffer.
        unsafe {
            result::all_reduce(
                ptr,
                ptr,
                buf.len(),
                dtype,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| nccl_error("ncclAllReduce", e))?;
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let _held = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: the handle came from ncclCommInitRank and is not used
        // again; a failure to tear down leaves nothing to recover.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}
