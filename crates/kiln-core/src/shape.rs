//! Shapes: the extents of a tensor's dimensions, and broadcasting between them.
//!
//! ```
//! use kiln_core::Shape;
//!
//! let a = Shape::new(&[4, 1, 3])?;
//! assert_eq!((a.rank(), a.numel()), (3, 12));
//! assert_eq!(a.contiguous_strides(), [3, 3, 1]);
//! // Broadcasting aligns trailing axes; extents of 1 stretch.
//! let b = Shape::new(&[5, 1])?;
//! assert_eq!(Shape::broadcast("add", &a, &b)?.dims(), [4, 5, 3]);
//! assert!(Shape::broadcast("add", &a, &Shape::new(&[2])?).is_err());
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Largest element count a tensor may have: every byte offset of an 8-byte
/// element must fit in an `isize`, so pointer arithmetic never overflows.
pub const MAX_NUMEL: usize = (isize::MAX as usize) / 8;

/// The dimensions of a tensor, outermost first. A rank-0 shape is a scalar.
///
/// A `Shape` always has an element count that fits in [`MAX_NUMEL`]; the
/// constructor checks it, so arithmetic on a valid shape never overflows.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "Vec<usize>", into = "Vec<usize>")]
pub struct Shape {
    dims: Vec<usize>,
}

impl Shape {
    /// Builds a shape, rejecting element counts over [`MAX_NUMEL`]. Extents
    /// of 0 count as 1 in that check, so strides never overflow either.
    pub fn new(dims: &[usize]) -> Result<Self> {
        let mut n: usize = 1;
        for &d in dims {
            n = n
                .checked_mul(d.max(1))
                .filter(|&n| n <= MAX_NUMEL)
                .ok_or_else(|| {
                    Error::shape(
                        "shape",
                        format!("{dims:?} has more than {MAX_NUMEL} elements"),
                    )
                })?;
        }
        Ok(Shape {
            dims: dims.to_vec(),
        })
    }

    /// The scalar shape `[]`.
    pub fn scalar() -> Self {
        Shape { dims: Vec::new() }
    }

    /// The extents, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    /// The number of elements (1 for a scalar, 0 if any extent is 0).
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The extent of dimension `axis`, or an error naming the rank.
    pub fn dim(&self, axis: usize) -> Result<usize> {
        self.dims.get(axis).copied().ok_or_else(|| {
            Error::invalid(format!(
                "axis {axis} is out of range for a tensor of shape {self}"
            ))
        })
    }

    /// Row-major (C-order) strides, in elements.
    pub fn contiguous_strides(&self) -> Vec<usize> {
        let mut strides = vec![0; self.rank()];
        let mut acc = 1;
        for (s, &d) in strides.iter_mut().zip(&self.dims).rev() {
            *s = acc;
            acc *= d;
        }
        strides
    }

    /// The NumPy broadcast of two shapes: dimensions are aligned from the
    /// right, and each pair must be equal or contain a 1.
    pub fn broadcast(op: &'static str, a: &Shape, b: &Shape) -> Result<Shape> {
        let rank = a.rank().max(b.rank());
        let mut dims = vec![0; rank];
        for (i, d) in dims.iter_mut().enumerate() {
            let da = dim_from_right(a, rank - 1 - i);
            let db = dim_from_right(b, rank - 1 - i);
            *d = match (da, db) {
                (x, y) if x == y => x,
                (1, y) => y,
                (x, 1) => x,
                _ => {
                    return Err(Error::shape(
                        op,
                        format!("shapes {a} and {b} cannot be broadcast together"),
                    ))
                }
            };
        }
        Shape::new(&dims)
    }
}

fn dim_from_right(s: &Shape, i: usize) -> usize {
    if i < s.rank() {
        s.dims[s.rank() - 1 - i]
    } else {
        1
    }
}

impl TryFrom<Vec<usize>> for Shape {
    type Error = Error;
    fn try_from(dims: Vec<usize>) -> Result<Self> {
        Shape::new(&dims)
    }
}

impl From<Shape> for Vec<usize> {
    fn from(s: Shape) -> Self {
        s.dims
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.dims)
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Shape{:?}", self.dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numel_and_strides() {
        let s = Shape::new(&[2, 3, 4]).unwrap();
        assert_eq!(s.numel(), 24);
        assert_eq!(s.contiguous_strides(), vec![12, 4, 1]);
        assert_eq!(Shape::scalar().numel(), 1);
        assert_eq!(Shape::new(&[3, 0, 2]).unwrap().numel(), 0);
    }

    #[test]
    fn overflow_is_an_error() {
        assert!(Shape::new(&[usize::MAX, 2]).is_err());
        assert!(Shape::new(&[1 << 40, 1 << 40]).is_err());
        // An empty shape still has strides, and they must not overflow (found by fuzzing).
        assert!(Shape::new(&[0, 1 << 40, 1 << 40]).is_err());
        // An empty shape still has strides, and they must not overflow.
        assert!(Shape::new(&[0, 1 << 40, 1 << 40]).is_err());
    }

    #[test]
    fn broadcast_rules() {
        let s = |d: &[usize]| Shape::new(d).unwrap();
        assert_eq!(
            Shape::broadcast("t", &s(&[4, 1, 3]), &s(&[5, 1])).unwrap(),
            s(&[4, 5, 3])
        );
        assert_eq!(Shape::broadcast("t", &s(&[]), &s(&[2])).unwrap(), s(&[2]));
        assert_eq!(
            Shape::broadcast("t", &s(&[0, 1]), &s(&[1, 3])).unwrap(),
            s(&[0, 3])
        );
        let e = Shape::broadcast("add", &s(&[2, 3]), &s(&[4])).unwrap_err();
        assert!(e.to_string().contains("[2, 3] and [4]"), "{e}");
    }
}
