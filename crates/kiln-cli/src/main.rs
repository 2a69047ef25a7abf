//! `kiln`: train, evaluate and inspect models from the command line.

fn main() -> std::process::ExitCode {
    kiln_cli::main()
}
