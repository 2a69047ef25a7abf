//! `pretend-device`: kiln's whole command line for the pretend device.
//!
//! `pretend-device conformance`, `pretend-device train --model mlp`, …;
//! `PRETEND_FAULT` plants a fault (see `kiln_vendor_example::Fault`).

fn main() -> std::process::ExitCode {
    kiln_cli::run_with(kiln_vendor_example::PretendDevice::from_env)
}
