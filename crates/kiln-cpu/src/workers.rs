//! The SIMD sets' worker threads: a fork-join team that stays awake between
//! ops.
//!
//! A training step is hundreds of ops of tens to hundreds of microseconds
//! each. A pool whose workers fall asleep as soon as they run dry (rayon's
//! do, within microseconds) charges every op a futex wake-up and a context
//! switch on each side, and the caller waits idle while the pool works:
//! measured on a character GPT (config A, Zen 4), 13 % of one thread's time
//! went to waking rayon's workers, and two threads trained no faster than
//! one. Here the calling thread takes tasks too, the helpers spin on the
//! job counter for [`SPIN`] after each job before they park, and one thread
//! runs everything inline without touching another.
//!
//! Every task runs exactly once, on whichever thread claims it, so results
//! never depend on the thread count or on timing as long as each task's
//! own arithmetic does not. Each thread owns a contiguous share of every
//! job's tasks and runs it first — the caller the first share, helper `i`
//! the `i`-th — and only then takes what another thread has not started,
//! from the end: the same rows of a product, or the same part of a
//! weight's optimiser state, go to the same core op after op and step
//! after step, and are found in its cache (a thread that falls behind
//! still has its work taken over). Claiming tasks in order, as threads
//! came free, scattered them: the seed MLP's epoch took 0.0795 s against
//! 0.0745, the CNN's 1.02 against 0.97 (2-core Xeon, alternating runs,
//! the same bits). A call made while the team is busy — from
//! inside a task, or from a second thread sharing the backend — runs its
//! tasks inline on its own thread instead of waiting for the team.
//!
//! While they watch for the next job, helpers run units of host work lent
//! to them ([`Workers::lend`], behind `Backend::lend_idle_threads`: a
//! data loader's next batches), so that such work does not need a thread
//! of its own competing with the team for its cores.

use std::mem::MaybeUninit;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_core::{Error, IdleWork, Result};

/// How long an idle helper watches for the next job before it parks: longer
/// than the gaps between one training step's ops, short enough that an idle
/// process (a server between requests) stops burning its cores at once.
const SPIN: Duration = Duration::from_micros(200);

/// Spins between a waiting helper's looks for lent work (each look takes
/// the lent work's lock, which its consumer takes too).
const IDLE_LOOK_EVERY: u32 = 16;

/// One call's tasks, on the calling thread's stack while the call lasts.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    /// The team's size, which sets each thread's share ([`claim_order`]).
    threads: usize,
    /// One bit per task, set by the thread that claims it.
    claims: Claims,
    /// Tasks finished (a panicked task counts as finished).
    done: AtomicUsize,
    /// The first panic of a task, resumed on the calling thread.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl Job<'_> {
    /// Runs the tasks thread `rank` owns (the caller is 0, helper `i` is
    /// `i`) that no other thread has claimed, then claims any left, the
    /// last first (those the other threads would reach last).
    fn work(&self, rank: usize) {
        for i in claim_order(rank, self.tasks, self.threads) {
            let (word, bit) = (self.claims.word(i), 1u64 << (i % 64));
            if word.load(Relaxed) & bit == 0 && word.fetch_or(bit, Relaxed) & bit == 0 {
                if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| (self.run)(i))) {
                    let mut first = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                    first.get_or_insert(p);
                }
                self.done.fetch_add(1, Release);
            }
        }
    }
}

/// A job's claim bits: one word on the caller's stack for up to 64 tasks
/// (no allocation per fork), more on the heap.
enum Claims {
    One(AtomicU64),
    Many(Vec<AtomicU64>),
}

