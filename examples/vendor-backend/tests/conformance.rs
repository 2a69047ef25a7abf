//! The whole conformance suite on the pretend device: every op × dtype at
//! the default depth (edge and blocked tiers). Its declared-unsupported f16
//! convolutions are reported as skipped; everything else must pass.

kiln_conformance::suite!(|| kiln_vendor_example::PretendDevice::new().expect("a pretend device"));

/// The same device with the CPU fallback: the f16 convolutions run too.
mod with_fallback {
    kiln_conformance::suite!(|| kiln_vendor_example::PretendDevice::new()
        .expect("a pretend device")
        .with_fallback());
}
