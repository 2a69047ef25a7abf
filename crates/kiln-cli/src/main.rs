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
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    kiln_cli::main()
}
