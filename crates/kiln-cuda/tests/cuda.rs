//! The CUDA backend against the f64 oracle: the whole conformance suite on
//! GPU 0 (`KILN_CUDA_DEVICE` picks another). Where the machine has no CUDA
//! driver, the suite is skipped — unless `KILN_REQUIRE_CUDA=1` (set by
//! ci/gpu.sh), which turns a missing GPU into a failure — and the backend's
//! refusal is itself tested.

use kiln_cuda::CudaBackend;

fn ordinal() -> usize {
    std::env::var("KILN_CUDA_DEVICE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One backend for the whole run (its kernels load once), or `None`.
fn gpu() -> Option<CudaBackend> {
    static GPU: std::sync::OnceLock<Option<CudaBackend>> = std::sync::OnceLock::new();
    GPU.get_or_init(|| match CudaBackend::new(ordinal()) {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(
                std::env::var("KILN_REQUIRE_CUDA").is_err(),
                "KILN_REQUIRE_CUDA is set but the CUDA backend failed: {e}"
            );
            None
        }
    })
    .clone()
}

#[test]
fn no_driver_is_a_clear_error_not_a_panic() {
    if kiln_cuda::device::driver_present() {
        return;
    }
    let e = CudaBackend::new(0).unwrap_err().to_string();
    assert!(
        e.contains("no CUDA driver found (libcuda.so.1)") && e.contains("--backend cpu"),
        "{e}"
    );
    let e = kiln_cuda::list_devices().unwrap_err().to_string();
    assert!(e.contains("no CUDA driver"), "{e}");
}

#[test]
fn a_missing_ordinal_is_named() {
    if gpu().is_none() {
        return;
    }
    let e = CudaBackend::new(4096).unwrap_err().to_string();
    assert!(e.contains("cuda:4096"), "{e}");
}

/// The steady state of a training step allocates nothing from the driver.
#[test]
fn repeated_steps_reuse_device_memory() {
    use kiln_core::{Backend, DType, HostData};
    if gpu().is_none() {
        return;
    }
    // Its own backend: the shared one's counters move with other tests.
    let b = CudaBackend::new(ordinal()).unwrap();
    let step = || {
        let x = b.upload(&HostData::F32(vec![1.0; 128 * 784])).unwrap();
        let y = b.full(128 * 64, DType::F32, 0.5).unwrap();
        drop((x, y));
    };
    step();
    let before = b.memory_stats().device_allocs;
    for _ in 0..50 {
        step();
    }
    assert_eq!(b.memory_stats().device_allocs, before);
}

kiln_conformance::suite!(optional: crate::gpu);
