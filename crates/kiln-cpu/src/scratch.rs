//! Per-thread scratch buffers for kernels' temporary copies (packed GEMM
//! panels, im2col columns), kept between calls.
//!
//! A fresh multi-megabyte `Vec` per call is fresh pages from the operating
//! system: every first write to each 4 KiB page is a fault, and on a 256³
//! GEMM those faults cost a third of the product's time. Each thread keeps
//! a few buffers instead; nested users (a kernel called from inside
//! another's closure) simply take the next one, or a new one.

use std::cell::RefCell;

/// Buffers a thread keeps between calls.
const KEPT: usize = 8;
/// Buffers larger than this (in floats: 64 MiB) go back to the allocator
/// rather than pinning their memory for the life of the thread.
const KEPT_MAX_LEN: usize = 16 << 20;

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch buffer of this thread (its contents and length
/// are unspecified: callers clear or resize it) and keeps the buffer for
/// the next call.
pub(crate) fn with<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    // The largest kept buffer: its user grows it to whatever it needs.
    with_at_least(usize::MAX, f)
}

/// [`with`], taking the kept buffer whose capacity fits `len` floats with
/// the least room to spare — or else the largest — so that users of
/// different sizes do not keep growing each other's buffers.
fn with_at_least<R>(len: usize, f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    let mut buf = FREE
        .try_with(|free| {
            let mut free = free.borrow_mut();
            let fits = |b: &Vec<f32>| b.capacity() >= len;
            let pick = (0..free.len())
                .filter(|&i| fits(&free[i]))
                .min_by_key(|&i| free[i].capacity())
                .or_else(|| (0..free.len()).max_by_key(|&i| free[i].capacity()));
            pick.map(|i| free.swap_remove(i))
        })
        .ok()
        .flatten()
        .unwrap_or_default();
    let result = f(&mut buf);
    if buf.capacity() <= KEPT_MAX_LEN {
        // A thread being torn down keeps nothing.
        let _ = FREE.try_with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < KEPT {
                free.push(buf);
            }
        });
    }
    result
}

/// Runs `f` with one of this thread's scratch buffers holding `len` floats
/// of whatever it held before (zeros where it grew): for callers that
/// write every element before reading any. An im2col buffer and a fresh
/// product are rewritten whole, and zeroing them first was 2–3 % of a CNN
/// epoch in `memset`.
pub(crate) fn sized<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_at_least(len, |buf| {
        if buf.len() < len {
            if buf.capacity() < len {
                // Its old contents are not needed: a new allocation, not a
                // reallocation that would copy them.
                *buf = Vec::with_capacity(len);
            }
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sized_buffer_has_the_length_asked_for_and_keeps_its_capacity() {
        sized(300, |b| {
            assert_eq!(b.len(), 300);
            b.fill(7.0);
        });
        sized(100, |b| assert_eq!(b.len(), 100));
        with(|b| assert!(b.capacity() >= 300, "the grown buffer was kept"));
    }

    #[test]
    fn a_sized_user_gets_a_kept_buffer_that_fits_without_growing_it() {
        // Keep a small and a large buffer (nested users hold both at once).
        let large = sized(10_000, |big| {
            sized(100, |_| ());
            big.as_ptr() as usize
        });
        // A request between the two takes the large one as it is.
        sized(5_000, |b| assert_eq!(b.as_ptr() as usize, large));
        // A small request takes the small one, leaving the large one kept.
        sized(50, |small| {
            assert_ne!(small.as_ptr() as usize, large);
            sized(8_000, |b| assert_eq!(b.as_ptr() as usize, large));
        });
    }

    #[test]
    fn a_buffer_is_reused_and_nested_users_get_their_own() {
        let first = with(|b| {
            b.resize(1000, 1.0);
            b.as_ptr() as usize
        });
        with(|outer| {
            assert_eq!(outer.as_ptr() as usize, first, "the kept buffer comes back");
            outer.push(2.0);
            with(|inner| {
                assert_ne!(inner.as_ptr() as usize, outer.as_ptr() as usize);
                inner.push(3.0);
            });
            assert_eq!(outer.last(), Some(&2.0));
        });
    }
}
