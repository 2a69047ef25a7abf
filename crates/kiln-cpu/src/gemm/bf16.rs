//! bf16 GEMM with AVX-512 BF16: `vdpbf16ps` multiplies two pairs of bf16
//! and adds both products to an f32 lane — twice the multiply-adds of an
//! f32 FMA per instruction — accumulating in f32.
//!
//! The kernel reads A as 32-bit words, each the pair `(a[i, 2t],
//! a[i, 2t+1])` it broadcasts, and B as packed panels of pair words: for
//! each pair `t`, `NR` words `(b[2t, j], b[2t+1, j])`; an odd k is padded
//! with zeros. A row-major A with an even k is read in place (its pairs
//! already are such words); anything else — a transposed or strided A, an
//! odd k, the last rows of a block — is packed into `MR`-row panels first.
//!
//! Two tiles: [`WIDE`] (12 rows × 32 columns in 24 accumulators) for
//! outputs wider than 16 columns, [`NARROW`] (16 rows × 16 columns) for
//! the rest — a 10-wide layer fills 10 of a vector's 16 lanes, not 10 of
//! 32. Full tiles are stored into C directly (the first k block stores,
//! later ones add); edge tiles go through a small buffer.
//!
//! On processors with AMX-BF16 ([`amx`]), products wider than 16 columns
//! and at least 16 rows tall take the [`AMX`] tile instead: 32 × 32 blocks
//! of C from the same packed B panels, each k block's pairs padded with
//! zeros to whole tile steps of 16, with A's words in rows (in place where
//! a block needs no padding, else packed by [`pack_a_rows`]). Its sums
//! round differently from `vdpbf16ps`'s (within the same bound; the
//! choice depends only on the shape and the processor, never on timing or
//! threads). `KILN_AMX=0` turns it off.
//!
//! A product with no epilogue (the GPT's layers) is rounded to its bf16
//! result by the row blocks of its last k block, each row tile right after
//! it is stored, while it is in cache — the values of a separate rounding
//! pass over the f32 C, without reading C back from memory.
//!
//! `vdpbf16ps` treats subnormal inputs as zero and flushes subnormal
//! results: a product whose operand is subnormal would be lost, so a
//! problem with any subnormal input goes to the exact widening path
//! instead; a running sum that falls below 2⁻¹²⁶ is flushed (at most
//! 2⁻¹²⁶ per step, which the conformance bound for bf16 GEMM states).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::{amx, SharedC};
use crate::vector::wide;
use crate::workers::Workers;
use crate::KernelSet;
use kiln_core::{bf16, HostData, Layout, View};

/// k elements packed at once (an even number: a k block of an even k then
/// holds whole pairs, which reading A in place relies on).
const KC: usize = 512;
const _: () = assert!(KC.is_multiple_of(2));
/// The most rows a task takes (a multiple of both tiles' rows).
const MC: usize = 96;
/// Work (m·n·k of one k block) from which row blocks are split over threads.
const PARALLEL_MIN_WORK: usize = 1 << 20;
/// Packed words of B from which its panels are packed over threads.
const PACK_PARALLEL_MIN_WORDS: usize = 1 << 14;

/// A tile: `mr` rows × `nr` columns (16 per vector) and its kernel.
#[derive(Clone, Copy)]
struct Tile {
    mr: usize,
    nr: usize,
    /// [`kernel`] for this shape, or [`amx::kernel`].
    kernel: unsafe fn(Words, *mut f32, usize, bool),
    /// The AMX kernel: A's words in rows (pairs contiguous), tiles
    /// configured per task, each k block's pairs padded with zeros to whole
    /// tile steps ([`Tile::stored_pairs`]).
    amx: bool,
}

impl Tile {
    /// The pairs of words a k block of `kc` elements takes in B's panels
    /// and A's packing: its pairs, padded with zero pairs to whole tile
    /// steps for the AMX tile.
    fn stored_pairs(self, kc: usize) -> usize {
        let pairs = kc.div_ceil(2);
        match self.amx {
            true => pairs.next_multiple_of(amx::PAIRS_PER_STEP),
            false => pairs,
        }
    }
}

