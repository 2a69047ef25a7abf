//! Host work a backend's own threads take up while they wait between ops.
//!
//! A CPU backend runs one thread per core, and between two ops of a small
//! model's step its helpers only wait for the next one. A data loader on a
//! thread of its own then takes a core from one of them, often in the middle
//! of an op, and the whole team waits for the preempted thread: on the
//! 2-core Emerald Rapids Xeon the seed MLP's step took 146 µs with its
//! loader thread and 130 µs with the same batches assembled beforehand.
//! Offered to the backend instead ([`crate::Backend::lend_idle_threads`]),
//! the loader's work runs in the helpers' waits.
//!
//! ```
//! use std::sync::{atomic::{AtomicUsize, Ordering}, Arc, Weak};
//! use kiln_core::IdleWork;
//!
//! /// Counts to three, a unit at a time.
//! struct Count(AtomicUsize);
//! impl IdleWork for Count {
//!     fn run_one(&self) -> bool {
//!         self.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < 3).then_some(n + 1)).is_ok()
//!     }
//! }
//! let work = Arc::new(Count(AtomicUsize::new(0)));
//! let weak: Weak<dyn IdleWork> = Arc::downgrade(&work) as Weak<dyn IdleWork>;
//! // Whoever runs it calls `run_one` until it says there is nothing left.
//! let runner = weak.upgrade().unwrap();
//! while runner.run_one() {}
//! assert_eq!(work.0.load(Ordering::SeqCst), 3);
//! ```

/// Work offered to a backend's waiting threads
/// ([`crate::Backend::lend_idle_threads`]), in short units.
pub trait IdleWork: Send + Sync {
    /// Runs one unit of the work if one is ready, and says whether it did.
    /// A unit should take microseconds, not milliseconds: the thread
    /// running it may be wanted by the next op meanwhile (which then starts
    /// without it). It must not panic; a panic is caught and the work is
    /// not offered again.
    fn run_one(&self) -> bool;

    /// As [`IdleWork::run_one`], but the unit may end early, at a point of
    /// the work's choosing, once `wanted()` says the thread is wanted
    /// elsewhere (the backend's next op has started): the rest waits for the
    /// next call. Says whether any work was done. The default runs a whole
    /// unit; work whose units are long next to an op implements it.
    fn run_one_unless(&self, wanted: &dyn Fn() -> bool) -> bool {
        let _ = wanted;
        self.run_one()
    }
}
