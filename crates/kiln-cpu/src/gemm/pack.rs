//! Packing: copying blocks of A and B into the panel order micro-kernels
//! read, zero-padded to whole tiles.

use std::borrow::Cow;

use kiln_core::{HostData, Result, View};

use crate::storage::read_f32;
use crate::vector::convert;
use crate::workers::Workers;
use crate::KernelSet;

/// A strided f32 matrix: element `(i, j)` is `data[offset + i·rs + j·cs]`.
pub(crate) struct Matrix<'a> {
    data: Cow<'a, [f32]>,
    offset: usize,
    rs: usize,
    cs: usize,
    batch_stride: usize,
}

impl<'a> Matrix<'a> {
    /// A `[batch, rows, cols]` operand: f32 storage is used in place with its
    /// strides; f16 and bf16 are widened — the storage the view spans, with
    /// the set's vector conversions, keeping the strides, when the view
    /// fills most of it (a transpose); otherwise into a contiguous copy.
    pub(crate) fn batched(set: KernelSet, v: View<'a, HostData>) -> Result<Self> {
        let l = v.layout;
        let (s, d) = (l.strides(), l.dims());
        if let HostData::F32(data) = v.storage {
            return Ok(Matrix {
                data: Cow::Borrowed(data),
                offset: l.offset(),
                rs: s[1],
                cs: s[2],
                batch_stride: s[0],
            });
        }
        let spanned = l
            .span()
            .ok()
            .filter(|&end| {
                set != KernelSet::Scalar
                    && l.numel() > 0
                    && end <= v.storage.len()
                    && end - l.offset() <= 2 * l.numel()
            })
            .and_then(|end| convert::widen(set, None, v.storage, l.offset()..end));
        Ok(match spanned {
            Some(data) => Matrix {
                data,
                offset: 0,
                rs: s[1],
                cs: s[2],
                batch_stride: s[0],
            },
            None => Matrix {
                data: read_f32("gemm", v)?,
                offset: 0,
                rs: d[2],
                cs: 1,
                batch_stride: d[1] * d[2],
            },
        })
    }

    /// A matrix over a slice: element `(i, j)` at `data[offset + i·rs + j·cs]`.
    pub(crate) fn from_slice(data: &'a [f32], offset: usize, rs: usize, cs: usize) -> Self {
        Matrix {
            data: Cow::Borrowed(data),
            offset,
            rs,
            cs,
            batch_stride: 0,
        }
    }

    /// Element `(i, j)`.
    #[inline]
    pub(crate) fn at(&self, i: usize, j: usize) -> f32 {
        self.get(i, j)
    }

    /// Matrix `p` of the batch.
    pub(crate) fn batch(&self, p: usize) -> Matrix<'_> {
        Matrix {
            data: Cow::Borrowed(&self.data),
            offset: self.offset + p * self.batch_stride,
            rs: self.rs,
            cs: self.cs,
            batch_stride: self.batch_stride,
        }
    }

    /// The same matrix from element `(rows, cols)` on.
    pub(crate) fn shifted(&self, rows: usize, cols: usize) -> Matrix<'_> {
        Matrix {
            data: Cow::Borrowed(&self.data),
            offset: self.offset + rows * self.rs + cols * self.cs,
            rs: self.rs,
            cs: self.cs,
            batch_stride: self.batch_stride,
        }
    }

    /// Where element `(i, j)` lives in [`Matrix::data`].
    #[inline]
    pub(crate) fn index(&self, i: usize, j: usize) -> usize {
        self.offset + i * self.rs + j * self.cs
    }

    /// The underlying elements.
    pub(crate) fn data(&self) -> &[f32] {
        &self.data
    }

    /// The row stride.
    pub(crate) fn rs(&self) -> usize {
        self.rs
    }

    /// The column stride.
    pub(crate) fn cs(&self) -> usize {
        self.cs
    }

    #[inline]
    fn get(&self, i: usize, j: usize) -> f32 {
        self.data[self.index(i, j)]
    }
}

