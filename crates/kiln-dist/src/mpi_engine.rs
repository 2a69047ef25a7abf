//! The MPI engine: rsmpi over the system's MPI library.

use std::sync::Mutex;

use kiln_core::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use mpi::Threading;

use crate::Collective;

/// Elements per MPI call: counts are C ints.
const MAX_COUNT: usize = 1 << 30;

/// MPI's world communicator: one rank per process `mpirun` started.
///
/// MPI is initialised when this is made (once per process, at the
/// `MPI_THREAD_SERIALIZED` level: calls may come from any thread, one at a
/// time, which a lock enforces) and finalised when it is dropped. A
/// failure of MPI itself — a peer that died, a lost connection — ends the
/// job through MPI's default error handler (`mpirun` then names the rank
/// that failed and exits non-zero), so no call here returns half done.
///
/// MPI asks that it be finalised by the thread that initialised it: drop
/// the last handle on the thread that called [`Mpi::init`] (`kiln train`
/// makes and drops it on its main thread).
pub struct Mpi {
    // Dropped last: finalising MPI needs every communicator gone.
    world: SimpleCommunicator,
    lock: Mutex<()>,
    rank: usize,
    size: usize,
    library: String,
    _universe: Universe,
}

// SAFETY: MPI was initialised at MPI_THREAD_SERIALIZED (checked in
// `init`), so its calls may be made from any thread as long as no two run
// at once; every call below holds `lock`, and `abort` ends the process.
unsafe impl Send for Mpi {}
// SAFETY: as for Send: every use of the communicator is under `lock`.
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initialises MPI and joins its world. An error if MPI was already
    /// initialised in this process or cannot give serialised threading.
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Backend("MPI was already initialised in this process".into()))?;
        if threading < Threading::Serialized {
            return Err(Error::Backend(format!(
                "the MPI library offers only {threading:?} threading; kiln needs Serialized"
            )));
        }
        let world = universe.world();
        let library = mpi::environment::library_version()
            .map(|v| v.lines().next().unwrap_or("").trim().to_string())
            .unwrap_or_else(|_| "unknown MPI".to_string());
        Ok(Mpi {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            lock: Mutex::new(()),
            library,
            _universe: universe,
        })
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn describe(&self) -> String {
        let library = self.library.split(',').next().unwrap_or(&self.library);
        format!("mpi ({library}, {} processes)", self.size)
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let _g = self.locked();
        for chunk in buf.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            self.world
                .all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let _g = self.locked();
        for chunk in buf.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            self.world
                .all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
        Ok(())
    }
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.size {
            return Err(Error::invalid(format!(
                "broadcast from rank {root} in a world of {} processes",
                self.size
            )));
        }
        let _g = self.locked();
        let root = self.world.process_at_rank(root as i32);
        for chunk in buf.chunks_mut(MAX_COUNT) {
            root.broadcast_into(chunk);
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        let _g = self.locked();
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        // No lock: the process ends, whatever another thread is doing.
        self.world.abort(code)
    }
}
