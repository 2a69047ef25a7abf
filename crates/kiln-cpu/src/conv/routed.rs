//! The filter gradient of a convolution followed by max-pooling, from the
//! pooled gradient alone.
//!
//! Max-pooling routes each pooled cell's gradient to one cell of the
//! convolution's output (its argmax); every other cell of that output's
//! gradient is zero. The dense product `dW += dz·colsᵀ` spends three of
//! every four multiply-adds of a 2×2 pool on those zeros, after zeroing,
//! filling and packing `dz` (86 KB an image for the seed CNN). Here each
//! routed gradient `d` adds `d` times the patch its cell read — the cell's
//! row of the transposed im2col matrix `colsᵀ` — to its output channel's
//! row of the filter gradient:
//!
//! ```text
//! dW[oc, :] += d[oc, p] · colsᵀ[argmax[oc, p], :]    for p = 0, 1, … in order
//! ```
//!
//! [`LANES`] columns of the patch at a time, with the accumulators of
//! 4 or 8 output channels in registers. Each element of `dW` is one
//! chain of fused multiply-adds in pooled-cell order, so the result does
//! not depend on the kernel set's vector width or on the thread count.

use crate::vector::wide::per_set;
use crate::KernelSet;

/// Patch columns per accumulator: one AVX-512 vector, two AVX2 ones, four
/// NEON ones.
pub(super) const LANES: usize = 16;

/// Output channels whose accumulators are live at once: independent
/// chains that hide the fused multiply-add's latency. Eight with AVX-512's
/// 32 registers (8 accumulators of one vector: 5 % faster than 4 on Zen 4),
/// four with AVX2's 16 (two vectors each) and NEON's 32 (four each).
fn block(set: KernelSet) -> usize {
    if set == KernelSet::Avx512 {
        8
    } else {
        4
    }
}

/// The row length of the padded filter gradient [`filter`] accumulates
/// into: `patch` rounded up to whole [`LANES`].
pub(super) fn padded(patch: usize) -> usize {
    patch.div_ceil(LANES) * LANES
}

/// The slack `colsᵀ` needs past its last row when its rows are `ld`
/// floats apart: [`filter`] reads whole [`LANES`] from each row's start,
/// past the row's end on its last chunk (what it reads there lands in the
/// padding columns of `dW`). None when `ld` is a multiple of [`LANES`].
pub(super) fn slack(ld: usize) -> usize {
    padded(ld) - ld
}

/// One image's routed gradients and the patches they multiply.
#[derive(Clone, Copy)]
pub(super) struct Image<'a> {
    /// The transposed im2col matrix: the patch each output cell read, in
    /// rows `ld` floats apart (`ld` at least the patch length), with
    /// [`slack`]`(ld)` floats after its last row.
    pub(super) cols_t: &'a [f32],
    /// The row stride of `cols_t`.
    pub(super) ld: usize,
    /// Each output channel's `pcells` routed gradients, channel-major.
    pub(super) routed: &'a [f32],
    /// The rows of `cols_t` (convolution-output cells) they were routed to.
    pub(super) at: &'a [u32],
    /// Pooled cells per channel.
    pub(super) pcells: usize,
}

/// `Q` output channels from `oc`, patch columns `c0..c0 + LANES`, into
/// `dw` (rows `ldw` apart).
///
/// # Safety
/// Every row `at[k]` of `cols_t` has at least `c0 + LANES` floats from its
/// start (`at[k]·ld + c0 + LANES ≤ cols_t.len()`).
#[inline(always)]
unsafe fn channels<const Q: usize>(
    img: Image<'_>,
    dw: &mut [f32],
    ldw: usize,
    (oc, c0): (usize, usize),
) {
    let Image {
        cols_t,
        ld,
        routed,
        at,
        pcells,
    } = img;
    let mut acc = [[0f32; LANES]; Q];
    for (q, a) in acc.iter_mut().enumerate() {
        a.copy_from_slice(&dw[(oc + q) * ldw + c0..][..LANES]);
    }
    // The Q channels' gradients and cells, `pcells` apart from two
    // pointers: Q slices (2·Q pointers and lengths) did not fit the
    // registers beside the accumulators, and their reloads and bounds
    // checks took a third of the op's samples.
    let first = oc * pcells;
    assert!(routed.len() >= first + Q * pcells && at.len() >= first + Q * pcells);
    let (grads, cells) = (routed[first..].as_ptr(), at[first..].as_ptr());
    let base = cols_t.as_ptr().wrapping_add(c0);
    for p in 0..pcells {
        for (q, a) in acc.iter_mut().enumerate() {
            // SAFETY: q·pcells + p < Q·pcells, inside both (asserted); the
            // caller's contract for the row the cell names.
            let (d, src) = unsafe {
                let k = q * pcells + p;
                let row = *cells.add(k) as usize * ld;
                (
                    *grads.add(k),
                    std::ptr::read_unaligned::<[f32; LANES]>(base.add(row).cast()),
                )
            };
            for (v, s) in a.iter_mut().zip(src) {
                *v = d.mul_add(s, *v);
            }
        }
    }
    for (q, a) in acc.iter().enumerate() {
        dw[(oc + q) * ldw + c0..][..LANES].copy_from_slice(a);
    }
}

