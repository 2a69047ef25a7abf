//! # kiln-dist
//!
//! Collectives for data-parallel training: one small [`Collective`]
//! interface — rank, world size, all-reduce (sum, in place), broadcast,
//! barrier, abort — and the engines behind it:
//!
//! - [`Local`]: a world of one process, so single-process code has no
//!   special case;
//! - [`InProcess`]: N ranks as threads of one process, for tests and as a
//!   reference to compare an engine with;
//! - `Mpi` (cargo feature `mpi`): MPI through `rsmpi` on the system's MPI
//!   library (Open MPI on Debian), one process per rank, started by
//!   `mpirun`, across cores or machines;
//! - `Nccl` (cargo feature `nccl`): NCCL across GPUs, one process per GPU,
//!   gradient buckets summed in GPU memory; MPI carries NCCL's unique id.
//!
//! On top of the engines, [`replicas`] moves a model's parameters and
//! gradients: the initial weights broadcast from rank 0, gradients averaged
//! in buckets, and a digest that proves every rank holds the same bits;
//! [`overlap`] averages them while the backward pass still runs.
//!
//! ```
//! use kiln_dist::{Collective, Local};
//!
//! let world = Local::new();
//! let mut grads = [1.0f32, 2.0, 3.0];
//! world.all_reduce_sum_f32(&mut grads)?; // a world of one: unchanged
//! assert_eq!((world.rank(), world.world()), (0, 1));
//! assert_eq!(grads, [1.0, 2.0, 3.0]);
//! # Ok::<(), kiln_core::Error>(())
//! ```
//!
//! [`connect`] picks the engine a process was started for: `mpi` when
//! `mpirun` launched it (and kiln was built with the `mpi` feature),
//! otherwise [`Local`].

use std::any::Any;
use std::str::FromStr;
use std::sync::Arc;

use kiln_core::{bf16, Error, Result};

mod in_process;
mod local;
#[cfg(feature = "mpi")]
mod mpi_engine;
#[cfg(feature = "nccl")]
mod nccl_engine;
pub mod overlap;
pub mod replicas;

pub use in_process::InProcess;
pub use local::Local;
#[cfg(feature = "mpi")]
pub use mpi_engine::Mpi;
#[cfg(feature = "nccl")]
pub use nccl_engine::Nccl;

/// A group of processes that train one model together.
///
/// Every collective call is made by every rank, in the same order, with
/// buffers of the same length; a rank that cannot go on calls
/// [`Collective::abort`] so that the others do not wait for it forever.
/// Sums are element-wise; which rank's values are added in which order is
/// the engine's choice, so a sum of more than two ranks may differ in the
/// last bit between engines — but never between the ranks of one call:
/// every rank receives the same bits.
pub trait Collective: Send + Sync {
    /// This process's rank, in `0..world()`.
    fn rank(&self) -> usize;

    /// The number of processes.
    fn world(&self) -> usize;

    /// The engine in words (`local`, `mpi (Open MPI v4.1.4, 2 processes)`).
    fn describe(&self) -> String;

    /// Replaces `buf` on every rank by the element-wise sum of every rank's
    /// `buf`.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;

    /// [`Collective::all_reduce_sum_f32`] for f64 (counts and loss sums).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;

    /// The sum of bf16 buffers, added in f32 and rounded once to bf16 at the
    /// end (summing in bf16 would round at every rank).
    fn all_reduce_sum_bf16(&self, buf: &mut [bf16]) -> Result<()> {
        let mut wide: Vec<f32> = buf.iter().map(|v| v.to_f32()).collect();
        self.all_reduce_sum_f32(&mut wide)?;
        for (d, s) in buf.iter_mut().zip(wide) {
            *d = bf16::from_f32(s);
        }
        Ok(())
    }

    /// Sums a backend's storage of f32 values in place across ranks, in
    /// the memory that holds it — the `nccl` engine: CUDA memory, queued on
    /// the backend's stream in order with its ops — for the kinds of
    /// storage [`Collective::reduces_storage`] accepts; by default none,
    /// and callers go through host memory with
    /// [`Collective::all_reduce_sum_f32`].
    fn all_reduce_sum_storage(&self, storage: &mut dyn Any) -> Result<()> {
        let _ = storage;
        Err(Error::invalid(format!(
            "{} sums host memory only: reduce through all_reduce_sum_f32",
            self.describe()
        )))
    }

    /// Whether [`Collective::all_reduce_sum_storage`] takes `storage`'s kind
    /// of backend storage (the same answer on every rank).
    fn reduces_storage(&self, storage: &dyn Any) -> bool {
        let _ = storage;
        false
    }

    /// Copies `root`'s `buf` into every other rank's.
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;

    /// Returns on each rank once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Ends every process of the job with exit status `code`: what a rank
    /// that fails on its own calls (after printing why), so that no other
    /// rank hangs in a collective waiting for it.
    fn abort(&self, code: i32) -> !;
}