/// Floats of the buffer an edge tile is computed into.
const EDGE: usize = amx::MR * amx::NR;
const _: () =
    assert!(WIDE.mr * WIDE.nr <= EDGE && NARROW.mr * NARROW.nr <= EDGE && AMX.mr * AMX.nr <= EDGE);

/// Outputs wider than 16 columns.
const WIDE: Tile = Tile {
    mr: 12,
    nr: 32,
    kernel: kernel::<12, 2>,
    amx: false,
};
/// Outputs at most 16 columns wide.
const NARROW: Tile = Tile {
    mr: 16,
    nr: 16,
    kernel: kernel::<16, 1>,
    amx: false,
};
/// Processors with AMX-BF16 ([`amx::available`]), for products at least
/// half a tile tall and wider than [`NARROW`].
const AMX: Tile = Tile {
    mr: amx::MR,
    nr: amx::NR,
    kernel: amx::kernel,
    amx: true,
};
// Every k block but the last is whole tile steps (A read in place there).
const _: () = assert!(KC.is_multiple_of(2 * amx::PAIRS_PER_STEP));

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

    /// The same elements, rows and columns swapped.
    fn transposed(self) -> Self {
        Mat {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
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
/// Long spans are scanned in chunks over `pool`'s threads.
fn has_subnormal(data: &[bf16], layout: &Layout, pool: &Workers) -> bool {
    /// Elements per task of a scan over the team.
    const SCAN_PER_TASK: usize = 1 << 16;
    let scan = |s: &[bf16]| s.iter().fold(false, |found, &v| found | subnormal(v));
    let end = layout.span().unwrap_or(usize::MAX);
    let start = layout.offset();
    if end <= data.len() && end - start.min(end) <= 2 * layout.numel() {
        let span = &data[start.min(end)..end];
        if span.len() <= SCAN_PER_TASK || pool.threads() == 1 {
            return scan(span);
        }
        return pool
            .map(span.chunks(SCAN_PER_TASK).collect(), scan)
            .into_iter()
            .any(|found| found);
    }
    let mut found = false;
    layout.for_each_offset(|o| found |= subnormal(data[o]));
    found
}

/// `C = A·B` for bf16 `[batch, m, k]` and `[batch, k, n]` views into the
/// fresh f32 `out` (every element written), or `None` (nothing written) if
/// an operand holds a subnormal (see the module doc) or is not bf16. With
/// `rounded` (as long as `out`), C is also rounded to bf16 there, each row
/// tile as soon as its last k block is stored, while it is in cache: the
/// values of a separate pass over `out`, without reading `out` back from
/// memory.
///
/// The caller checked shapes and bounds (`Problem::new`), that no extent is
/// zero, and that the processor has AVX-512 BF16 ([`available`]).
pub(crate) fn gemm(
    a: View<'_, HostData>,
    b: View<'_, HostData>,
    (batch, m, k, n): (usize, usize, usize, usize),
    out: &mut [MaybeUninit<f32>],
    mut rounded: Option<&mut [MaybeUninit<bf16>]>,
    pool: &Workers,
) -> Option<()> {
    let (HostData::BF16(ad), HostData::BF16(bd)) = (a.storage, b.storage) else {
        return None;
    };
    if has_subnormal(ad, a.layout, pool) || has_subnormal(bd, b.layout, pool) {
        return None;
    }
    let (sa, sb) = (a.layout.strides(), b.layout.strides());
    let tile = match n > NARROW.nr {
        true if m >= AMX.mr / 2 && amx::available() => AMX,
        true => WIDE,
        false => NARROW,
    };
    if let Some(r) = &rounded {
        assert_eq!(r.len(), out.len(), "bf16 GEMM: rounded C as long as C");
    }
    for (p, c) in out.chunks_mut(m * n).enumerate().take(batch) {
        let rounded_c = rounded
            .as_deref_mut()
            .map(|r| &mut r[p * m * n..(p + 1) * m * n]);
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
        one(tile, am, bm, (m, k, n), c, rounded_c, pool);
    }
    Some(())
}

/// The pair word `(lo, hi)`: `lo` in the low 16 bits, as `vdpbf16ps` and
/// `tdpbf16ps` read a pair of bf16.
#[inline(always)]
fn word(lo: bf16, hi: bf16) -> u32 {
    u32::from(lo.to_bits()) | (u32::from(hi.to_bits()) << 16)
}

/// `words[j] = (lo[j], hi[j])` as a pair word (`hi` zero where absent),
/// zeros past `lo`'s length.
#[inline]
fn pair_words(words: &mut [u32], lo: &[bf16], hi: Option<&[bf16]>) {
    let (head, tail) = words.split_at_mut(lo.len());
    match hi {
        Some(hi) => {
            for ((w, l), h) in head.iter_mut().zip(lo).zip(hi) {
                *w = word(*l, *h);
            }
        }
        None => {
            for (w, l) in head.iter_mut().zip(lo) {
                *w = u32::from(l.to_bits());
            }
        }
    }
    tail.fill(0);
}

/// `out[t·stride + lane]` = the pair word `(run[2t], run[2t+1])` of each
/// lane's run of k elements (`hi` zero past the run's end), zeros in lanes
/// `runs.len()..stride`: the packing of operands whose k runs are
/// contiguous (a row-major A, a transposed B), where a pair already lies in
/// memory as one word.
fn words_from_runs<'a>(out: &mut [u32], stride: usize, runs: impl Iterator<Item = &'a [bf16]>) {
    let mut lanes = 0;
    for (lane, run) in runs.enumerate() {
        let (pairs, rest) = run.as_chunks::<2>();
        for (t, pair) in pairs.iter().enumerate() {
            out[t * stride + lane] = word(pair[0], pair[1]);
        }
        if let [last] = rest {
            out[pairs.len() * stride + lane] = u32::from(last.to_bits());
        }
        lanes = lane + 1;
    }
    for words in out.chunks_exact_mut(stride) {
        words[lanes..].fill(0);
    }
}

/// Packs A's rows `r0..r0+mr` (zeros past row `m`), k elements `p0..end`,
/// into pair words. B's panels are packed by the same code, as the rows
/// of Bᵀ ([`Mat::transposed`]).
fn pack_a(a: Mat<'_>, r0: usize, m: usize, (p0, end): (usize, usize), mr: usize, out: &mut [u32]) {
    let rows = mr.min(m - r0);
    if a.cs == 1 && a.rs != 1 {
        // A row-major (an odd k, or a block's last rows): each row's k run
        // is contiguous.
        let run = |i: usize| &a.data[a.offset + (r0 + i) * a.rs + p0..][..end - p0];
        return words_from_runs(out, mr, (0..rows).map(run));
    }
    for (t, words) in out.chunks_exact_mut(mr).enumerate() {
        let (p, q) = (p0 + 2 * t, p0 + 2 * t + 1);
        if a.rs == 1 {
            // A transposed (a weight gradient's `xᵀ`): a column's rows are
            // contiguous, two columns' runs interleaved.
            let run = |col: usize| &a.data[a.offset + col * a.cs + r0..][..rows];
            pair_words(words, run(p), (q < end).then(|| run(q)));
        } else {
            for (i, w) in words[..rows].iter_mut().enumerate() {
                let hi = if q < end { a.at(r0 + i, q) } else { 0 };
                *w = a.at(r0 + i, p) | (hi << 16);
            }
            words[rows..].fill(0);
        }
    }
}

/// Packs A's rows `r0..r0+mr` (zeros past row `m`), k elements `p0..end`,
/// as `mr` rows of `out.len() / mr` pair words — `out[i·pairs + t]` is
/// `(a[r0+i, p0+2t], a[r0+i, p0+2t+1])`, zeros past `end` — for the AMX
/// kernel.
fn pack_a_rows(
    a: Mat<'_>,
    r0: usize,
    m: usize,
    (p0, end): (usize, usize),
    mr: usize,
    out: &mut [u32],
) {
    let pairs = out.len() / mr;
    let rows = mr.min(m - r0);
    let (filled, past) = out.split_at_mut(rows * pairs);
    past.fill(0);
    if a.cs == 1 {
        // Row-major: each row's k run is contiguous, its pairs words.
        for (i, words) in filled.chunks_exact_mut(pairs).enumerate() {
            let run = &a.data[a.offset + (r0 + i) * a.rs + p0..][..end - p0];
            let (whole, rest) = run.as_chunks::<2>();
            for (w, pair) in words.iter_mut().zip(whole) {
                *w = word(pair[0], pair[1]);
            }
            let tail = &mut words[whole.len()..];
            tail.fill(0);
            if let ([last], Some(w)) = (rest, tail.first_mut()) {
                *w = word(*last, bf16::ZERO);
            }
        }
    } else if a.rs == 1 {
        // Transposed (a weight gradient's `xᵀ`): each column's rows are
        // contiguous; pair t interleaves columns 2t and 2t+1.
        let column = |p: usize| (p < end).then(|| &a.data[a.offset + p * a.cs + r0..][..rows]);
        for t in 0..pairs {
            let (p, q) = (p0 + 2 * t, p0 + 2 * t + 1);
            match (column(p), column(q)) {
                (Some(lo), Some(hi)) => {
                    for (i, (&l, &h)) in lo.iter().zip(hi).enumerate() {
                        filled[i * pairs + t] = word(l, h);
                    }
                }
                (Some(lo), None) => {
                    for (i, &l) in lo.iter().enumerate() {
                        filled[i * pairs + t] = word(l, bf16::ZERO);
                    }
                }
                _ => (0..rows).for_each(|i| filled[i * pairs + t] = 0),
            }
        }
    } else {
        for (i, words) in filled.chunks_exact_mut(pairs).enumerate() {
            let at = |p: usize| if p < end { a.at(r0 + i, p) } else { 0 };
            for (t, w) in words.iter_mut().enumerate() {
                let p = p0 + 2 * t;
                *w = at(p) | (at(p + 1) << 16);
            }
        }
    }
}

/// One product `c = a·b` (`c` row-major, `n` wide) with `tile`.
fn one(
    tile: Tile,
    a: Mat<'_>,
    b: Mat<'_>,
    (m, k, n): (usize, usize, usize),
    c: &mut [MaybeUninit<f32>],
    rounded: Option<&mut [MaybeUninit<bf16>]>,
    pool: &Workers,
) {
    // A row-major A with an even k is read in place, pairs as words.
    let in_place = a.cs == 1 && k % 2 == 0;
    // B's panels for one k block, in this thread's scratch (every word is
    // written by `pack_b` before the kernels read it).
    let words = n.div_ceil(tile.nr) * tile.nr * tile.stored_pairs(KC.min(k));
    crate::scratch::sized(words, |buf| {
        let b_packed: &mut [u32] = bytemuck::cast_slice_mut(buf);
        let rounded = rounded.map(SharedC::of);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            // Rounded in the last k block's tasks.
            let last = (pc + kc == k).then_some(rounded.as_ref()).flatten();
            block(
                tile,
                a,
                b,
                (m, n),
                (pc, kc),
                in_place,
                b_packed,
                c,
                last,
                pool,
            );
        }
    });
}

