//! Why a SIMD kernel set sent a call to the scalar reference loops: the
//! reasons [`CpuBackend::slow_paths`](kiln_core::Backend::slow_paths)
//! counts under.
//!
//! The vector paths take contiguous operands of one float type (a bias
//! broadcast over rows counts as contiguous); everything else runs the
//! reference loops, with the same results but without SIMD.

use kiln_core::{DType, HostData, ReduceOp, View};

/// A strided operand (transposed, sliced with steps, broadcast).
pub(crate) const STRIDED: &str = "strided operand: scalar loops";
/// An integer operand.
pub(crate) const INTEGER: &str = "u32 operand: scalar loops";
/// Anything else the vector path does not cover.
pub(crate) const OTHER: &str = "case without a vector kernel: scalar loops";

/// The reason the vector path declined an elementwise, softmax or cast
/// call on `operands`.
pub(crate) fn reason(operands: &[View<'_, HostData>]) -> &'static str {
    let strided = operands
        .iter()
        .any(|v| v.layout.contiguous_range().is_none());
    if strided {
        STRIDED
    } else if operands.iter().any(|v| v.storage.dtype() == DType::U32) {
        INTEGER
    } else {
        OTHER
    }
}

/// The reason the vector path declined a reduction.
pub(crate) fn reduce_reason(op: ReduceOp, x: View<'_, HostData>, axes: &[usize]) -> &'static str {
    if matches!(op, ReduceOp::Max | ReduceOp::Min) {
        return "max/min reduction: scalar loops";
    }
    match reason(&[x]) {
        OTHER if !axes.is_empty() => "axes neither leading nor trailing: scalar loops",
        r => r,
    }
}
