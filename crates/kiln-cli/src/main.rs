//! `kiln`: train, evaluate and inspect models from the command line.

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    kiln_cli::main()
}

/// A training step allocates and frees the same tensor sizes over and
/// over. By default glibc hands blocks over 128 KiB to `mmap` and gives
/// them back on free, so every step faults in (and zeroes) fresh pages;
/// keeping freed memory in the heap for reuse makes those steps a third
/// faster. Elsewhere the system allocator's defaults stand.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; it is
    // called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