/// One k block `pc..pc+kc` of [`one`]: B's panels packed (over the team
/// when there are several and enough words), then row blocks of C, each
/// row tile rounded into `rounded` when given (the last k block).
#[allow(clippy::too_many_arguments)]
fn block(
    tile: Tile,
    a: Mat<'_>,
    b: Mat<'_>,
    (m, n): (usize, usize),
    (pc, kc): (usize, usize),
    in_place: bool,
    b_packed: &mut [u32],
    c: &mut [MaybeUninit<f32>],
    rounded: Option<&SharedC<bf16>>,
    pool: &Workers,
) {
    let Tile { mr, nr, .. } = tile;
    let panels = n.div_ceil(nr);
    // The block's pairs, and those each panel stores (zero pairs after).
    let (pairs, stored) = (kc.div_ceil(2), tile.stored_pairs(kc));
    let jobs = b_packed
        .chunks_exact_mut(nr * stored)
        .take(panels)
        .enumerate();
    let bt = b.transposed();
    let pack = |(q, panel): (usize, &mut [u32])| {
        let (words, padding) = panel.split_at_mut(nr * pairs);
        pack_a(bt, q * nr, n, (pc, pc + kc), nr, words);
        padding.fill(0);
    };
    if panels > 1 && panels * nr * stored >= PACK_PARALLEL_MIN_WORDS && pool.threads() > 1 {
        pool.for_each(jobs.collect(), pack);
    } else {
        jobs.for_each(pack);
    }
    let b_packed = &*b_packed;
    let first = pc == 0;
    // Row blocks: at most MC rows, and few enough rows that every thread
    // gets a share of a short product (128 rows on 2 threads: 72 + 56, not
    // 96 + 32). Any cut computes every element the same way.
    let split = m * n * kc >= PARALLEL_MIN_WORK && m > mr && pool.threads() > 1;
    let rows_per_task = match split {
        true => m.div_ceil(pool.threads()).next_multiple_of(mr).min(MC),
        false => MC,
    };
    let task = |(block, rows): (usize, &mut [MaybeUninit<f32>])| {
        let r0 = block * rows_per_task;
        let rows_here = rows.len() / n;
        let mut edge = [0f32; EDGE];
        // SAFETY: the AMX tile is chosen only where `amx::available()`.
        let _tiles = tile.amx.then(|| unsafe { amx::Tiles::new() });
        crate::scratch::sized(mr * stored, |a_buf| {
            let a_panel: &mut [u32] = bytemuck::cast_slice_mut(a_buf);
            for ir in (0..rows_here).step_by(mr) {
                let rows_tile = mr.min(rows_here - ir);
                // A's words: (pointer in bf16 elements, row step, pair step);
                // in place only where the block has no padding to read.
                let (ap, rs, ps) = if in_place && rows_tile == mr && stored == pairs {
                    let start = a.offset + (r0 + ir) * a.rs + pc;
                    // The last word read, row mr−1's pair `pairs − 1`, ends
                    // at element start + (mr−1)·rs + 2·pairs − 1, inside A.
                    assert!(start + (mr - 1) * a.rs + 2 * pairs <= a.data.len());
                    (a.data[start..].as_ptr().cast::<u16>(), a.rs, 2)
                } else if tile.amx {
                    pack_a_rows(a, r0 + ir, r0 + rows_here, (pc, pc + kc), mr, a_panel);
                    (a_panel.as_ptr().cast::<u16>(), 2 * stored, 2)
                } else {
                    pack_a(a, r0 + ir, r0 + rows_here, (pc, pc + kc), mr, a_panel);
                    (a_panel.as_ptr().cast::<u16>(), 2, 2 * mr)
                };
                for q in 0..panels {
                    let bp = b_packed[q * nr * stored..][..nr * stored].as_ptr();
                    let cols = nr.min(n - q * nr);
                    let words = Words {
                        a: ap,
                        rs,
                        ps,
                        b: bp,
                        pairs: stored,
                    };
                    if rows_tile == mr && cols == nr {
                        let dst = rows[ir * n + q * nr..][..(mr - 1) * n + nr].as_mut_ptr();
                        // SAFETY: `available()` was checked by the caller;
                        // A's words are in bounds (in place: the assertion
                        // above; packed: `mr·stored` words), B's panel holds
                        // `nr·stored` words, and C's `mr` rows of `nr`
                        // floats `n` apart lie in the slice taken above —
                        // written by the first k block, before later
                        // blocks add to them.
                        unsafe { run(tile, words, dst.cast(), n, !first) };
                    } else {
                        // SAFETY: as above, into the `mr × nr` buffer.
                        unsafe { run(tile, words, edge.as_mut_ptr(), nr, false) };
                        for (i, part) in edge.chunks_exact(nr).take(rows_tile).enumerate() {
                            let row = &mut rows[(ir + i) * n + q * nr..][..cols];
                            for (cv, &t) in row.iter_mut().zip(part) {
                                if first {
                                    cv.write(t);
                                } else {
                                    // SAFETY: the first k block wrote it.
                                    unsafe { *cv.assume_init_mut() += t };
                                }
                            }
                        }
                    }
                }
                if let Some(rounded) = rounded {
                    let tile_c = &mut rows[ir * n..(ir + rows_tile) * n];
                    // SAFETY: this is the last k block, and the loop over
                    // the panels above stored or added every element of
                    // the tile's rows.
                    let tile_c = unsafe { crate::fresh::assume_written(tile_c) };
                    rounded.write_rounded((r0 + ir) * n, tile_c);
                }
            }
        });
    };
    let blocks = c.chunks_mut(rows_per_task * n).enumerate();
    if split {
        pool.for_each(blocks.collect(), task);
    } else {
        blocks.for_each(task);
    }
}