/// Which collective engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// MPI when `mpirun` started this process, otherwise [`Local`].
    Auto,
    /// A world of one ([`Local`]).
    Local,
    /// MPI (the cargo feature `mpi`).
    Mpi,
    /// NCCL across GPUs, one per process (the cargo feature `nccl`):
    /// gradients are summed in GPU memory; with `mpirun` (and the feature
    /// `mpi`), MPI carries NCCL's unique id and everything in host memory.
    Nccl,
}

impl FromStr for Engine {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Engine::Auto),
            "local" => Ok(Engine::Local),
            "mpi" => Ok(Engine::Mpi),
            "nccl" => Ok(Engine::Nccl),
            other => Err(Error::invalid(format!(
                "--distributed {other}: expected auto, local, mpi or nccl"
            ))),
        }
    }
}

/// The number of processes an MPI launcher (Open MPI's `mpirun`, or a PMI
/// launcher such as Slurm's `srun`) started this job with, from the
/// environment it sets; `None` outside one.
pub fn launched_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|s| s.trim().parse().ok())
}

/// Whether this build can run the MPI engine.
pub const MPI_BUILT: bool = cfg!(feature = "mpi");

/// Whether this build can run the NCCL engine.
pub const NCCL_BUILT: bool = cfg!(feature = "nccl");

/// Connects to the engine `engine` names: MPI initialised once per
/// process (the returned handle finalises it when the last clone is
/// dropped), or a [`Local`] world.
///
/// A process that `mpirun` started several of, in a build without MPI, is
/// an error rather than N independent runs writing the same files.
///
/// [`Engine::Nccl`] gives the MPI world that carries NCCL's unique id and
/// the host buffers (a [`Local`] world of one without `mpirun`);
/// `Nccl::over` joins NCCL from it once the process's CUDA backend exists.
pub fn connect(engine: Engine) -> Result<Arc<dyn Collective>> {
    let launched = launched_world_size();
    let mpi = match engine {
        Engine::Local => false,
        Engine::Mpi => true,
        Engine::Nccl if !NCCL_BUILT => {
            return Err(Error::invalid(
                "--distributed nccl: this kiln was built without NCCL: rebuild it with \
                 `cargo build --release -p kiln-cli --features nccl` (and `mpi` too for \
                 more than one process; NCCL itself is loaded at run time)",
            ))
        }
        // MPI carries NCCL's unique id to the other processes; a process
        // alone needs no MPI.
        Engine::Nccl => launched.is_some_and(|n| n > 1),
        Engine::Auto => launched.is_some_and(|n| n > 1),
    };
    if mpi {
        connect_mpi(launched)
    } else {
        Ok(Arc::new(Local::new()))
    }
}

#[cfg(feature = "mpi")]
fn connect_mpi(launched: Option<usize>) -> Result<Arc<dyn Collective>> {
    let mpi = Mpi::init()?;
    if let Some(n) = launched.filter(|&n| n != mpi.world()) {
        // Each process would train alone and write the same files.
        return Err(Error::invalid(format!(
            "the launcher started {n} processes but MPI sees a world of {}: this kiln's MPI \
             library is not the launcher's (start it with the mpirun of the MPI it was built with)",
            mpi.world()
        )));
    }
    Ok(Arc::new(mpi))
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi(launched: Option<usize>) -> Result<Arc<dyn Collective>> {
    let how = match launched {
        Some(n) => format!("this process is one of {n} that an MPI launcher started, but "),
        None => String::new(),
    };
    Err(Error::invalid(format!(
        "{how}this kiln was built without MPI: rebuild it with \
         `cargo build --release -p kiln-cli --features mpi` (needs an MPI library: \
         Debian's libopenmpi-dev and openmpi-bin, and libclang-dev)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_parse_and_unknown_ones_list_the_choices() {
        assert_eq!("auto".parse::<Engine>().unwrap(), Engine::Auto);
        assert_eq!("local".parse::<Engine>().unwrap(), Engine::Local);
        assert_eq!("mpi".parse::<Engine>().unwrap(), Engine::Mpi);
        assert_eq!("nccl".parse::<Engine>().unwrap(), Engine::Nccl);
        let e = "tcp".parse::<Engine>().unwrap_err().to_string();
        assert!(e.contains("auto, local, mpi or nccl"), "{e}");
    }

    #[cfg(not(feature = "nccl"))]
    #[test]
    fn nccl_without_the_feature_says_how_to_build_it() {
        let e = connect(Engine::Nccl).err().unwrap().to_string();
        assert!(e.contains("--features nccl"), "{e}");
    }

    #[test]
    fn local_is_a_world_of_one() {
        let c = connect(Engine::Local).unwrap();
        assert_eq!((c.rank(), c.world()), (0, 1));
        let mut v = [bf16::from_f32(1.5), bf16::from_f32(-2.0)];
        c.all_reduce_sum_bf16(&mut v).unwrap();
        assert_eq!(v[0].to_f32(), 1.5);
        let mut bytes = [1u8, 2, 3];
        c.broadcast(&mut bytes, 0).unwrap();
        assert_eq!(bytes, [1, 2, 3]);
        c.barrier().unwrap();
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn mpi_without_the_feature_says_how_to_build_it() {
        let e = connect(Engine::Mpi).err().unwrap().to_string();
        assert!(e.contains("--features mpi"), "{e}");
    }
}
