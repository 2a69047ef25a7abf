//! Mistakes in the CUDA backend's Rust host code — a swapped launcher
//! argument, a grid one tile row short, a wrong stride in a view — each
//! fail the conformance suite on the emulated device, which the clean
//! backend passes. (`cargo test -p kiln-cuda --features planted-faults
//! --test planted_host_faults`; CI runs it.)

use kiln_conformance::{run_check, Config, Status};
use kiln_core::DType;
use kiln_cuda::planted::Fault;
use kiln_cuda::CudaBackend;

/// The checks that must catch `fault`.
fn caught_by(fault: Fault) -> &'static [&'static str] {
    match fault {
        Fault::SwappedBinaryOperands => &["binary_sub", "binary_div"],
        Fault::ShortGemmGrid => &["gemm", "gemm_epilogue"],
        Fault::GemmColumnStride => &["gemm"],
        Fault::AttentionBackwardWithoutDropout => &["attention_causal_backward"],
    }
}

#[test]
fn every_planted_fault_fails_the_suite_and_the_clean_backend_passes() {
    let clean = match CudaBackend::emulated() {
        Ok(b) => b,
        Err(e) if std::env::var("KILN_REQUIRE_HOST_EMULATION").is_err() => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic!("the CUDA host emulation is required here: {e}"),
    };
    let cfg = Config::new("cuda (emulated)");
    for fault in Fault::ALL {
        let faulty = clean.clone().with_planted_fault(fault);
        for &op in caught_by(fault) {
            let good = run_check(&clean, op, DType::F32, &cfg);
            assert_eq!(
                good.status,
                Status::Pass,
                "{op} on the clean backend: {good:?}"
            );
            let bad = run_check(&faulty, op, DType::F32, &cfg);
            assert_eq!(
                bad.status,
                Status::Fail,
                "{fault:?} was not caught by {op}: {bad:?}"
            );
            eprintln!(
                "{fault:?}: {op} fails: {}",
                bad.failure.unwrap_or_default().lines().next().unwrap_or("")
            );
        }
    }
}
