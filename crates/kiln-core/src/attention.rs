//! Attention's building blocks: the default implementation of
//! [`Backend::softmax_causal`], composed from primitive ops.
//!
//! ```
//! use kiln_core::Tensor;
//! use kiln_cpu::CpuBackend;
//!
//! let b = CpuBackend::reference();
//! let scores = Tensor::from_slice(&[0.0; 9], &[3, 3], &b)?;
//! let p = scores.softmax_causal()?.to_vec_f32()?;
//! // Query 0 sees key 0 only; query 2 sees all three, equally.
//! assert_eq!(&p[..3], [1.0, 0.0, 0.0]);
//! for v in &p[6..] {
//!     assert!((v - 1.0 / 3.0).abs() < 1e-6);
//! }
//! # Ok::<(), kiln_core::Error>(())
//! ```

use crate::plan::CausalSoftmaxPlan;
use crate::{Backend, BinaryOp, DType, HostData, Layout, Result, Shape, View};

/// [`Backend::softmax_causal`] from primitive ops: an additive mask of 0
/// and −∞ (uploaded, broadcast over the leading axes), then the softmax, in
/// f32. The masked scores take part in the sum, so they must not be NaN
/// here (a backend's own kernel does not read them).
pub fn compose_softmax_causal<B: Backend>(b: &B, x: View<'_, B::Storage>) -> Result<B::Storage> {
    let plan = CausalSoftmaxPlan::new(x)?;
    let (t, s) = (plan.queries, plan.keys);
    let mask: Vec<f32> = (0..t * s)
        .map(|k| {
            if k % s < plan.visible(k / s) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = b.upload(&HostData::F32(mask))?;
    let dims = x.layout.dims();
    let full = Layout::contiguous(Shape::new(dims)?);
    let mut strides = vec![0; dims.len()];
    strides[dims.len() - 2] = s;
    strides[dims.len() - 1] = 1;
    let spread = Layout::new(Shape::new(dims)?, strides, 0)?;
    let xs = b.cast(x, DType::F32)?;
    let masked = b.binary(
        BinaryOp::Add,
        View::new(&xs, &full),
        View::new(&mask, &spread),
    )?;
    let y = b.softmax(View::new(&masked, &full), false)?;
    match plan.dtype {
        DType::F32 => Ok(y),
        d => b.cast(View::new(&y, &full), d),
    }
}