/// Packs rows `i0..i0+mc`, columns `p0..p0+kc` of `a` into panels of `mr`
/// rows: panel `r`, step `p`, row `i` at `r·mr·kc + p·mr + i`.
pub(crate) fn pack_a(
    a: &Matrix<'_>,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    mr: usize,
    out: &mut Vec<f32>,
) {
    for (panel, chunk) in fit(out, mc.div_ceil(mr) * mr * kc)
        .chunks_mut(mr * kc)
        .enumerate()
    {
        let rows = mr.min(mc - panel * mr);
        let r0 = i0 + panel * mr;
        if rows < mr {
            // The last panel's missing rows are zeros: one fill of the
            // panel (a `memset` call per step of a few floats was 2 % of a
            // CNN epoch).
            chunk.fill(0.0);
        }
        if a.rs == 1 {
            // Column-major (a transposed view): each step's rows are contiguous.
            for (p, dst) in chunk.chunks_exact_mut(mr).enumerate() {
                let start = a.offset + r0 + (p0 + p) * a.cs;
                copy_short(&mut dst[..rows], &a.data[start..start + rows]);
            }
        } else if a.cs == 1 {
            // Row-major: the panel is the transpose of `rows` runs of `kc`
            // floats, through registers where AVX is present (a scattered
            // store per element was 5 % of a 2048³ product); NEON's 8-row
            // panels element by element.
            let start = a.offset + r0 * a.rs + p0;
            transpose_into(&a.data[start..], a.rs, [rows, kc], chunk, mr);
        } else {
            for i in 0..rows {
                let start = a.offset + (r0 + i) * a.rs + p0 * a.cs;
                for p in 0..kc {
                    chunk[p * mr + i] = a.data[start + p * a.cs];
                }
            }
        }
    }
}

/// `dst[p·ld + j] = src[j·stride + p]` for `j < cols`, `p < kc`: the
/// transpose of `cols` runs of `kc` floats, `stride` apart, into rows `ld`
/// apart. Groups of up to 8 runs go through registers in blocks of 8 steps
/// where AVX is available (a scattered store per element made packing a
/// CNN's `dy·Wᵀ` 6 % of its epoch, and AVX2's 6-row A panels, which never
/// fill a group of 8, 8 % of a GPT training step on a Zen 3); the last
/// `kc mod 8` steps one element at a time.
pub(crate) fn transpose_into(
    src: &[f32],
    stride: usize,
    [cols, kc]: [usize; 2],
    dst: &mut [f32],
    ld: usize,
) {
    if cols == 0 || kc == 0 {
        return;
    }
    assert!(
        (cols - 1) * stride + kc <= src.len() && (kc - 1) * ld + cols <= dst.len() && cols <= ld,
        "transposed packing: {cols} runs of {kc}, {stride} apart, from {} floats into rows of {ld} in {}",
        src.len(),
        dst.len()
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is present; the bounds were asserted above, and the
        // kernel reads and writes only elements of the `cols` runs' first
        // `kc` steps.
        return unsafe { transpose_blocks_avx(src, stride, [cols, kc], dst, ld) };
    }
    for j in 0..cols {
        for (p, &v) in src[j * stride..][..kc].iter().enumerate() {
            dst[p * ld + j] = v;
        }
    }
}

/// [`transpose_into`] with AVX: groups of 8 runs (the last group may hold
/// fewer) in 8 × 8 blocks by the classic unpack / shuffle / lane-swap
/// sequence — a short group's missing runs are zero vectors, and only its
/// own columns of each step are stored — and each group's `kc mod 8` last
/// steps element by element.
///
/// # Safety
/// AVX is present; `(cols − 1)·stride + kc ≤ src.len()` and `(kc − 1)·ld +
/// cols ≤ dst.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_blocks_avx(
    src: &[f32],
    stride: usize,
    [cols, kc]: [usize; 2],
    dst: &mut [f32],
    ld: usize,
) {
    use std::arch::x86_64::*;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for j0 in (0..cols).step_by(8) {
        let runs = (cols - j0).min(8);
        let mut p0 = 0;
        while p0 + 8 <= kc {
            // A short group's missing runs read nothing.
            let r: [__m256; 8] = std::array::from_fn(|i| {
                if i < runs {
                    // SAFETY: run j0 + i < cols reads p0..p0 + 8 ≤ kc of
                    // its kc floats.
                    unsafe { _mm256_loadu_ps(s.add((j0 + i) * stride + p0)) }
                } else {
                    _mm256_setzero_ps()
                }
            });
            // 32-bit pairs, then 64-bit pairs: u[4g + q], 128-bit half L,
            // holds column 4L + q of rows 4g .. 4g + 3; then the halves.
            let t: [__m256; 8] = std::array::from_fn(|k| {
                let (a, b) = (r[k & !1], r[k | 1]);
                if k % 2 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            });
            let u: [__m256; 8] = std::array::from_fn(|k| {
                let (g, q) = (k / 4, k % 4);
                let (a, b) = (t[4 * g + q / 2], t[4 * g + 2 + q / 2]);
                if q % 2 == 0 {
                    _mm256_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm256_shuffle_ps::<0xEE>(a, b)
                }
            });
            let rows: [__m256; 8] = std::array::from_fn(|c| {
                let q = c % 4;
                if c < 4 {
                    _mm256_permute2f128_ps::<0x20>(u[q], u[4 + q])
                } else {
                    _mm256_permute2f128_ps::<0x31>(u[q], u[4 + q])
                }
            });
            for (q, row) in rows.into_iter().enumerate() {
                // SAFETY: step p0 + q < kc, columns j0..j0 + runs ≤ cols.
                unsafe { store_first(d.add((p0 + q) * ld + j0), row, runs) };
            }
            p0 += 8;
        }
        for j in j0..j0 + runs {
            for p in p0..kc {
                // SAFETY: j < cols, p < kc: inside both (the contract).
                unsafe { *d.add(p * ld + j) = *s.add(j * stride + p) };
            }
        }
    }
}