impl Claims {
    fn new(tasks: usize) -> Self {
        match tasks {
            0..=64 => Claims::One(AtomicU64::new(0)),
            _ => Claims::Many((0..tasks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()),
        }
    }

    /// The word holding task `i`'s bit.
    fn word(&self, i: usize) -> &AtomicU64 {
        match self {
            Claims::One(w) => w,
            Claims::Many(words) => &words[i / 64],
        }
    }
}

/// The order in which thread `rank` of a team of `threads` tries to claim
/// a job's `tasks`: its own share (`⌈rank·tasks/threads⌉ ..
/// ⌈(rank+1)·tasks/threads⌉`: the caller, which starts first, never owns
/// fewer than another, and owns one when there are fewer tasks than
/// threads) in order, then every task from the last down.
fn claim_order(rank: usize, tasks: usize, threads: usize) -> impl Iterator<Item = usize> {
    let own = (rank * tasks).div_ceil(threads)..((rank + 1) * tasks).div_ceil(threads);
    own.chain((0..tasks).rev())
}

/// What the caller and the helpers share.
struct Shared {
    /// The running job's address, 0 between jobs.
    job: AtomicUsize,
    /// Bumped once per job (and at shutdown): what idle helpers watch.
    generation: AtomicU64,
    /// Helpers that may be looking at `job`.
    active: AtomicUsize,
    /// Helpers parked on `wake`.
    sleepers: AtomicUsize,
    /// Whether a call holds the team.
    busy: AtomicBool,
    shutdown: AtomicBool,
    /// Whether idle helpers spin before parking (not when the team has
    /// more threads than the machine has cores: a spinning helper would
    /// take the core a working one needs).
    spin: bool,
    lock: Mutex<()>,
    wake: Condvar,
    /// Work lent to the helpers' waits ([`Workers::lend`]).
    idle: Mutex<Vec<Weak<dyn IdleWork>>>,
    /// `idle`'s length, for a look without the lock.
    idle_offered: AtomicUsize,
    /// Whether a helper is running lent work.
    idle_running: AtomicBool,
}

impl Shared {
    /// Waits for a generation other than `seen`; `None` at shutdown.
    fn next_generation(&self, seen: u64) -> Option<u64> {
        if self.spin {
            let mut start = Instant::now();
            let mut spins = 0u32;
            loop {
                let g = self.generation.load(Acquire);
                if self.shutdown.load(Relaxed) {
                    return None;
                }
                if g != seen {
                    return Some(g);
                }
                if spins.is_multiple_of(IDLE_LOOK_EVERY)
                    && self.idle_offered.load(Relaxed) > 0
                    && self.run_idle(&|| self.generation.load(Relaxed) != seen)
                {
                    // Busy, not idle: the wait before parking starts again.
                    start = Instant::now();
                    continue;
                }
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, SeqCst);
        let woken = loop {
            // SeqCst against the caller's bump-then-check of `sleepers`: either
            // it sees this helper asleep and notifies under the lock, or this
            // load sees its new generation.
            let g = self.generation.load(SeqCst);
            if self.shutdown.load(SeqCst) {
                break None;
            }
            if g != seen {
                break Some(g);
            }
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        };
        self.sleepers.fetch_sub(1, SeqCst);
        woken
    }

    /// One unit of the first lent work that has one ready; whether one ran.
    /// One helper at a time; each unit runs, and each work is dropped,
    /// outside the list's lock. Work that is gone, or that panicked, is
    /// forgotten.
    /// `wanted` says when a job has come, for the unit to end early.
    fn run_idle(&self, wanted: &dyn Fn() -> bool) -> bool {
        if self.idle_running.swap(true, Acquire) {
            return false;
        }
        let _running = Held(&self.idle_running);
        let mut i = 0;
        loop {
            let work = {
                let mut lent = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                let work = loop {
                    let Some(weak) = lent.get(i) else {
                        self.idle_offered.store(lent.len(), Relaxed);
                        return false;
                    };
                    match weak.upgrade() {
                        Some(work) => break work,
                        None => drop(lent.swap_remove(i)),
                    }
                };
                self.idle_offered.store(lent.len(), Relaxed);
                work
            };
            match panic::catch_unwind(AssertUnwindSafe(|| work.run_one_unless(wanted))) {
                Ok(true) => return true,
                // A job has come: no other work's unit is started.
                Ok(false) if wanted() => return false,
                Ok(false) => i += 1,
                Err(_) => {
                    // This thread's hold on the work ends before the work
                    // is forgotten: once the count says it is gone, no
                    // helper holds it. (The list's weak reference keeps its
                    // allocation, so the address is nobody else's meanwhile.)
                    let faulty = Arc::as_ptr(&work);
                    drop(work);
                    let mut lent = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                    lent.retain(|w| !std::ptr::addr_eq(w.as_ptr(), faulty));
                    self.idle_offered.store(lent.len(), Relaxed);
                }
            }
        }
    }

    fn wake_sleepers(&self) {
        if self.sleepers.load(SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
    }

    /// A helper thread's life: join each new job until shutdown, as the
    /// team's thread `rank`.
    fn helper(&self, rank: usize) {
        let mut seen = self.generation.load(SeqCst);
        while let Some(g) = self.next_generation(seen) {
            seen = g;
            // Announce first, then look (SeqCst, against the caller's clear
            // then check of `active`): a helper either sees the job cleared
            // or is waited for.
            self.active.fetch_add(1, SeqCst);
            let at = self.job.load(SeqCst);
            if at != 0 {
                // SAFETY: a non-zero `job` is the address of the `Job` a
                // caller of `Workers::run` keeps alive on its stack until it
                // has cleared `job` and seen `active` fall to zero, which this
                // helper's increment above holds off until the decrement below.
                let job = unsafe { &*(at as *const Job<'_>) };
                job.work(rank);
            }
            self.active.fetch_sub(1, SeqCst);
        }
    }
}

/// A team of `threads` threads: the caller of [`Workers::run`] and
/// `threads − 1` helpers started here.
pub(crate) struct Workers {
    shared: Arc<Shared>,
    threads: usize,
    handles: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Workers({} threads)", self.threads)
    }
}

/// Clears the team's `busy` flag when a call ends, however it ends.
struct Held<'a>(&'a AtomicBool);
impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.store(false, Release);
    }
}

impl Workers {
    /// A team of `threads` (at least 1), or the error the operating system
    /// gave for starting a helper.
    pub(crate) fn new(threads: usize) -> Result<Self> {
        let threads = threads.max(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shared = Arc::new(Shared {
            job: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            spin: threads <= cores,
            lock: Mutex::new(()),
            wake: Condvar::new(),
            idle: Mutex::new(Vec::new()),
            idle_offered: AtomicUsize::new(0),
            idle_running: AtomicBool::new(false),
        });
        let mut workers = Workers {
            shared,
            threads,
            handles: Vec::with_capacity(threads - 1),
        };
        for i in 1..threads {
            let shared = Arc::clone(&workers.shared);
            let handle = std::thread::Builder::new()
                .name(format!("kiln-cpu-{i}"))
                .spawn(move || shared.helper(i))
                .map_err(|e| {
                    Error::Backend(format!(
                        "starting CPU worker thread {i} of {threads}: {e} \
                         (fewer with --threads or KILN_THREADS)"
                    ))
                })?;
            // Pushed as started: a failure above stops the ones before it.
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// The number of threads, the caller's included.
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Lends the helpers' waits between jobs to `work` while it lives: a
    /// helper watching for the next job runs `work`'s units in the
    /// meantime (one at a time over the team; a job that starts meanwhile
    /// starts without that helper, which joins after its unit). Returns
    /// `false`, taking nothing, where the helpers do not wait awake: no
    /// helpers, or more threads than cores.
    pub(crate) fn lend(&self, work: Weak<dyn IdleWork>) -> bool {
        if self.handles.is_empty() || !self.shared.spin {
            return false;
        }
        let mut lent = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        lent.retain(|w| w.strong_count() > 0);
        lent.push(work);
        self.shared.idle_offered.store(lent.len(), Relaxed);
        true
    }

    /// Runs `f(i)` once for every `i` in `0..tasks`, spread over the team,
    /// and returns when all have finished. A task's panic is resumed here
    /// once every task has finished.
    pub(crate) fn run(&self, tasks: usize, f: impl Fn(usize) + Sync) {
        let inline = tasks <= 1
            || self.handles.is_empty()
            || self
                .shared
                .busy
                .compare_exchange(false, true, Acquire, Relaxed)
                .is_err();
        if inline {
            (0..tasks).for_each(f);
            return;
        }
        let _held = Held(&self.shared.busy);
        let job = Job {
            run: &f,
            tasks,
            threads: self.threads,
            claims: Claims::new(tasks),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
        };
        let shared = &*self.shared;
        shared.job.store(&job as *const Job<'_> as usize, SeqCst);
        shared.generation.fetch_add(1, SeqCst);
        shared.wake_sleepers();
        job.work(0);
        let mut spins = 0u32;
        while job.done.load(Acquire) < tasks {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                // A helper descheduled mid-task: let it run.
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
        shared.job.store(0, SeqCst);
        while shared.active.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        let first = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = first {
            panic::resume_unwind(p);
        }
    }

    /// Elements per task for `n` elements cut into tasks of about
    /// `per_task`: up to `per_task`, `n` itself (one task, run inline; 1
    /// for none, a chunk length `chunks_mut` accepts); above it, as many
    /// equal tasks as a multiple of the thread count, so that the threads
    /// finish together, each a multiple of `align` (the last shorter). (A
    /// 784 × 64 weight's Adam update in tasks of 32,768 took 17 µs on one
    /// thread while the other's 17,408 took 10.)
    pub(crate) fn balanced_chunk(&self, n: usize, per_task: usize, align: usize) -> usize {
        let align = align.max(1);
        if n <= per_task {
            return n.max(1);
        }
        let tasks = n.div_ceil(per_task.max(1)).next_multiple_of(self.threads);
        n.div_ceil(tasks).next_multiple_of(align)
    }

    /// `f(job)` for every job, spread over the team.
    pub(crate) fn for_each<T: Send>(&self, jobs: Vec<T>, f: impl Fn(T) + Sync) {
        let slots: Vec<Mutex<Option<T>>> = jobs.into_iter().map(|j| Mutex::new(Some(j))).collect();
        self.run(slots.len(), |i| {
            let job = slots[i].lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(job) = job {
                f(job);
            }
        });
    }

    /// `n` elements (floats, or the 16-bit floats of a cast) written by
    /// `f(start, chunk)` over chunks of `chunk` elements spread over the
    /// team, with no zeroing pass first: each chunk is handed over
    /// unwritten, and is in the cache of the core that writes it. At most
    /// `chunk` elements, or one thread, make one call on the calling thread.
    ///
    /// # Safety
    /// `f` writes every element of each chunk it is handed, before reading
    /// it ([`crate::fresh::Slot`] loops do).
    pub(crate) unsafe fn filled<T: Send>(
        &self,
        n: usize,
        chunk: usize,
        f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
    ) -> Vec<T> {
        let chunk = chunk.max(1);
        let mut out: Vec<T> = Vec::with_capacity(n);
        let spare = &mut out.spare_capacity_mut()[..n];
        if n <= chunk || self.threads == 1 {
            f(0, spare);
        } else {
            let jobs = spare.chunks_mut(chunk).enumerate().collect();
            self.for_each(jobs, |(i, part): (usize, &mut [MaybeUninit<T>])| {
                f(i * chunk, part)
            });
        }
        // SAFETY: the chunks cover `0..n`, every one was handed to `f`
        // (a task's panic is resumed before this line), and `f` wrote all
        // of its chunk (the caller's promise).
        unsafe { out.set_len(n) };
        out
    }

    /// `f(job)` of every job, in the jobs' order, spread over the team.
    pub(crate) fn map<T: Send, R: Send>(&self, jobs: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
        let results: Vec<Mutex<Option<R>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
        let jobs: Vec<(T, &Mutex<Option<R>>)> = jobs.into_iter().zip(&results).collect();
        self.for_each(jobs, |(job, slot)| {
            let r = f(job);
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        });
        results
            .into_iter()
            .map(|slot| {
                slot.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect("every task ran once (a panic would have been resumed)")
            })
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        self.shared.generation.fetch_add(1, SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_whatever_the_team() {
        for threads in [1, 2, 3, 8] {
            let w = Workers::new(threads).unwrap();
            assert_eq!(w.threads(), threads);
            for tasks in [0, 1, 2, 7, 100] {
                let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                for _ in 0..20 {
                    w.run(tasks, |i| {
                        counts[i].fetch_add(1, Relaxed);
                    });
                }
                assert!(
                    counts.iter().all(|c| c.load(Relaxed) == 20),
                    "{threads}/{tasks}"
                );
            }
        }
    }

    #[test]
    fn each_thread_claims_its_own_share_first_then_the_rest_from_the_end() {
        let order = |rank, tasks, threads| claim_order(rank, tasks, threads).collect::<Vec<_>>();
        assert_eq!(order(0, 8, 2), [0, 1, 2, 3, 7, 6, 5, 4, 3, 2, 1, 0]);
        assert_eq!(order(1, 8, 2), [4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0]);
        // Shares of 7 tasks over 3 threads: 0..3, 3..5, 5..7 (the caller's
        // the largest).
        assert_eq!(order(0, 7, 3)[..4], [0, 1, 2, 6]);
        assert_eq!(order(1, 7, 3)[..3], [3, 4, 6]);
        assert_eq!(order(2, 7, 3)[..3], [5, 6, 6]);
        // Fewer tasks than threads: the caller owns the first, some helpers
        // own none, and every thread still tries them all.
        assert_eq!(order(0, 1, 2), [0, 0]);
        assert_eq!(order(1, 1, 2), [0]);
        assert_eq!(order(0, 4, 16)[..1], [0]);
        assert_eq!(order(12, 4, 16)[..1], [3]);
        assert_eq!(order(1, 4, 16), [3, 2, 1, 0]);
        assert_eq!(order(15, 4, 16), [3, 2, 1, 0]);
        for (tasks, threads) in [(0, 2), (5, 2), (9, 4), (100, 3)] {
            for rank in 0..threads {
                let mut seen: Vec<usize> = order(rank, tasks, threads);
                seen.sort_unstable();
                seen.dedup();
                assert_eq!(seen, (0..tasks).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn map_keeps_order_and_nested_calls_run_inline() {
        let w = Workers::new(3).unwrap();
        let out = w.map((0..50).collect(), |i: usize| {
            // A call from inside a task: inline on that thread.
            w.map(vec![i, i + 1], |j| j * 2).iter().sum::<usize>()
        });
        assert_eq!(out, (0..50).map(|i| 4 * i + 2).collect::<Vec<_>>());
    }

    #[test]
    fn parked_helpers_wake_for_the_next_job() {
        let w = Workers::new(2).unwrap();
        std::thread::sleep(SPIN * 20);
        let ran_on: Vec<Mutex<Option<std::thread::ThreadId>>> =
            (0..64).map(|_| Mutex::new(None)).collect();
        w.run(64, |i| {
            std::thread::sleep(Duration::from_micros(200));
            *ran_on[i].lock().unwrap() = Some(std::thread::current().id());
        });
        let me = std::thread::current().id();
        assert!(
            ran_on.iter().any(|t| *t.lock().unwrap() != Some(me)),
            "no task ran on the helper"
        );
    }

    /// Units of idle work that count where they ran, up to `left` of them.
    struct Units {
        caller: std::thread::ThreadId,
        left: AtomicUsize,
        ran: AtomicUsize,
        on_caller: AtomicBool,
    }

    impl IdleWork for Units {
        fn run_one(&self) -> bool {
            let take = self.left.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
            if take.is_err() {
                return false;
            }
            if std::thread::current().id() == self.caller {
                self.on_caller.store(true, SeqCst);
            }
            self.ran.fetch_add(1, SeqCst);
            true
        }
    }

    /// One long unit of idle work that ends only when its thread is
    /// wanted elsewhere (or after ten seconds), and says whether it was.
    struct Long {
        started: AtomicBool,
        ended_for_a_job: AtomicBool,
    }

    impl IdleWork for Long {
        fn run_one(&self) -> bool {
            false
        }
        fn run_one_unless(&self, wanted: &dyn Fn() -> bool) -> bool {
            if self.started.swap(true, SeqCst) {
                return false;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !wanted() && Instant::now() < deadline {
                std::hint::spin_loop();
            }
            self.ended_for_a_job.store(wanted(), SeqCst);
            true
        }
    }

    #[test]
    fn a_lent_unit_is_told_when_a_job_comes() {
        let w = Workers::new(2).unwrap();
        if !w.shared.spin {
            return; // One core: nothing is lent.
        }
        let work = Arc::new(Long {
            started: AtomicBool::new(false),
            ended_for_a_job: AtomicBool::new(false),
        });
        assert!(w.lend(Arc::downgrade(&work) as Weak<dyn IdleWork>));
        // The helper takes the unit between jobs; the next job ends it.
        keep_awake(&w, || work.started.load(SeqCst));
        assert!(work.started.load(SeqCst));
        let start = Instant::now();
        while !work.ended_for_a_job.load(SeqCst) && start.elapsed() < Duration::from_secs(10) {
            w.run(2, |_| {});
        }
        assert!(work.ended_for_a_job.load(SeqCst), "the unit was not told");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    /// Work that panics at its first unit.
    struct Faulty;

    impl IdleWork for Faulty {
        fn run_one(&self) -> bool {
            panic!("a faulty unit of idle work (expected by the test)")
        }
    }

    /// Runs empty jobs, keeping the helpers awake, until `done` or ten seconds.
    fn keep_awake(w: &Workers, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() && Instant::now() < deadline {
            w.run(4, |_| {});
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    #[test]
    fn lent_work_runs_in_the_helpers_waits_while_it_lives() {
        let units = |left| {
            Arc::new(Units {
                caller: std::thread::current().id(),
                left: AtomicUsize::new(left),
                ran: AtomicUsize::new(0),
                on_caller: AtomicBool::new(false),
            })
        };
        let weak = |work: &Arc<Units>| Arc::downgrade(work) as Weak<dyn IdleWork>;
        // One thread has no helper to lend.
        let work = units(10);
        assert!(!Workers::new(1).unwrap().lend(weak(&work)));
        let w = Workers::new(2).unwrap();
        if !w.shared.spin {
            // One core: the helper parks instead of waiting awake.
            assert!(!w.lend(weak(&work)));
            return;
        }
        assert!(w.lend(weak(&work)));
        keep_awake(&w, || work.ran.load(SeqCst) == 10);
        assert_eq!(work.ran.load(SeqCst), 10, "the helper ran every unit");
        assert!(!work.on_caller.load(SeqCst), "no unit ran on the caller");
        // Work that is dropped, or that panics, is forgotten; jobs go on.
        drop(work);
        keep_awake(&w, || w.shared.idle_offered.load(SeqCst) == 0);
        assert_eq!(
            w.shared.idle_offered.load(SeqCst),
            0,
            "the dropped work forgotten"
        );
        let faulty: Arc<dyn IdleWork> = Arc::new(Faulty);
        assert!(w.lend(Arc::downgrade(&faulty)));
        keep_awake(&w, || w.shared.idle_offered.load(SeqCst) == 0);
        assert_eq!(
            w.shared.idle_offered.load(SeqCst),
            0,
            "the faulty work forgotten"
        );
        assert_eq!(Arc::strong_count(&faulty), 1, "no helper holds it");
        let count = AtomicUsize::new(0);
        w.run(8, |_| {
            count.fetch_add(1, SeqCst);
        });
        assert_eq!(count.load(SeqCst), 8);
    }

    #[test]
    fn balanced_chunks_split_evenly_over_the_team() {
        let w = Workers::new(2).unwrap();
        // Up to one task's worth: one task.
        assert_eq!(w.balanced_chunk(8192, 32768, 16), 8192);
        assert_eq!(w.balanced_chunk(0, 32768, 16), 1);
        // 50,176 in two equal tasks, not 32,768 and 17,408.
        assert_eq!(w.balanced_chunk(50176, 32768, 16), 25088);
        // 98,304 in four tasks of 24,576, not three.
        assert_eq!(w.balanced_chunk(98304, 32768, 16), 24576);
        // Rounded up to the alignment; the tasks still cover n.
        let c = w.balanced_chunk(100_003, 32768, 48);
        assert_eq!(c % 48, 0);
        assert_eq!(100_003usize.div_ceil(c), 4);
        // Three threads: three tasks.
        let c = Workers::new(3).unwrap().balanced_chunk(50176, 32768, 16);
        assert_eq!((c, 50176usize.div_ceil(c)), (16736, 3));
    }

    #[test]
    fn filled_hands_each_chunk_over_once() {
        for threads in [1, 2, 3] {
            let w = Workers::new(threads).unwrap();
            for (n, chunk) in [(0, 4), (5, 8), (100, 7), (64, 16), (1000, 1)] {
                let calls = AtomicUsize::new(0);
                // SAFETY: the closure writes every element of its chunk.
                let out = unsafe {
                    w.filled(n, chunk, |start, part| {
                        calls.fetch_add(1, Relaxed);
                        for (j, v) in part.iter_mut().enumerate() {
                            v.write((start + j) as f32 + 1.0);
                        }
                    })
                };
                assert_eq!(out.len(), n);
                let chunks = if n <= chunk || threads == 1 {
                    1
                } else {
                    n.div_ceil(chunk)
                };
                assert_eq!(calls.load(Relaxed), chunks, "{threads}/{n}/{chunk}");
                for (i, &v) in out.iter().enumerate() {
                    assert_eq!(v, i as f32 + 1.0, "element {i} ({threads}/{n}/{chunk})");
                }
            }
        }
    }

    #[test]
    fn a_task_panic_reaches_the_caller_after_the_others_finish() {
        let w = Workers::new(2).unwrap();
        let done = AtomicUsize::new(0);
        let r = panic::catch_unwind(AssertUnwindSafe(|| {
            w.run(16, |i| {
                if i == 5 {
                    panic!("task 5");
                }
                done.fetch_add(1, Relaxed);
            })
        }));
        assert!(r.is_err());
        assert_eq!(done.load(Relaxed), 15);
        // The team is usable afterwards.
        let n = AtomicUsize::new(0);
        w.run(10, |_| {
            n.fetch_add(1, Relaxed);
        });
        assert_eq!(n.load(Relaxed), 10);
    }

    #[test]
    fn concurrent_callers_each_finish() {
        let w = Arc::new(Workers::new(2).unwrap());
        std::thread::scope(|s| {
            for _ in 0..4 {
                let w = &w;
                s.spawn(move || {
                    for _ in 0..200 {
                        let n = AtomicUsize::new(0);
                        w.run(9, |_| {
                            n.fetch_add(1, Relaxed);
                        });
                        assert_eq!(n.load(Relaxed), 9);
                    }
                });
            }
        });
    }
}
