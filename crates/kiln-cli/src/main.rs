//! `kiln`: train, evaluate and inspect models from the command line.

/// mimalloc keeps freed pages for reuse: a training step allocates and
/// frees the same tensor sizes over and over, which the system allocator
/// answers with fresh, zero-faulted pages each time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    kiln_cli::main()
}
