//! bf16 GEMM with AVX-512 BF16: `vdpbf16ps` multiplies two pairs of bf16
//! and adds both products to an f32 lane — twice the multiply-adds of an
//! f32 FMA per instruction — accumulating in f32.
//!
//! Packing interleaves k in pairs: a packed A panel holds, for each pair
//! `t`, `MR` 32-bit words `(a[i, 2t], a[i, 2t+1])`; a packed B panel, for
//! each pair, `NR` words `(b[2t, j], b[2t+1, j])`; an odd k is padded with
//! zeros. The 8 × 32 micro-kernel broadcasts A's words and issues sixteen
//! `vdpbf16ps` per pair.
//!
//! `vdpbf16ps` treats subnormal inputs as zero and flushes subnormal
//! results: a product whose operand is subnormal would be lost, so a
//! problem with any subnormal input goes to the exact widening path
//! instead; a running sum that falls below 2⁻¹²⁶ is flushed (at most
//! 2⁻¹²⁶ per step, which the conformance bound for bf16 GEMM states).

use std::arch::x86_64::*;

use crate::workers::Workers;
use kiln_core::{bf16, HostData, Layout, View};

/// Tile rows.
const MR: usize = 8;
/// Tile columns.
const NR: usize = 32;
/// k elements packed at once (an even number).
const KC: usize = 512;
/// Largest row block a task packs.
const MC: usize = 128;

/// Whether this processor has AVX-512 BF16 (and F).
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512f")
}

/// A strided bf16 matrix of a batch.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [bf16],
    offset: usize,
    rs: usize,
    cs: usize,
}

impl Mat<'_> {
    #[inline]
    fn at(&self, i: usize, j: usize) -> u32 {
        u32::from(self.data[self.offset + i * self.rs + j * self.cs].to_bits())
    }
}

fn subnormal(v: bf16) -> bool {
    let b = v.to_bits();
    b & 0x7F80 == 0 && b & 0x007F != 0
}

/// The elements a view covers hold a subnormal. A view that fills most of
/// the storage it spans (a transpose, a slice of rows) has the whole span
/// scanned in one branch-free pass (a subnormal outside the view only sends
/// the product to the exact path); a sparse one is walked element by element.
fn has_subnormal(data: &[bf16], layout: &Layout) -> bool {
    let end = layout.span().unwrap_or(usize::MAX);
    let start = layout.offset();
    if end <= data.len() && end - start.min(end) <= 2 * layout.numel() {
        return data[start.min(end)..end]
            .iter()
            .fold(false, |found, &v| found | subnormal(v));
    }
    let mut found = false;
    layout.for_each_offset(|o| found |= subnormal(data[o]));
    found
}

/// `C = A·B` for bf16 `[batch, m, k]` and `[batch, k, n]` views into the
/// zeroed f32 `out`, or `None` (nothing written) if an operand holds a
/// subnormal (see the module doc) or is not bf16.
///
/// The caller checked shapes and bounds (`Problem::new`) and that the
/// processor has AVX-512 BF16 ([`available`]).
pub(crate) fn gemm(
    a: View<'_, HostData>,
    b: View<'_, HostData>,
    (batch, m, k, n): (usize, usize, usize, usize),
    out: &mut [f32],
    pool: &Workers,
) -> Option<()> {
    let (HostData::BF16(ad), HostData::BF16(bd)) = (a.storage, b.storage) else {
        return None;
    };
    if has_subnormal(ad, a.layout) || has_subnormal(bd, b.layout) {
        return None;
    }
    let (sa, sb) = (a.layout.strides(), b.layout.strides());
    for (p, c) in out.chunks_mut((m * n).max(1)).enumerate().take(batch) {
        let am = Mat {
            data: ad,
            offset: a.layout.offset() + p * sa[0],
            rs: sa[1],
            cs: sa[2],
        };
        let bm = Mat {
            data: bd,
            offset: b.layout.offset() + p * sb[0],
            rs: sb[1],
            cs: sb[2],
        };
        one(am, bm, m, k, n, c, pool);
    }
    Some(())
}

