//! Thread count and the deterministic row-parallel loop.

use kiln_core::{Error, Result};

/// Threads from `KILN_THREADS`, or all available cores.
pub(crate) fn from_env() -> Result<usize> {
    match std::env::var("KILN_THREADS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::invalid(format!(
                "KILN_THREADS={v:?} is not a positive whole number"
            ))),
        },
        Err(_) => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

/// Runs `f(first_row, rows)` over `out`, cut into whole rows of `row_len`
/// and shared among up to `threads` scoped threads. Each row is computed by
/// exactly one call, the same way whatever the split, so results are
/// independent of the thread count. `work` is the cost of the whole job in
/// multiply-adds; small jobs stay on the calling thread.
pub(crate) fn for_rows<T: Send>(
    out: &mut [T],
    row_len: usize,
    threads: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    const MIN_WORK_PER_THREAD: usize = 1 << 16;
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    let threads = threads.min(rows).min(work / MIN_WORK_PER_THREAD).max(1);
    if threads == 1 || row_len == 0 {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}
