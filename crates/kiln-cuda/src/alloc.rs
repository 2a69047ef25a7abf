//! The caching allocator: device memory is requested from the driver once
//! and then recycled, so the training steady state makes no `cuMemAlloc`
//! calls (each one synchronises the device).
//!
//! Requests are rounded up to a size class — multiples of 512 B up to
//! 1 MiB, then multiples of 2 MiB — and a freed block waits in its class's
//! free list for the next request of that class. A request that misses the
//! cache and fails for lack of memory first returns every cached block to
//! the driver and tries once more. The policy is generic over
//! [`RawMemory`], so it is tested on the CPU with a fake device.
//!
//! ```
//! use kiln_cuda::alloc::{size_class, LARGE_GRANULE, SMALL_GRANULE};
//!
//! // Small requests round up to 512 B, large ones to 2 MiB; zero bytes still get a block.
//! assert_eq!(size_class(0), SMALL_GRANULE);
//! assert_eq!(size_class(1000), 1024);
//! assert_eq!(size_class(3 << 20), 2 * LARGE_GRANULE);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_core::{Error, Result};

/// Requests up to this size round to multiples of [`SMALL_GRANULE`].
pub const SMALL_LIMIT: usize = 1 << 20;
/// The rounding of small requests (also every block's alignment unit).
pub const SMALL_GRANULE: usize = 512;
/// The rounding of large requests.
pub const LARGE_GRANULE: usize = 2 << 20;

/// The size class a request of `bytes` is served from (at least one granule,
/// so zero-sized tensors still get a distinct, valid pointer).
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    let granule = if bytes <= SMALL_LIMIT {
        SMALL_GRANULE
    } else {
        LARGE_GRANULE
    };
    bytes.div_ceil(granule) * granule
}

/// What the allocator asks the device for.
pub trait RawMemory: Send + Sync + 'static {
    /// Allocates `bytes`; an out-of-memory failure is
    /// [`RawError::OutOfMemory`].
    fn alloc(&self, bytes: usize) -> std::result::Result<u64, RawError>;
    /// Returns an allocation made by [`RawMemory::alloc`].
    fn free(&self, ptr: u64, bytes: usize);
    /// Free and total device memory, for error messages.
    fn mem_info(&self) -> Option<(usize, usize)>;
}

impl RawMemory for Box<dyn RawMemory> {
    fn alloc(&self, bytes: usize) -> std::result::Result<u64, RawError> {
        (**self).alloc(bytes)
    }
    fn free(&self, ptr: u64, bytes: usize) {
        (**self).free(ptr, bytes)
    }
    fn mem_info(&self) -> Option<(usize, usize)> {
        (**self).mem_info()
    }
}

/// Why the device refused an allocation.
#[derive(Debug)]
pub enum RawError {
    /// Not enough memory.
    OutOfMemory,
    /// Anything else, described.
    Other(String),
}

/// Counters, for tests, benchmarks and `kiln info`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Allocations made from the device.
    pub device_allocs: u64,
    /// Requests served from the cache.
    pub reuses: u64,
    /// Bytes in blocks handed out and not yet dropped.
    pub bytes_in_use: usize,
    /// Bytes held in free lists.
    pub bytes_cached: usize,
    /// Bytes allocated from the device and not yet returned to it.
    pub bytes_reserved: usize,
}

struct State {
    free: HashMap<usize, Vec<u64>>,
    stats: Stats,
}

/// A caching allocator over one device's memory.
pub struct Allocator<M: RawMemory> {
    raw: M,
    state: Mutex<State>,
}

/// A block of device memory; dropping it returns it to its allocator's cache.
pub struct Block<M: RawMemory> {
    ptr: u64,
    class: usize,
    owner: Arc<Allocator<M>>,
}

impl<M: RawMemory> Block<M> {
    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The usable size (the size class, at least what was asked for).
    pub fn bytes(&self) -> usize {
        self.class
    }
}

impl<M: RawMemory> Drop for Block<M> {
    fn drop(&mut self) {
        self.owner.give_back(self.ptr, self.class);
    }
}

impl<M: RawMemory> std::fmt::Debug for Block<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Block({:#x}, {} B)", self.ptr, self.class)
    }
}

fn mib(bytes: usize) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

