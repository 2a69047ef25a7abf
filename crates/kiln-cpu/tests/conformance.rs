//! The whole conformance suite (every op × dtype, and the gradient checks)
//! on every kernel set, each forced on its own. A set this processor lacks
//! is skipped, unless `KILN_REQUIRE_KERNELS` (comma-separated, e.g.
//! `avx2,avx512`) names it — CI sets it so nothing is silently skipped there.

use kiln_cpu::{CpuBackend, KernelSet};

fn backend(set: KernelSet) -> Option<CpuBackend> {
    let required = std::env::var("KILN_REQUIRE_KERNELS").unwrap_or_default();
    match CpuBackend::with_kernels(set) {
        Ok(b) => Some(b),
        Err(e) if required.split(',').any(|r| r.trim() == set.name()) => panic!("{e}"),
        Err(_) => None,
    }
}

/// The reference set, written as the README shows a backend crate doing it.
mod scalar {
    use kiln_cpu::CpuBackend;
    kiln_conformance::suite!(CpuBackend::reference);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    kiln_conformance::suite!(optional: || crate::backend(kiln_cpu::KernelSet::Avx2));
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    kiln_conformance::suite!(optional: || crate::backend(kiln_cpu::KernelSet::Avx512));
}

#[cfg(target_arch = "aarch64")]
mod neon {
    kiln_conformance::suite!(optional: || crate::backend(kiln_cpu::KernelSet::Neon));
}

#[test]
fn the_chosen_kernel_set_is_the_best_available() {
    let best = KernelSet::best();
    assert!(best.available());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert_eq!(best, KernelSet::Avx512);
    }
    #[cfg(target_arch = "aarch64")]
    assert_eq!(best, KernelSet::Neon);
}