/// The bf16 copy of C, which the row blocks of the last k block write
/// rounded, each its own rows (the [`SharedC`] contract).
impl SharedC<bf16> {
    /// `c` rounded into elements `at..at + c.len()`.
    fn write_rounded(&self, at: usize, c: &[f32]) {
        assert!(at + c.len() <= self.len, "bf16 GEMM: rounded rows past C");
        // SAFETY: in bounds (asserted); each task writes only its own
        // rows, so no two writers share an element (`SharedC`'s contract).
        let out = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), c.len()) };
        wide::to_bf16_into(KernelSet::Avx512, c, out);
    }
}

/// A tile's operands: A's pair words at `a + i·rs + t·ps` (bf16 elements;
/// read unaligned), B's packed panel of `pairs` rows of words.
#[derive(Clone, Copy)]
pub(super) struct Words {
    pub(super) a: *const u16,
    pub(super) rs: usize,
    pub(super) ps: usize,
    pub(super) b: *const u32,
    pub(super) pairs: usize,
}

/// Runs `tile`'s kernel.
///
/// # Safety
/// As [`kernel`]'s, for the tile's `mr` rows and `nr` columns.
unsafe fn run(tile: Tile, w: Words, c: *mut f32, ldc: usize, add: bool) {
    // SAFETY: forwarded from the caller.
    unsafe { (tile.kernel)(w, c, ldc, add) }
}

