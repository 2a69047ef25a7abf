//! 2-D windows over NCHW tensors: the geometry shared by convolution and
//! pooling, and the shape rules every backend checks the same way.
//!
//! ```
//! use kiln_core::Window2d;
//!
//! // A 3×3 window with no padding ("valid") shrinks a 28×28 image by 2.
//! assert_eq!(Window2d::valid([3, 3], [1, 1]).output("conv2d", [28, 28])?, [26, 26]);
//! // "same" pads so a stride-2 window gives ⌈28 / 2⌉ = 14 cells per axis.
//! let same = Window2d::same([3, 3], [2, 2], [28, 28]);
//! assert_eq!(same.output("conv2d", [28, 28])?, [14, 14]);
//! // A window larger than the padded image is an error, not an empty output.
//! assert!(Window2d::valid([5, 5], [1, 1]).output("conv2d", [3, 3]).is_err());
//! # Ok::<(), kiln_core::Error>(())
//! ```

use crate::{Error, Result};

/// Where a window of `kernel` cells visits an image: every `stride` cells,
/// over the image padded by `padding` = `[top, bottom, left, right]` cells
/// (zeros for a convolution, −∞ for max-pooling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window2d {
    /// Window height and width.
    pub kernel: [usize; 2],
    /// Step between windows, vertically and horizontally.
    pub stride: [usize; 2],
    /// Padding: top, bottom, left, right.
    pub padding: [usize; 4],
}

impl Window2d {
    /// No padding: windows only where they fit (Keras' `valid`).
    pub fn valid(kernel: [usize; 2], stride: [usize; 2]) -> Self {
        Window2d {
            kernel,
            stride,
            padding: [0; 4],
        }
    }

    /// Padding so that the output has `⌈input/stride⌉` cells per axis, the
    /// odd cell going to the bottom/right (Keras' and TensorFlow's `same`).
    pub fn same(kernel: [usize; 2], stride: [usize; 2], input: [usize; 2]) -> Self {
        let pad = |i: usize| {
            let s = stride[i].max(1);
            let out = input[i].div_ceil(s);
            let total = ((out.saturating_sub(1)) * s + kernel[i]).saturating_sub(input[i]);
            [total / 2, total - total / 2]
        };
        let ([t, b], [l, r]) = (pad(0), pad(1));
        Window2d {
            kernel,
            stride,
            padding: [t, b, l, r],
        }
    }

    /// The output height and width for an `input` of `[h, w]`, or an error
    /// if the window is empty, the stride zero, the padding at least the
    /// window, or the window larger than the padded input.
    pub fn output(&self, op: &'static str, input: [usize; 2]) -> Result<[usize; 2]> {
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [pt, pb, pl, pr] = self.padding;
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 {
            return Err(Error::invalid(format!(
                "{op}: window {kh}×{kw} with stride {sh}×{sw}: extents and strides must be at least 1"
            )));
        }
        if pt.max(pb) >= kh || pl.max(pr) >= kw {
            return Err(Error::invalid(format!(
                "{op}: padding {:?} must be smaller than the {kh}×{kw} window",
                self.padding
            )));
        }
        let axis = |n: usize, lo: usize, hi: usize, k: usize, s: usize, name: &str| {
            let padded = n.checked_add(lo).and_then(|v| v.checked_add(hi));
            match padded {
                Some(p) if p >= k => Ok((p - k) / s + 1),
                _ => Err(Error::shape(
                    op,
                    format!(
                        "the input's {name} {n} (padded by {lo}+{hi}) is smaller than the window's {k}"
                    ),
                )),
            }
        };
        Ok([
            axis(input[0], pt, pb, kh, sh, "height")?,
            axis(input[1], pl, pr, kw, sw, "width")?,
        ])
    }
}

/// Checks a convolution's operands — input `[n, c, h, w]`, weight
/// `[o, c, kh, kw]` matching the window, bias `[o]` if any — and returns
/// the output shape `[n, o, oh, ow]`.
pub fn conv2d_output(
    x: &[usize],
    weight: &[usize],
    bias: Option<&[usize]>,
    window: &Window2d,
) -> Result<[usize; 4]> {
    let (&[n, c, h, w], &[o, wc, kh, kw]) = (x, weight) else {
        return Err(Error::shape(
            "conv2d",
            format!(
                "expected input [n, c, h, w] and weight [o, c, kh, kw], got {x:?} and {weight:?}"
            ),
        ));
    };
    if wc != c {
        return Err(Error::shape(
            "conv2d",
            format!("the input has {c} channels, the weight expects {wc}"),
        ));
    }
    if [kh, kw] != window.kernel {
        return Err(Error::shape(
            "conv2d",
            format!(
                "the weight's window is {kh}×{kw}, the geometry's {:?}",
                window.kernel
            ),
        ));
    }
    if let Some(b) = bias {
        if b != [o] {
            return Err(Error::shape(
                "conv2d",
                format!("bias has shape {b:?}, expected [{o}]"),
            ));
        }
    }
    let [oh, ow] = window.output("conv2d", [h, w])?;
    Ok([n, o, oh, ow])
}

