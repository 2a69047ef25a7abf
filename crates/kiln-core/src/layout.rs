//! Strided layouts: how a tensor's logical elements map onto its storage.
//!
//! A [`Layout`] is a shape, one stride per dimension (in elements) and an
//! offset. Views — transpose, permute, narrow, broadcast, reshape of a
//! contiguous tensor — only build a new layout; no element moves.

use crate::{Error, Result, Shape};

/// Shape, strides and offset of a tensor within its storage.
///
/// Element `(i₀, …, iₙ)` lives at storage index `offset + Σ iₖ·strideₖ`.
/// A stride of 0 repeats an element (broadcasting).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    shape: Shape,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    /// The row-major layout of `shape`, starting at offset 0.
    pub fn contiguous(shape: Shape) -> Self {
        let strides = shape.contiguous_strides();
        Layout {
            shape,
            strides,
            offset: 0,
        }
    }

    /// A layout from its parts; the strides must match the rank.
    pub fn new(shape: Shape, strides: Vec<usize>, offset: usize) -> Result<Self> {
        if strides.len() != shape.rank() {
            return Err(Error::invalid(format!(
                "layout: {} strides for a shape of rank {}",
                strides.len(),
                shape.rank()
            )));
        }
        let l = Layout {
            shape,
            strides,
            offset,
        };
        l.span()?;
        Ok(l)
    }

    /// The logical shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The logical extents.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// Strides in elements, one per dimension.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Storage index of the first element.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }

    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// Whether the elements are row-major and gap-free (offset may be non-zero).
    /// Strides of dimensions of extent 1 do not matter.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.dims().iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// `Some(start..end)` of storage if the layout is contiguous.
    pub fn contiguous_range(&self) -> Option<std::ops::Range<usize>> {
        self.is_contiguous()
            .then(|| self.offset..self.offset + self.numel())
    }

    /// One past the largest storage index the layout touches (0 when empty).
    /// Errors if that index overflows.
    pub fn span(&self) -> Result<usize> {
        if self.numel() == 0 {
            return Ok(0);
        }
        let mut last = self.offset;
        for (&d, &s) in self.dims().iter().zip(&self.strides) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| last.checked_add(x))
                .ok_or_else(|| Error::invalid("layout: storage index overflows"))?;
        }
        last.checked_add(1)
            .ok_or_else(|| Error::invalid("layout: storage index overflows"))
    }

    /// Swaps two dimensions.
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Self> {
        let rank = self.rank();
        if d0 >= rank || d1 >= rank {
            return Err(Error::invalid(format!(
                "transpose({d0}, {d1}): tensor has rank {rank}"
            )));
        }
        let mut perm: Vec<usize> = (0..rank).collect();
        perm.swap(d0, d1);
        self.permute(&perm)
    }

    /// Reorders dimensions: dimension `i` of the result is `perm[i]` of `self`.
    pub fn permute(&self, perm: &[usize]) -> Result<Self> {
        let rank = self.rank();
        let mut seen = vec![false; rank];
        if perm.len() != rank
            || perm
                .iter()
                .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::invalid(format!(
                "permute: {perm:?} is not a permutation of 0..{rank}"
            )));
        }
        let dims: Vec<usize> = perm.iter().map(|&p| self.dims()[p]).collect();
        let strides = perm.iter().map(|&p| self.strides[p]).collect();
        Ok(Layout {
            shape: Shape::new(&dims)?,
            strides,
            offset: self.offset,
        })
    }

    /// Restricts dimension `dim` to `start..start + len`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        let extent = self.shape.dim(dim)?;
        if start.checked_add(len).is_none_or(|end| end > extent) {
            return Err(Error::invalid(format!(
                "narrow: {start}..{start}+{len} is out of range for dimension {dim} of extent {extent} (shape {})",
                self.shape
            )));
        }
        let mut dims = self.dims().to_vec();
        dims[dim] = len;
        let offset = if len == 0 {
            self.offset
        } else {
            self.offset + start * self.strides[dim]
        };
        Ok(Layout {
            shape: Shape::new(&dims)?,
            strides: self.strides.clone(),
            offset,
        })
    }

    /// Broadcasts to `target` (NumPy rules: align right, expand extents of 1
    /// and missing leading dimensions with stride 0).
    pub fn broadcast_as(&self, target: &Shape) -> Result<Self> {
        let rank = target.rank();
        if rank < self.rank() {
            return Err(Error::shape(
                "broadcast",
                format!("cannot broadcast {} to the lower-rank {target}", self.shape),
            ));
        }
        let lead = rank - self.rank();
        let mut strides = vec![0; rank];
        for i in 0..self.rank() {
            let (d, t) = (self.dims()[i], target.dims()[lead + i]);
            strides[lead + i] = if d == t {
                self.strides[i]
            } else if d == 1 {
                0
            } else {
                return Err(Error::shape(
                    "broadcast",
                    format!("cannot broadcast {} to {target}", self.shape),
                ));
            };
        }
        Ok(Layout {
            shape: target.clone(),
            strides,
            offset: self.offset,
        })
    }

    /// The same elements under a new shape, if that needs no copy (the
    /// layout is contiguous). `None` means: make it contiguous first.
    pub fn reshape(&self, shape: &Shape) -> Result<Option<Self>> {
        if shape.numel() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!(
                    "cannot reshape {} ({} elements) to {shape} ({} elements)",
                    self.shape,
                    self.numel(),
                    shape.numel()
                ),
            ));
        }
        Ok(self.is_contiguous().then(|| Layout {
            shape: shape.clone(),
            strides: shape.contiguous_strides(),
            offset: self.offset,
        }))
    }

    /// Calls `f` with the storage index of every logical element, in row-major order.
    pub fn for_each_offset(&self, mut f: impl FnMut(usize)) {
        if let Some(r) = self.contiguous_range() {
            r.for_each(f);
            return;
        }
        self.for_each_run(|base, len, stride| {
            for j in 0..len {
                f(base + j * stride);
            }
        });
    }

    /// The innermost rows of the layout in row-major order, as `(first
    /// storage index, length, stride)`: a copy whose rows have stride 1
    /// moves them as slices.
    ///
    /// ```
    /// use kiln_core::{Layout, Shape};
    /// let t = Layout::contiguous(Shape::new(&[2, 3])?).permute(&[1, 0])?;
    /// let mut runs = Vec::new();
    /// t.for_each_run(|o, n, s| runs.push((o, n, s)));
    /// assert_eq!(runs, [(0, 2, 3), (1, 2, 3), (2, 2, 3)]);
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        if self.numel() == 0 {
            return;
        }
        let rank = self.rank();
        let (inner_len, inner_stride) = (self.dims()[rank - 1], self.strides[rank - 1]);
        let mut index = vec![0usize; rank - 1];
        let mut base = self.offset;
        loop {
            f(base, inner_len, inner_stride);
            // Odometer increment over the outer dimensions.
            let mut d = rank - 1;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                index[d] += 1;
                base += self.strides[d];
                if index[d] < self.dims()[d] {
                    break;
                }
                base -= self.strides[d] * index[d];
                index[d] = 0;
            }
        }
    }

    /// Storage indices of every logical element, in row-major order.
    pub fn offsets(&self) -> Vec<usize> {
        let mut v = Vec::with_capacity(self.numel());
        self.for_each_offset(|o| v.push(o));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(d: &[usize]) -> Shape {
        Shape::new(d).unwrap()
    }

    #[test]
    fn transpose_offsets() {
        let l = Layout::contiguous(shape(&[2, 3]));
        let t = l.transpose(0, 1).unwrap();
        assert_eq!(t.dims(), &[3, 2]);
        assert!(!t.is_contiguous());
        assert_eq!(t.offsets(), vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn narrow_and_broadcast() {
        let l = Layout::contiguous(shape(&[3, 4]));
        let n = l.narrow(1, 1, 2).unwrap();
        assert_eq!(n.offsets(), vec![1, 2, 5, 6, 9, 10]);
        assert!(l.narrow(1, 3, 2).is_err());
        let b = Layout::contiguous(shape(&[3, 1]))
            .broadcast_as(&shape(&[2, 3, 2]))
            .unwrap();
        assert_eq!(b.offsets(), vec![0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn reshape_needs_contiguity() {
        let l = Layout::contiguous(shape(&[2, 6]));
        assert!(l.reshape(&shape(&[3, 4])).unwrap().is_some());
        assert!(l.reshape(&shape(&[5])).is_err());
        let t = l.transpose(0, 1).unwrap();
        assert!(t.reshape(&shape(&[12])).unwrap().is_none());
    }

    #[test]
    fn extent_one_dims_do_not_break_contiguity() {
        let l = Layout::new(shape(&[1, 4]), vec![99, 1], 3).unwrap();
        assert!(l.is_contiguous());
        assert_eq!(l.contiguous_range(), Some(3..7));
    }

    #[test]
    fn permute_rejects_non_permutations() {
        let l = Layout::contiguous(shape(&[2, 3, 4]));
        assert!(l.permute(&[0, 0, 1]).is_err());
        assert!(l.permute(&[0, 1]).is_err());
        assert_eq!(l.permute(&[2, 0, 1]).unwrap().dims(), &[4, 2, 3]);
    }
}