#[inline(always)]
fn filter_loop(img: Image<'_>, dw: &mut [f32], block: usize) {
    let (cols_t, ld, at, pcells) = (img.cols_t, img.ld, img.at, img.pcells);
    let ldw = padded(ld);
    let o = dw.len() / ldw.max(1);
    assert!(
        dw.len() == o * ldw && img.routed.len() == o * pcells && at.len() == o * pcells,
        "routed filter gradient: {} gradients and {} indices for {o} channels of {pcells} cells",
        img.routed.len(),
        at.len()
    );
    // What `channels` relies on to read whole LANES from any routed row.
    let last = at.iter().copied().max().map_or(0, |a| a as usize);
    assert!(
        at.is_empty() || cols_t.len() >= last * ld + ldw,
        "routed filter gradient: cell {last} is past the {} rows of {ld} (and the slack) given",
        cols_t.len() / ld.max(1)
    );
    for c0 in (0..ldw).step_by(LANES) {
        let mut oc = 0;
        while oc + block <= o {
            // SAFETY: checked above: every routed row has `ldw` ≥ c0 + LANES
            // floats from its start.
            unsafe {
                if block == 8 {
                    channels::<8>(img, dw, ldw, (oc, c0))
                } else {
                    channels::<4>(img, dw, ldw, (oc, c0))
                }
            };
            oc += block;
        }
        for oc in oc..o {
            // SAFETY: as above.
            unsafe { channels::<1>(img, dw, ldw, (oc, c0)) };
        }
    }
}

per_set! {
    /// [`filter`] with `block` (4 or 8) channels at a time.
    fn filter_blocks(img: Image<'_>, dw: &mut [f32], block: usize) -> () = filter_loop;
}

/// Adds one image's routed gradients to the filter gradient `dw` (`o` rows
/// of [`padded`]`(ld)`, the columns past the patch's length junk). Every
/// routed cell is checked to be a row of `cols_t`.
pub(super) fn filter(set: KernelSet, img: Image<'_>, dw: &mut [f32]) {
    filter_blocks(set, img, dw, block(set));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every set against the dense sum, at patch widths around [`LANES`]
    /// and channel counts around the blocks of 4 and 8, with repeated
    /// argmaxes.
    #[test]
    fn routed_sums_match_the_dense_product_on_every_set() {
        let cells = 23;
        for patch in [1, 9, 15, 16, 17, 40] {
            for o in [1, 3, 4, 5, 8, 9, 17] {
                let pcells = 7;
                let ldw = padded(patch);
                let mut cols_t: Vec<f32> = (0..cells * patch + slack(patch))
                    .map(|i| ((i * 7919) % 61) as f32 / 8.0 - 3.0)
                    .collect();
                // The slack is read but lands in the padding: poison it.
                cols_t[cells * patch..].fill(f32::NAN);
                let at: Vec<u32> = (0..o * pcells).map(|k| ((k * 5) % cells) as u32).collect();
                let routed: Vec<f32> = (0..o * pcells)
                    .map(|k| (k % 11) as f32 / 4.0 - 1.0)
                    .collect();
                let mut want = vec![0f64; o * patch];
                for oc in 0..o {
                    for p in 0..pcells {
                        let k = oc * pcells + p;
                        for r in 0..patch {
                            let x = cols_t[at[k] as usize * patch + r];
                            want[oc * patch + r] += f64::from(routed[k]) * f64::from(x);
                        }
                    }
                }
                for set in KernelSet::ALL.into_iter().filter(|s| s.available()) {
                    let mut dw = vec![0f32; o * ldw];
                    let img = Image {
                        cols_t: &cols_t,
                        ld: patch,
                        routed: &routed,
                        at: &at,
                        pcells,
                    };
                    filter(set, img, &mut dw);
                    for oc in 0..o {
                        for r in 0..patch {
                            // Quarter-integers times eighth-integers, few
                            // terms: every partial sum is exact.
                            assert_eq!(
                                f64::from(dw[oc * ldw + r]),
                                want[oc * patch + r],
                                "{set:?}: patch {patch}, {o} channels, ({oc}, {r})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "routed filter gradient")]
    fn mismatched_lengths_are_refused() {
        let mut dw = vec![0f32; 2 * padded(9)];
        let img = Image {
            cols_t: &[0.0; 64],
            ld: 9,
            routed: &[1.0; 3],
            at: &[0; 3],
            pcells: 2,
        };
        filter(KernelSet::Scalar, img, &mut dw);
    }

    #[test]
    #[should_panic(expected = "past the 7 rows")]
    fn a_cell_past_the_matrix_is_refused_before_any_read() {
        let mut dw = vec![0f32; padded(9)];
        // Row 6 is the last whole row, but its 16 floats run past the end.
        let img = Image {
            cols_t: &[0.0; 64],
            ld: 9,
            routed: &[1.0],
            at: &[6],
            pcells: 1,
        };
        filter(KernelSet::best(), img, &mut dw);
    }
}