/// Packs k elements `p0..p0+kc` of B's columns `c0..c0+NR` into pair words.
fn pack_b(b: Mat<'_>, p0: usize, kc: usize, k: usize, c0: usize, n: usize, out: &mut [u32]) {
    for t in 0..kc.div_ceil(2) {
        let (p, q) = (p0 + 2 * t, p0 + 2 * t + 1);
        for j in 0..NR {
            let col = c0 + j;
            let word = if col < n {
                let lo = b.at(p, col);
                let hi = if q < k && q < p0 + kc {
                    b.at(q, col)
                } else {
                    0
                };
                lo | (hi << 16)
            } else {
                0
            };
            out[t * NR + j] = word;
        }
    }
}

/// Packs A's rows `r0..r0+MR`, k elements `p0..p0+kc`, into pair words.
fn pack_a(a: Mat<'_>, r0: usize, m: usize, p0: usize, kc: usize, k: usize, out: &mut [u32]) {
    for t in 0..kc.div_ceil(2) {
        let (p, q) = (p0 + 2 * t, p0 + 2 * t + 1);
        for i in 0..MR {
            let row = r0 + i;
            out[t * MR + i] = if row < m {
                let hi = if q < k && q < p0 + kc {
                    a.at(row, q)
                } else {
                    0
                };
                a.at(row, p) | (hi << 16)
            } else {
                0
            };
        }
    }
}

fn one(a: Mat<'_>, b: Mat<'_>, m: usize, k: usize, n: usize, c: &mut [f32], pool: &Workers) {
    let panels_n = n.div_ceil(NR);
    let mut b_packed = vec![0u32; panels_n * NR * KC / 2];
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        let pairs = kc.div_ceil(2);
        for q in 0..panels_n {
            pack_b(
                b,
                pc,
                kc,
                k,
                q * NR,
                n,
                &mut b_packed[q * NR * pairs..(q + 1) * NR * pairs],
            );
        }
        let b_packed = &b_packed;
        let first = pc == 0;
        let task = |(block, rows): (usize, &mut [f32])| {
            let r0 = block * MC;
            let mrows = rows.len() / n;
            let mut a_panel = vec![0u32; MR * pairs];
            let mut tile = [0f32; MR * NR];
            for ir in (0..mrows).step_by(MR) {
                pack_a(a, r0 + ir, m, pc, kc, k, &mut a_panel);
                for q in 0..panels_n {
                    let bp = &b_packed[q * NR * pairs..(q + 1) * NR * pairs];
                    // SAFETY: `available()` was checked by the caller; the
                    // panels hold `pairs` words per row/column and the tile
                    // MR·NR floats.
                    unsafe { kernel(pairs, a_panel.as_ptr(), bp.as_ptr(), tile.as_mut_ptr()) };
                    let (mr, nr) = (MR.min(mrows - ir), NR.min(n - q * NR));
                    for i in 0..mr {
                        let row = &mut rows[(ir + i) * n + q * NR..][..nr];
                        let part = &tile[i * NR..i * NR + nr];
                        if first {
                            row.copy_from_slice(part);
                        } else {
                            for (cv, &t) in row.iter_mut().zip(part) {
                                *cv += t;
                            }
                        }
                    }
                }
            }
        };
        if m * n * kc >= 1 << 24 && pool.threads() > 1 {
            pool.for_each(c.chunks_mut(MC * n).enumerate().collect(), task);
        } else {
            c.chunks_mut(MC * n).enumerate().for_each(task);
        }
    }
}

/// The 8 × 32 tile `Σₜ Ã[t]·B̃[t]` over `pairs` k-pairs into `c` (row-major).
///
/// # Safety
/// The processor supports AVX-512F and AVX-512 BF16; `a` holds `pairs·8`
/// words, `b` `pairs·32`, `c` has room for 256 floats.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(pairs: usize, a: *const u32, b: *const u32, c: *mut f32) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for t in 0..pairs {
        // SAFETY: within the panels (the contract above); a __m512bh is 32
        // bf16, the same 64 bytes as 16 u32 words.
        let (b0, b1): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    b.add(t * NR) as *const _
                )),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    b.add(t * NR + 16) as *const _
                )),
            )
        };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: as above; a broadcast word is one (a[i,2t], a[i,2t+1]) pair.
            let ai = unsafe {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *a.add(t * MR + i) as i32
                ))
            };
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: c has room for MR·NR floats.
        unsafe {
            _mm512_storeu_ps(c.add(i * NR), row[0]);
            _mm512_storeu_ps(c.add(i * NR + 16), row[1]);
        }
    }
}
