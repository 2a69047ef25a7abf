//! The MPI engine: rsmpi over the system's MPI library.

use std::mem::ManuallyDrop;
use std::sync::Mutex;
use std::thread::ThreadId;

use kiln_core::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
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
/// makes and drops it on its main thread); dropped on another thread, it
/// says so and leaves MPI unfinalised rather than break that rule.
pub struct Mpi {
    world: SimpleCommunicator,
    lock: Mutex<()>,
    rank: usize,
    size: usize,
    library: String,
    /// Finalises MPI when dropped: done by hand, on `home` only.
    universe: ManuallyDrop<Universe>,
    home: ThreadId,
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
        prefer_ring_all_reduce_on_one_machine();
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
            universe: ManuallyDrop::new(universe),
            home: std::thread::current().id(),
        })
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `buf` replaced by its element-wise sum over the ranks, in calls of
    /// at most `MAX_COUNT` elements.
    fn sum_into<T: Equivalence + Clone>(&self, buf: &mut [T]) {
        let _g = self.locked();
        for chunk in buf.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            self.world
                .all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
    }
}

/// Open MPI's default choice of all-reduce for a few ranks on one machine
/// measured 3–5× slower than its ring algorithm for the buffers training
/// reduces (`kiln-allreduce-bench`, Open MPI 4.1.4, 2-core VM: 1 MiB over 2
/// ranks in 1,059 µs against 200 µs; over 4 ranks 2,568 against 734 µs;
/// equal within noise up to 64 KiB). So when every rank of the job runs on
/// this machine, and the user has set neither of Open MPI's variables for
/// it, the ring is asked for before MPI starts. Across machines Open MPI's
/// own rules stand.
fn prefer_ring_all_reduce_on_one_machine() {
    const DYNAMIC: &str = "OMPI_MCA_coll_tuned_use_dynamic_rules";
    const ALGORITHM: &str = "OMPI_MCA_coll_tuned_allreduce_algorithm";
    let var = |v: &str| std::env::var(v).ok();
    let one_machine = var("OMPI_COMM_WORLD_SIZE").is_some()
        && var("OMPI_COMM_WORLD_SIZE") == var("OMPI_COMM_WORLD_LOCAL_SIZE");
    if one_machine && var(DYNAMIC).is_none() && var(ALGORITHM).is_none() {
        // Before MPI_Init, which reads them, and before kiln starts any
        // thread of its own (`connect` is called first thing).
        std::env::set_var(DYNAMIC, "1");
        // 4: ring.
        std::env::set_var(ALGORITHM, "4");
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        if std::thread::current().id() == self.home {
            // SAFETY: `universe` is dropped once, here, and never used
            // again; `&mut self` means no other thread is inside an MPI call
            // through this handle, and this is the thread that initialised MPI.
            unsafe { ManuallyDrop::drop(&mut self.universe) };
        } else {
            eprintln!(
                "kiln-dist: the MPI handle was dropped on a thread other than the one that \
                 initialised MPI; MPI is left unfinalised"
            );
        }
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
        self.sum_into(buf);
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum_into(buf);
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