impl<M: RawMemory> Allocator<M> {
    /// An allocator drawing from `raw`.
    pub fn new(raw: M) -> Arc<Self> {
        Arc::new(Allocator {
            raw,
            state: Mutex::new(State {
                free: HashMap::new(),
                stats: Stats::default(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the lists consistent (every
        // update is a single push, pop or counter change).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A block of at least `bytes`, for op `op` (named in errors).
    pub fn alloc(self: &Arc<Self>, op: &str, bytes: usize) -> Result<Block<M>> {
        let class = size_class(bytes);
        {
            let mut s = self.lock();
            if let Some(ptr) = s.free.get_mut(&class).and_then(Vec::pop) {
                s.stats.reuses += 1;
                s.stats.bytes_cached -= class;
                s.stats.bytes_in_use += class;
                return Ok(self.block(ptr, class));
            }
        }
        let ptr = match self.raw.alloc(class) {
            Ok(p) => p,
            Err(RawError::OutOfMemory) => {
                // Give the cache back and try once more.
                self.release_cached();
                match self.raw.alloc(class) {
                    Ok(p) => p,
                    Err(RawError::OutOfMemory) => {
                        let free = self
                            .raw
                            .mem_info()
                            .map(|(free, _)| format!(", {} free", mib(free)))
                            .unwrap_or_default();
                        return Err(Error::Backend(format!(
                            "{op}: out of device memory: requested {}{free} (kiln holds {} in tensors); \
                             use a smaller batch or model",
                            mib(class),
                            mib(self.stats().bytes_in_use)
                        )));
                    }
                    Err(RawError::Other(e)) => {
                        return Err(Error::Backend(format!("{op}: allocating {class} B: {e}")))
                    }
                }
            }
            Err(RawError::Other(e)) => {
                return Err(Error::Backend(format!("{op}: allocating {class} B: {e}")))
            }
        };
        let mut s = self.lock();
        s.stats.device_allocs += 1;
        s.stats.bytes_in_use += class;
        s.stats.bytes_reserved += class;
        Ok(self.block(ptr, class))
    }

    fn block(self: &Arc<Self>, ptr: u64, class: usize) -> Block<M> {
        Block {
            ptr,
            class,
            owner: Arc::clone(self),
        }
    }

    fn give_back(&self, ptr: u64, class: usize) {
        let mut s = self.lock();
        s.stats.bytes_in_use -= class;
        s.stats.bytes_cached += class;
        s.free.entry(class).or_default().push(ptr);
    }

    /// Returns every cached block to the device.
    pub fn release_cached(&self) {
        let blocks: Vec<(usize, u64)> = {
            let mut s = self.lock();
            let blocks = s
                .free
                .drain()
                .flat_map(|(class, ptrs)| ptrs.into_iter().map(move |p| (class, p)))
                .collect::<Vec<_>>();
            let bytes: usize = blocks.iter().map(|(c, _)| c).sum();
            s.stats.bytes_cached -= bytes;
            s.stats.bytes_reserved -= bytes;
            blocks
        };
        for (class, ptr) in blocks {
            self.raw.free(ptr, class);
        }
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.lock().stats
    }
}

impl<M: RawMemory> Drop for Allocator<M> {
    fn drop(&mut self) {
        self.release_cached();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// A device with `capacity` bytes that hands out increasing addresses.
    struct Fake {
        capacity: usize,
        used: AtomicUsize,
        next: AtomicU64,
        frees: AtomicU64,
    }

    impl Fake {
        fn new(capacity: usize) -> Self {
            Fake {
                capacity,
                used: AtomicUsize::new(0),
                next: AtomicU64::new(0x1000_0000),
                frees: AtomicU64::new(0),
            }
        }
    }

    impl RawMemory for Fake {
        fn alloc(&self, bytes: usize) -> std::result::Result<u64, RawError> {
            if self.used.load(Ordering::SeqCst) + bytes > self.capacity {
                return Err(RawError::OutOfMemory);
            }
            self.used.fetch_add(bytes, Ordering::SeqCst);
            Ok(self.next.fetch_add(bytes as u64, Ordering::SeqCst))
        }
        fn free(&self, _ptr: u64, bytes: usize) {
            self.used.fetch_sub(bytes, Ordering::SeqCst);
            self.frees.fetch_add(1, Ordering::SeqCst);
        }
        fn mem_info(&self) -> Option<(usize, usize)> {
            Some((
                self.capacity - self.used.load(Ordering::SeqCst),
                self.capacity,
            ))
        }
    }

    #[test]
    fn size_classes_round_up() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(SMALL_LIMIT), SMALL_LIMIT);
        assert_eq!(size_class(SMALL_LIMIT + 1), LARGE_GRANULE);
        assert_eq!(size_class(5 << 20), 6 << 20);
    }

    /// A training step's allocations, repeated: after the first step every
    /// request is served from the cache.
    #[test]
    fn the_steady_state_allocates_nothing_from_the_device() {
        let a = Allocator::new(Fake::new(1 << 30));
        let step = |a: &Arc<Allocator<Fake>>| {
            let sizes = [
                128 * 784 * 4,
                128 * 64 * 4,
                64 * 4,
                128 * 10 * 4,
                784 * 64 * 4,
                0,
            ];
            let blocks: Vec<_> = sizes.iter().map(|&s| a.alloc("step", s).unwrap()).collect();
            for (b, &s) in blocks.iter().zip(&sizes) {
                assert!(b.bytes() >= s);
                assert_eq!(b.ptr() % SMALL_GRANULE as u64, 0);
            }
            drop(blocks);
        };
        step(&a);
        let after_first = a.stats();
        assert_eq!(after_first.device_allocs, 6);
        for _ in 0..100 {
            step(&a);
        }
        let s = a.stats();
        assert_eq!(s.device_allocs, 6, "{s:?}");
        assert_eq!(s.reuses, 600);
        assert_eq!(s.bytes_in_use, 0);
        assert_eq!(s.bytes_cached, s.bytes_reserved);
    }

    #[test]
    fn live_blocks_are_distinct_and_reuse_is_per_class() {
        let a = Allocator::new(Fake::new(1 << 30));
        let x = a.alloc("t", 1000).unwrap();
        let y = a.alloc("t", 1000).unwrap();
        assert_ne!(x.ptr(), y.ptr());
        let px = x.ptr();
        drop(x);
        // Another class does not take the cached block; the same class does.
        let z = a.alloc("t", 100_000).unwrap();
        assert_ne!(z.ptr(), px);
        let w = a.alloc("t", 900).unwrap();
        assert_eq!(w.ptr(), px);
    }

    /// Memory cached in one class is released when another class runs out
    /// (fragmentation across classes does not cause an out-of-memory), and
    /// a real shortage is an error that names the op and the sizes.
    #[test]
    fn a_full_device_releases_the_cache_then_reports_clearly() {
        let a = Allocator::new(Fake::new(8 << 20));
        let blocks: Vec<_> = (0..3).map(|_| a.alloc("t", 2 << 20).unwrap()).collect();
        drop(blocks);
        assert_eq!(a.stats().bytes_cached, 6 << 20);
        // 4 MiB fits only once the cached 2 MiB blocks are returned.
        let big = a.alloc("t", 4 << 20).unwrap();
        let s = a.stats();
        assert_eq!((s.bytes_cached, s.bytes_in_use), (0, 4 << 20));
        let e = a.alloc("gemm", 6 << 20).unwrap_err().to_string();
        assert!(
            e.contains("gemm: out of device memory: requested 6 MiB, 4 MiB free"),
            "{e}"
        );
        drop(big);
    }

    #[test]
    fn dropping_the_allocator_returns_everything() {
        let fake = Arc::new(Fake::new(1 << 30));
        struct Shared(Arc<Fake>);
        impl RawMemory for Shared {
            fn alloc(&self, b: usize) -> std::result::Result<u64, RawError> {
                self.0.alloc(b)
            }
            fn free(&self, p: u64, b: usize) {
                self.0.free(p, b)
            }
            fn mem_info(&self) -> Option<(usize, usize)> {
                self.0.mem_info()
            }
        }
        let a = Allocator::new(Shared(Arc::clone(&fake)));
        let b1 = a.alloc("t", 10).unwrap();
        let b2 = a.alloc("t", 3 << 20).unwrap();
        drop((b1, b2));
        drop(a);
        assert_eq!(fake.used.load(Ordering::SeqCst), 0);
        assert_eq!(fake.frees.load(Ordering::SeqCst), 2);
    }
}