/// Stores lanes `0..n` (`n ≤ 8`) of `v` at `d`: whole, or in pieces of
/// four, two and one, none of which needs `d` aligned (the two-lane piece
/// goes through `_mm_storel_epi64`, an unaligned 64-bit store, not an
/// `f64` write).
///
/// # Safety
/// AVX is present; `n` floats are writable at `d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn store_first(d: *mut f32, v: std::arch::x86_64::__m256, n: usize) {
    use std::arch::x86_64::*;
    // SAFETY: every store below writes lanes < n, writable (the contract).
    unsafe {
        if n == 8 {
            return _mm256_storeu_ps(d, v);
        }
        let (mut part, mut at) = (_mm256_castps256_ps128(v), 0);
        if n >= 4 {
            _mm_storeu_ps(d, part);
            (part, at) = (_mm256_extractf128_ps::<1>(v), 4);
        }
        if n - at >= 2 {
            _mm_storel_epi64(d.add(at).cast(), _mm_castps_si128(part));
            (part, at) = (_mm_movehl_ps(part, part), at + 2);
        }
        if n > at {
            _mm_store_ss(d.add(at), part);
        }
    }
}

/// The first `len` floats of `buf`, which grows to hold them if it must.
/// What they held before is left for the packing to overwrite: it writes
/// every element of its panels, padding included, so a kept scratch
/// buffer is not zeroed first.
fn fit(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// Copies a few floats: fixed-size copies for the micro-kernels' tile
/// heights and widths, so the compiler emits vector moves instead of a
/// `memmove` call per row of a panel.
/// (`copy_from_slice` in a matched arm still became a `memcpy` call of a
/// run-time length: 5 % of a GPT training step's samples.)
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    /// One array assignment: a constant size, so vector moves.
    #[inline(always)]
    fn fixed<const N: usize>(dst: &mut [f32], src: &[f32]) {
        match (<&mut [f32; N]>::try_from(dst), <&[f32; N]>::try_from(src)) {
            (Ok(d), Ok(s)) => *d = *s,
            _ => unreachable!("copy_short matched both lengths to {N}"),
        }
    }
    match (dst.len(), src.len()) {
        (32, 32) => fixed::<32>(dst, src),
        (16, 16) => fixed::<16>(dst, src),
        (8, 8) => fixed::<8>(dst, src),
        (6, 6) => fixed::<6>(dst, src),
        _ => {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v;
            }
        }
    }
}

/// Floats of packed B below which packing stays on the calling thread:
/// a few microseconds of copying against a fork of one or two. A product
/// of few rows reuses each packed panel only `m / MR` times, so its
/// packing is a large share of the work (128×784×64 on 2 threads: 71 →
/// 97 GFLOP/s when its 16 Ki-float blocks were split). The MLP's 128 × 64
/// `dy`, packed for its weight gradient, is not: split, each thread
/// copied for 0.9 µs and the caller then waited 0.4–0.9 µs for the other.
const PARALLEL_PACK_MIN: usize = 1 << 14;

