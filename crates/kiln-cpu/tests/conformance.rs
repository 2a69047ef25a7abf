//! The whole conformance suite (every op × dtype, and the gradient checks)
//! on the scalar reference kernels.

kiln_conformance::suite!(
    || kiln_cpu::CpuBackend::with_kernels(kiln_cpu::KernelSet::Scalar)
        .expect("scalar kernels are always available")
);