/// Checks a max-pool's input `[n, c, h, w]` and returns the output shape
/// `[n, c, oh, ow]`.
pub fn pool2d_output(x: &[usize], window: &Window2d) -> Result<[usize; 4]> {
    let &[n, c, h, w] = x else {
        return Err(Error::shape(
            "max_pool2d",
            format!("expected input [n, c, h, w], got {x:?}"),
        ));
    };
    let [oh, ow] = window.output("max_pool2d", [h, w])?;
    Ok([n, c, oh, ow])
}

/// Checks a convolution's input-gradient operands — `dy` `[n, o, oh, ow]`,
/// the output of convolving an input of `input = [h, w]` with `weight`
/// `[o, c, kh, kw]` — and returns the input gradient's shape `[n, c, h, w]`.
pub fn conv2d_backward_data_shape(
    dy: &[usize],
    weight: &[usize],
    window: &Window2d,
    input: [usize; 2],
) -> Result<[usize; 4]> {
    let op = "conv2d_backward_data";
    let (&[_, c, _, _], &[n, ..]) = (weight, dy) else {
        return Err(Error::shape(
            op,
            format!(
                "expected dy [n, o, oh, ow] and weight [o, c, kh, kw], got {dy:?} and {weight:?}"
            ),
        ));
    };
    let out = conv2d_output(&[n, c, input[0], input[1]], weight, None, window)?;
    if dy != out {
        return Err(Error::shape(
            op,
            format!("dy has shape {dy:?}, the convolution's output is {out:?}"),
        ));
    }
    Ok([n, c, input[0], input[1]])
}

/// Checks a convolution's filter-gradient operands — `x` `[n, c, h, w]`
/// and `dy` `[n, o, oh, ow]`, the output of convolving `x` over `window` —
/// and returns the convolution's output shape `[n, o, oh, ow]`.
pub fn conv2d_backward_filter_shape(
    x: &[usize],
    dy: &[usize],
    window: &Window2d,
) -> Result<[usize; 4]> {
    let op = "conv2d_backward_filter";
    let (&[n, _, h, w], &[dn, o, dyh, dyw]) = (x, dy) else {
        return Err(Error::shape(
            op,
            format!("expected x [n, c, h, w] and dy [n, o, oh, ow], got {x:?} and {dy:?}"),
        ));
    };
    let [oh, ow] = window.output(op, [h, w])?;
    if [dn, dyh, dyw] != [n, oh, ow] {
        return Err(Error::shape(
            op,
            format!("dy has shape {dy:?}, the convolution's output is [{n}, {o}, {oh}, {ow}]"),
        ));
    }
    Ok([n, o, oh, ow])
}

/// Checks a max-pool gradient's operands — `dy` and `argmax`, both the
/// output of pooling an input of `input = [h, w]` — and returns that
/// output's shape `[n, c, oh, ow]`.
pub fn pool2d_backward_shape(
    dy: &[usize],
    argmax: &[usize],
    window: &Window2d,
    input: [usize; 2],
) -> Result<[usize; 4]> {
    let op = "max_pool2d_backward";
    let &[n, c, _, _] = dy else {
        return Err(Error::shape(
            op,
            format!("expected dy [n, c, oh, ow], got {dy:?}"),
        ));
    };
    let out = pool2d_output(&[n, c, input[0], input[1]], window)?;
    if dy != out || argmax != out {
        return Err(Error::shape(
            op,
            format!("dy {dy:?} and argmax {argmax:?} must both be the pool's output {out:?}"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_same_geometry_match_keras() {
        let v = Window2d::valid([3, 3], [1, 1]);
        assert_eq!(v.output("t", [28, 28]).unwrap(), [26, 26]);
        let p = Window2d::valid([2, 2], [2, 2]);
        assert_eq!(p.output("t", [26, 26]).unwrap(), [13, 13]);
        assert_eq!(p.output("t", [27, 27]).unwrap(), [13, 13]);
        let s = Window2d::same([3, 3], [1, 1], [28, 28]);
        assert_eq!(s.padding, [1, 1, 1, 1]);
        assert_eq!(s.output("t", [28, 28]).unwrap(), [28, 28]);
        // Even window, stride 2: TensorFlow puts the odd cell at the end.
        let s = Window2d::same([2, 2], [2, 2], [5, 5]);
        assert_eq!(s.padding, [0, 1, 0, 1]);
        assert_eq!(s.output("t", [5, 5]).unwrap(), [3, 3]);
    }

    #[test]
    fn bad_geometry_is_an_error() {
        assert!(Window2d::valid([0, 3], [1, 1]).output("t", [5, 5]).is_err());
        assert!(Window2d::valid([3, 3], [0, 1]).output("t", [5, 5]).is_err());
        assert!(Window2d::valid([3, 3], [1, 1]).output("t", [2, 5]).is_err());
        let mut w = Window2d::valid([3, 3], [1, 1]);
        w.padding = [3, 0, 0, 0];
        assert!(w.output("t", [5, 5]).is_err());
        let e = conv2d_output(
            &[1, 3, 8, 8],
            &[4, 1, 3, 3],
            None,
            &Window2d::valid([3, 3], [1, 1]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("3 channels"), "{e}");
    }
}
