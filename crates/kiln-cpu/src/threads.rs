//! Worker threads: how many, and splitting row-parallel work among them.

use kiln_core::{Error, Result};

/// The most worker threads a CPU backend accepts: 4 per core the process
/// may run on (oversubscription past that only costs memory and start-up
/// time — tens of thousands of threads stall a machine for minutes).
pub fn max_threads() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `n` if it is a usable thread count, else an error saying what is: at
/// least 1 and at most [`max_threads`]. `what` names the setting.
pub fn check(what: &str, n: usize) -> Result<usize> {
    let max = max_threads();
    if n == 0 || n > max {
        return Err(Error::invalid(format!(
            "{what} {n}: expected 1 to {max} worker threads (4 per core; this machine has {})",
            max / 4
        )));
    }
    Ok(n)
}

pub(crate) fn from_env() -> Result<usize> {
    match kiln_core::env::setting("KILN_THREADS")? {
        Some(v) => match v.parse::<usize>() {
            Ok(n) => check("KILN_THREADS=", n).map_err(|_| {
                Error::invalid(format!(
                    "KILN_THREADS={v:?}: expected 1 to {} worker threads (4 per core)",
                    max_threads()
                ))
            }),
            _ => Err(Error::invalid(format!(
                "KILN_THREADS={v:?} is not a positive whole number"
            ))),
        },
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

/// Runs `f(first_row, rows)` over `out`, cut into whole rows of `row_len`
/// and shared among up to `threads` scoped threads. Each row is computed by
/// exactly one call, the same way whatever the split, so results are
/// independent of the thread count. `work` is the cost of the whole job in
/// multiply-adds; small jobs stay on the calling thread. A worker thread
/// the operating system refuses to start is an error (the rows already
/// handed out finish first), not a panic.
pub(crate) fn for_rows<T: Send>(
    out: &mut [T],
    row_len: usize,
    threads: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Result<()> {
    const MIN_WORK_PER_THREAD: usize = 1 << 16;
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    let threads = threads.min(rows).min(work / MIN_WORK_PER_THREAD).max(1);
    if threads == 1 || row_len == 0 {
        f(0, out);
        return Ok(());
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            std::thread::Builder::new()
                .name(format!("kiln-cpu-rows-{i}"))
                .spawn_scoped(s, move || f(i * per, chunk))
                .map_err(|e| {
                    Error::Backend(format!(
                        "starting CPU worker thread {} of {threads}: {e} \
                         (fewer with --threads or KILN_THREADS)",
                        i + 1
                    ))
                })?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_computed_once_whatever_the_split() {
        for threads in [1, 2, 3, 7] {
            let mut out = vec![0usize; 10 * 4];
            for_rows(&mut out, 4, threads, usize::MAX, |first, rows| {
                for (r, row) in rows.chunks_mut(4).enumerate() {
                    row.iter_mut().for_each(|v| *v += first + r + 1);
                }
            })
            .unwrap();
            let want: Vec<usize> = (0..10).flat_map(|r| [r + 1; 4]).collect();
            assert_eq!(out, want, "{threads} threads");
        }
    }
}
