//! The NCCL engine: gradients summed in GPU memory by NCCL, one process
//! per GPU; MPI for NCCL's unique id and for everything in host memory.

use std::any::Any;
use std::sync::Arc;

use kiln_core::{bf16, Error, Result};
use kiln_cuda::nccl::{self, NcclComm, ID_BYTES};
use kiln_cuda::{CudaBackend, CudaStorage};

use crate::Collective;

/// NCCL across the GPUs of an MPI world: one rank per process and GPU.
///
/// Made with [`Nccl::over`] from the MPI world ([`crate::connect`] with
/// [`crate::Engine::Nccl`]) once the process's CUDA backend exists. CUDA
/// storage — the gradient buckets of [`crate::replicas`] — is summed by
/// NCCL on the backend's stream, without a copy to the host; host buffers
/// (step totals, counts), broadcasts, barriers and aborts go through MPI.
pub struct Nccl {
    host: Arc<dyn Collective>,
    comm: NcclComm,
    version: String,
}

impl Nccl {
    /// Joins NCCL's world of `host`'s ranks on `backend`'s GPU: every rank
    /// first checks that it has a GPU and NCCL's library, and all learn
    /// whether any lacks them (so no rank waits for one that cannot come);
    /// rank 0 then makes NCCL's unique id and `host` broadcasts it.
    pub fn over(host: Arc<dyn Collective>, backend: &CudaBackend) -> Result<Self> {
        let ready = if backend.stream().is_none() {
            Err(Error::Backend(
                "NCCL needs a GPU: this CUDA backend is the host emulation".into(),
            ))
        } else {
            nccl::version()
        };
        let mut missing = [f64::from(u8::from(ready.is_err()))];
        host.all_reduce_sum_f64(&mut missing)?;
        let version = match ready {
            Err(e) => return Err(e),
            Ok(_) if missing[0] > 0.0 => {
                return Err(Error::Backend(format!(
                    "NCCL: {} of {} ranks have no GPU or no NCCL library (their errors say which)",
                    missing[0],
                    host.world()
                )))
            }
            Ok(v) => v,
        };
        // Byte 0 says whether rank 0 could make the id, so that a failure
        // there reaches every rank instead of a communicator that never forms.
        let mut message = [0u8; 1 + ID_BYTES];
        let made = if host.rank() == 0 {
            NcclComm::unique_id().map(|id| {
                message[0] = 1;
                message[1..].copy_from_slice(&id);
            })
        } else {
            Ok(())
        };
        host.broadcast(&mut message, 0)?;
        made?;
        if message[0] != 1 {
            return Err(Error::Backend(
                "NCCL: rank 0 could not make the communicator's unique id (its error says why)"
                    .into(),
            ));
        }
        let mut id = [0u8; ID_BYTES];
        id.copy_from_slice(&message[1..]);
        let comm = NcclComm::new(backend, host.rank(), host.world(), &id)?;
        Ok(Nccl {
            host,
            comm,
            version,
        })
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world()
    }

    fn describe(&self) -> String {
        format!(
            "nccl (NCCL {}, {} GPUs; ids and host buffers over {})",
            self.version,
            self.comm.world(),
            self.host.describe()
        )
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.host.all_reduce_sum_f32(buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.host.all_reduce_sum_f64(buf)
    }

    fn all_reduce_sum_bf16(&self, buf: &mut [bf16]) -> Result<()> {
        self.host.all_reduce_sum_bf16(buf)
    }

    fn all_reduce_sum_storage(&self, storage: &mut dyn Any) -> Result<()> {
        match storage.downcast_mut::<CudaStorage>() {
            Some(s) => self.comm.all_reduce_sum(s),
            None => Err(Error::invalid(
                "the nccl engine sums CUDA storage only (train with --backend cuda)",
            )),
        }
    }

    fn reduces_storage(&self, storage: &dyn Any) -> bool {
        storage.is::<CudaStorage>()
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.host.broadcast(buf, root)
    }

    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }

    fn abort(&self, code: i32) -> ! {
        self.host.abort(code)
    }
}