/// Packs rows `p0..p0+kc`, columns `j0..j0+nc` of `b` into panels of `nr`
/// columns: panel `q`, step `p`, column `j` at `q·nr·kc + p·nr + j`; the
/// panels shared among `pool`'s threads when there are enough of them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_b(
    b: &Matrix<'_>,
    p0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    nr: usize,
    out: &mut Vec<f32>,
    pool: Option<&Workers>,
) {
    pack_b_into(
        b,
        p0,
        kc,
        j0,
        nc,
        nr,
        fit(out, nc.div_ceil(nr) * nr * kc),
        pool,
    );
}

/// Packs columns `j0..j0+nc` of `b` for all its `k` rows, as [`pack_b`]
/// packs them for each block of `kc_block` rows: the block of rows from
/// `pc` at `pc·⌈nc/nr⌉·nr`. The blocks are split over `pool`'s threads —
/// one fork for the whole of B where packing block by block forks once per
/// block.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_b_all(
    b: &Matrix<'_>,
    k: usize,
    kc_block: usize,
    j0: usize,
    nc: usize,
    nr: usize,
    out: &mut Vec<f32>,
    pool: &Workers,
) {
    let width = nc.div_ceil(nr) * nr;
    let blocks = fit(out, width * k).chunks_mut(width * kc_block).enumerate();
    pool.for_each(blocks.collect(), |(q, chunk)| {
        let pc = q * kc_block;
        pack_b_into(b, pc, kc_block.min(k - pc), j0, nc, nr, chunk, None)
    });
}

/// [`pack_b`] into `out`, which holds exactly its panels.
#[allow(clippy::too_many_arguments)]
fn pack_b_into(
    b: &Matrix<'_>,
    p0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    nr: usize,
    out: &mut [f32],
    pool: Option<&Workers>,
) {
    debug_assert_eq!(out.len(), nc.div_ceil(nr) * nr * kc);
    let panel = |(q, chunk): (usize, &mut [f32])| {
        let cols = nr.min(nc - q * nr);
        let c0 = j0 + q * nr;
        if cols < nr {
            // The last panel's missing columns are zeros (one fill, as in
            // `pack_a`).
            chunk.fill(0.0);
        }
        if b.cs == 1 {
            for p in 0..kc {
                let start = b.offset + (p0 + p) * b.rs + c0;
                copy_short(
                    &mut chunk[p * nr..p * nr + cols],
                    &b.data[start..start + cols],
                );
            }
        } else if b.rs == 1 {
            // A transposed operand (a layer's weight in its input
            // gradient, `dy·Wᵀ`): each of the panel's columns is a
            // contiguous run of memory.
            let start = b.offset + c0 * b.cs + p0;
            transpose_into(&b.data[start..], b.cs, [cols, kc], chunk, nr);
        } else {
            for p in 0..kc {
                for (j, d) in chunk[p * nr..p * nr + cols].iter_mut().enumerate() {
                    *d = b.get(p0 + p, c0 + j);
                }
            }
        }
    };
    let panels = out.chunks_mut(nr * kc).enumerate();
    match pool {
        Some(pool) if pool.threads() > 1 && nc * kc >= PARALLEL_PACK_MIN => {
            pool.for_each(panels.collect(), panel)
        }
        _ => panels.for_each(panel),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transposing copy against the definition, for run counts and
    /// lengths around its 8 × 8 blocks, with poisoned gaps that must not
    /// move and padding that must stay as it was.
    #[test]
    fn transposing_copies_every_element_and_nothing_else() {
        for cols in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 16, 23, 32] {
            for kc in [1, 5, 8, 9, 16, 63, 64, 70] {
                for extra in [0, 3] {
                    let (stride, ld) = (kc + extra, cols.max(1) + extra);
                    let src: Vec<f32> = (0..cols * stride).map(|i| i as f32).collect();
                    let mut dst = vec![-1f32; kc * ld];
                    transpose_into(&src, stride, [cols, kc], &mut dst, ld);
                    for p in 0..kc {
                        for j in 0..ld {
                            let want = if j < cols { src[j * stride + p] } else { -1.0 };
                            assert_eq!(
                                dst[p * ld + j],
                                want,
                                "{cols} runs of {kc}: step {p}, column {j}"
                            );
                        }
                    }
                }
            }
        }
    }
}