/// The `MR × 16·NV` tile `Σₜ A[t]·B̃[t]` over the pairs of `w`, stored into
/// (or, with `add`, added to) `c`, rows `ldc` apart.
///
/// # Safety
/// The processor supports AVX-512F and AVX-512 BF16; `w.a + i·rs + t·ps`
/// is readable as 2 bf16 for `i < MR`, `t < pairs`; `w.b` holds
/// `pairs·16·NV` words; `c` has `MR` rows of `16·NV` floats, `ldc` apart.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const MR: usize, const NV: usize>(w: Words, c: *mut f32, ldc: usize, add: bool) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let (mut a, mut b) = (w.a, w.b);
    for _ in 0..w.pairs {
        // SAFETY: within B's panel (the contract above); a __m512bh is 32
        // bf16, the same 64 bytes as 16 u32 words.
        let bv: [__m512bh; NV] = std::array::from_fn(|v| unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b.add(16 * v).cast()))
        });
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: as above; the word is the pair (a[i,2t], a[i,2t+1]).
            let ai = unsafe {
                let word = a.add(i * w.rs).cast::<u32>().read_unaligned();
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(word as i32))
            };
            for (r, &bj) in row.iter_mut().zip(&bv) {
                *r = _mm512_dpbf16_ps(*r, ai, bj);
            }
        }
        // SAFETY: one pair further in A and one row of words in B (the last
        // step's pointers are never dereferenced).
        unsafe {
            a = a.add(w.ps);
            b = b.add(16 * NV);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, &r) in row.iter().enumerate() {
            // SAFETY: c has MR rows of 16·NV floats, ldc apart.
            unsafe {
                let p = c.add(i * ldc + 16 * v);
                let sum = if add {
                    _mm512_add_ps(_mm512_loadu_ps(p), r)
                } else {
                    r
                };
                _mm512_storeu_ps(p, sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` bf16 values in `[−1, 1)` from the Philox stream `salt`.
    fn values(n: usize, salt: u64) -> Vec<bf16> {
        let u = |i| 2.0 * kiln_core::rng::uniform(salt, 0, i) - 1.0;
        (0..n as u64).map(|i| bf16::from_f32(u(i))).collect()
    }

    /// The AMX kernel's products are within the f32 dot-product bound of
    /// the exact ones (its rounding is not `vdpbf16ps`'s, so its bits
    /// differ), and the same bits on one thread and two: row-major and
    /// transposed A, edge tiles in both directions, several k blocks, k
    /// blocks padded to whole tile steps (odd ones too).
    #[test]
    fn the_amx_kernel_is_within_the_bound_on_any_thread_count() {
        if !(available() && amx::available()) {
            assert!(
                std::env::var("KILN_REQUIRE_AMX").is_err(),
                "KILN_REQUIRE_AMX is set, but this processor (or its operating system) offers no AMX-BF16"
            );
            eprintln!("skipped: no AMX-BF16 here");
            return;
        }
        let (one_thread, two) = (Workers::new(1).unwrap(), Workers::new(2).unwrap());
        let shapes = [
            (32, 32, 32),
            (45, 64, 77),
            (100, 1088, 33),
            (16, 128, 200),
            // k not whole tile steps: zero-padded pairs (and an odd k).
            (33, 784, 64),
            (17, 37, 40),
            (64, 5, 48),
            (40, 1000, 35),
        ];
        for &(m, k, n) in &shapes {
            let (ad, bd) = (values(m * k, 1), values(k * n, 2));
            let b = Mat {
                data: &bd,
                offset: 0,
                rs: n,
                cs: 1,
            };
            for transposed in [false, true] {
                let a = match transposed {
                    false => Mat {
                        data: &ad,
                        offset: 0,
                        rs: k,
                        cs: 1,
                    },
                    true => Mat {
                        data: &ad,
                        offset: 0,
                        rs: 1,
                        cs: m,
                    },
                };
                let run = |pool: &Workers| -> Vec<f32> {
                    let mut c = vec![MaybeUninit::new(f32::NAN); m * n];
                    one(AMX, a, b, (m, k, n), &mut c, None, pool);
                    // SAFETY: initialised above (and overwritten by `one`).
                    c.iter().map(|v| unsafe { v.assume_init() }).collect()
                };
                let got = run(&one_thread);
                let case = format!("{m}×{k}×{n}, transposed A {transposed}");
                let bits = |c: &[f32]| c.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&run(&two)), "{case}: 1 and 2 threads");
                let f = |x: bf16| f64::from(x.to_f32());
                for i in 0..m {
                    for j in 0..n {
                        let terms = (0..k)
                            .map(|p| f(a.data[a.offset + i * a.rs + p * a.cs]) * f(bd[p * n + j]));
                        let (exact, mass) =
                            terms.fold((0.0, 0.0), |(s, w), t| (s + t, w + t.abs()));
                        let bound = kiln_core::bounds::dot(k, mass)
                            + kiln_core::bounds::flush(kiln_core::DType::BF16, k);
                        let err = (f64::from(got[i * n + j]) - exact).abs();
                        assert!(
                            err <= bound,
                            "{case}: c[{i}, {j}] = {} against {exact}, bound {bound}",
                            got[i * n + j]
                        );
                    }
                }
            }
        }
    }
}
