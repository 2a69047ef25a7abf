//! `kiln`: train, evaluate and inspect models from the command line.

/// The command line's allocator. A training step or a decoded token is
/// hundreds of ops, each allocating its result and some bookkeeping and
/// freeing its inputs' buffers; with glibc's allocator `malloc`, `free`
/// and their consolidation took 10–18 % of a decoding step (perf, the
/// config A GPT), and blocks over 128 KiB went back to the kernel on free
/// unless its thresholds were raised. mimalloc's per-thread free lists
/// took the tenth session's Xeon from 5,200 to 6,400 decoded tokens/s and
/// GPT training from 46 to 50 iterations/s (2 threads). It keeps more
/// memory mapped: peak RSS 70 → 115–133 MB for that GPT, 1,225 → 1,339 MB for
/// config B at batch 16, 130 → 208 MB for the seed CNN. Programs that
/// embed kiln's crates choose their own allocator.
///
/// Memory mimalloc purges is reset (`MADV_FREE`: the kernel takes it back
/// only when it needs it), not decommitted. Decommitted, the pages of a
/// batch freed on one thread came back as fresh pages on the next batch,
/// a fault and a cleared page each: about 1,100 faults per 10 epochs of
/// the seed MLP, 2.5 % of the training thread's samples in the kernel's
/// `clear_page` (Zen 4). Reset, the same 10 epochs fault 5 times and the
/// peak RSS is unchanged (106 MB). `MIMALLOC_PURGE_DECOMMITS` in the
/// environment still decides, when set.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_decommits` (the same index in its v2 and
/// v3 headers).
const MI_OPTION_PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;

fn main() -> std::process::ExitCode {
    // The environment's setting, if any, wins (mimalloc read it at load).
    if std::env::var_os("MIMALLOC_PURGE_DECOMMITS").is_none() {
        // SAFETY: `mi_option_set` is an unsynchronised store into mimalloc's
        // option table; this runs in `main` before kiln starts any thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DECOMMITS, 0) };
    }
    kiln_cli::main()
}
