//! Faults planted in the backend's host code (feature `planted-faults`),
//! so that a test can show the conformance suite on the emulated device
//! catches mistakes in the Rust launch code, not only in the kernels.

/// A mistake [`crate::CudaBackend::with_planted_fault`] makes on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `binary` passes its operands to the kernel swapped.
    SwappedBinaryOperands,
    /// GEMM launches one row of 128×128 tiles too few.
    ShortGemmGrid,
    /// The SIMT GEMM reads its operands with the row stride for columns.
    GemmColumnStride,
    /// Attention's backward launches pass no dropout (the forward pass's
    /// factors are not drawn again).
    AttentionBackwardWithoutDropout,
}

impl Fault {
    /// Every fault.
    pub const ALL: [Fault; 4] = [
        Fault::SwappedBinaryOperands,
        Fault::ShortGemmGrid,
        Fault::GemmColumnStride,
        Fault::AttentionBackwardWithoutDropout,
    ];

    /// The name the backend's code checks for.
    pub fn name(self) -> &'static str {
        match self {
            Fault::SwappedBinaryOperands => "swapped-binary-operands",
            Fault::ShortGemmGrid => "short-gemm-grid",
            Fault::GemmColumnStride => "gemm-column-stride",
            Fault::AttentionBackwardWithoutDropout => "attention-backward-without-dropout",
        }
    }
}
