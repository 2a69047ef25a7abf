//! The GEMM for outputs 1, 2, 4, 8, 9, 10 or 12 columns wide — a classifier's last
//! layer (10 classes) and its weight gradient: no packing, every vector
//! lane doing useful work.
//!
//! The blocked driver's tiles are 16 columns wide (6 × 16 AVX2), so a
//! 10-wide output leaves 6 of every 16 lanes idle and spends its time in
//! edge-tile copies. Here a tile is 8 rows of C and all `n` of its
//! columns, `n = 8·Q + R` with `Q ∈ {0, 1}` and `R ∈ {0, 1, 2, 4}`:
//!
//! - the first `8·Q` columns of each row in one 8-lane vector, as usual
//!   (A's element broadcast, B's row loaded);
//! - the last `R` columns of **several rows** share a vector: for
//!   `R = 2`, lanes `(row 0: col 8, col 9), (row 1: col 8, col 9), …` of
//!   four rows, multiplied by B's two last elements repeated four times
//!   and by the four rows' A elements spread two lanes each (blends of the
//!   broadcasts the first columns already needed).
//!
//! So `n = 10` costs two vector multiply-adds per row and step for ten
//! useful products — 1.25 instead of 2 — and B is read in place (its rows
//! must be contiguous), A in place with any strides.
//!
//! Every element is still one fused multiply-add per step, in k order,
//! summed per `KC` block and the blocks added into C: the packed driver's
//! order, so the two paths give the same bits.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use std::mem::MaybeUninit;

use super::pack::Matrix;
use super::rows;
use crate::workers::Workers;
use crate::KernelSet;

/// Rows of C per tile.
const TILE_ROWS: usize = 8;

/// Multiply-adds from which a product is split over the team by rows: a
/// quarter of the blocked driver's threshold, as this path packs nothing
/// and a fork costs about 0.7 µs. An MLP's 10-class head on a batch of
/// 1,000 (1000 × 64 × 10) ran on the calling thread while the other
/// waited; split, the seed MLP's forward pass took 277 µs a batch against
/// 291 (medians, 2-core Xeon, alternating runs).
const SPLIT_MIN_WORK: usize = 1 << 18;

/// Whether a product `m × k · k × n` with `b` takes this path on `set`.
///
/// Widths 9, 10 and 12 keep 9–12 accumulators, B's two vectors and four
/// broadcasts live: that needs AVX-512VL's 32 registers. In AVX2's 16 the
/// compiler spills accumulators to the stack (measured at 128 × 64 × 10:
/// 37 GFLOP/s against the blocked path's 51), so there those widths stay
/// on the blocked path.
pub(crate) fn applies(set: KernelSet, n: usize, b: &Matrix<'_>) -> bool {
    let fits = match n {
        1 | 2 | 4 | 8 => true,
        9 | 10 | 12 => registers32(set),
        _ => false,
    };
    cfg!(target_arch = "x86_64")
        && matches!(set, KernelSet::Avx2 | KernelSet::Avx512)
        && fits
        && b.cs() == 1
}

/// Whether the kernels of `set` may use 32 vector registers.
fn registers32(set: KernelSet) -> bool {
    #[cfg(target_arch = "x86_64")]
    if set == KernelSet::Avx512 {
        return std::arch::is_x86_feature_detected!("avx512vl");
    }
    let _ = set;
    false
}

/// `c = a·b` — or `c += a·b` when not `fresh` — for an `m × k` `a` (any
/// strides) and a `k × n` `b` with contiguous rows ([`applies`] must
/// hold), into the row-major `m × n` slice `c`, in blocks of `kc_block`
/// steps; split over `pool`'s threads by whole tiles when worth it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    set: KernelSet,
    kc_block: usize,
    a: &Matrix<'_>,
    b: &Matrix<'_>,
    (m, k, n): (usize, usize, usize),
    c: &mut [MaybeUninit<f32>],
    fresh: bool,
    pool: Option<&Workers>,
) {
    debug_assert!(applies(set, n, b) && c.len() >= m * n);
    let threads = pool.map_or(1, Workers::threads);
    let product = Product {
        set,
        kc_block,
        a,
        b,
        k,
        n,
        fresh,
    };
    let task_rows = rows_per_task(m, threads);
    let run = |(block, rows): (usize, &mut [MaybeUninit<f32>])| {
        product.rows(block * task_rows, rows.len() / n, rows);
    };
    let per_task = task_rows * n;
    match pool.filter(|_| threads > 1 && m * k * n >= SPLIT_MIN_WORK && m > TILE_ROWS) {
        Some(pool) => pool.for_each(c[..m * n].chunks_mut(per_task).enumerate().collect(), run),
        None => c[..m * n].chunks_mut(per_task).enumerate().for_each(run),
    }
}

/// Rows of C per task: whole tiles, one share per thread.
fn rows_per_task(m: usize, threads: usize) -> usize {
    m.div_ceil(threads)
        .next_multiple_of(TILE_ROWS)
        .max(TILE_ROWS)
}

/// One product's operands: `C (+)= A·B` over `k` steps in blocks of
/// `kc_block`, C `n` wide.
struct Product<'p, 'a> {
    set: KernelSet,
    kc_block: usize,
    a: &'p Matrix<'a>,
    b: &'p Matrix<'a>,
    k: usize,
    n: usize,
    fresh: bool,
}

impl Product<'_, '_> {
    /// Rows `i0..i0+mb` of C into `c` (`mb` rows of `n`).
    fn rows(&self, i0: usize, mb: usize, c: &mut [MaybeUninit<f32>]) {
        let Product {
            set,
            kc_block,
            a,
            b,
            k,
            n,
            fresh,
        } = *self;
        let whole = mb / TILE_ROWS * TILE_ROWS;
        if k == 0 {
            if fresh {
                crate::fresh::zeros(&mut c[..mb * n]);
            }
            return;
        }
        if whole > 0 {
            #[cfg(target_arch = "x86_64")]
            self.tiles(i0, whole, c);
        }
        if whole < mb {
            // At most 7 rows left: the few-rows path, whose order is the same.
            let rest = &mut c[whole * n..mb * n];
            let r = mb - whole;
            if fresh {
                let tail = a.shifted(i0 + whole, 0);
                rows::gemm(set, kc_block, &tail, b, (r, k, n), rest, None);
            } else {
                // Each KC block's sums added into C in turn, as the tiles do.
                // SAFETY: not fresh: the caller's C holds values.
                let rest = unsafe { crate::fresh::assume_written(rest) };
                let mut block = vec![0f32; rest.len()];
                for pc in (0..k).step_by(kc_block) {
                    let kc = kc_block.min(k - pc);
                    let (ta, tb) = (a.shifted(i0 + whole, pc), b.shifted(pc, 0));
                    // SAFETY: the rows path writes only computed values.
                    let slots = unsafe { crate::fresh::as_slots(&mut block) };
                    rows::gemm(set, kc_block, &ta, &tb, (r, kc, n), slots, None);
                    rest.iter_mut().zip(&block).for_each(|(c, t)| *c += t);
                }
            }
        }
    }

    /// `rows` (a multiple of [`TILE_ROWS`]) rows of C from row `i0` of A.
    #[cfg(target_arch = "x86_64")]
    fn tiles(&self, i0: usize, rows: usize, c: &mut [MaybeUninit<f32>]) {
        let Product {
            set,
            kc_block,
            a,
            b,
            k,
            n,
            fresh,
        } = *self;
        // Bounds of every element the kernels read, checked once here.
        let (ad, bd) = (a.data(), b.data());
        assert!(rows.is_multiple_of(TILE_ROWS) && c.len() >= rows * n);
        assert!(a.index(i0 + rows - 1, k - 1) < ad.len() && b.index(k - 1, n - 1) < bd.len());
        let vl = registers32(set);
        for t in (0..rows).step_by(TILE_ROWS) {
            for pc in (0..k).step_by(kc_block) {
                let kc = kc_block.min(k - pc);
                let add = !(fresh && pc == 0);
                let ap = ad[a.index(i0 + t, pc)..].as_ptr();
                let bp = bd[b.index(pc, 0)..].as_ptr();
                let cp = c[t * n..].as_mut_ptr().cast::<f32>();
                let args = Tile {
                    kc,
                    a: ap,
                    rsa: a.rs(),
                    csa: a.cs(),
                    b: bp,
                    ldb: b.rs(),
                    c: cp,
                    ldc: n,
                    add,
                };
                // SAFETY: AVX2 and FMA were checked when the backend was
                // built (`set` is Avx2 or Avx512, which includes them), and
                // AVX-512F with VL by `registers32`; A's 8 × kc block, B's kc rows of n and
                // C's 8 rows of n are inside their buffers (the asserts above:
                // the strides are non-negative, so the last element bounds
                // them all).
                unsafe {
                    if vl {
                        by_width_vl(n, &args)
                    } else {
                        by_width(n, &args)
                    }
                }
            }
        }
    }
}

/// One tile's operands: `C[i, j] (+)= Σₚ A[i·rsa + p·csa]·B[p·ldb + j]`
/// for `i < 8`, `j < n`, `p < kc`, C's rows `ldc` apart.
#[cfg(target_arch = "x86_64")]
struct Tile {
    kc: usize,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    add: bool,
}

/// The tile for output width `n`, AVX2 + FMA.
///
/// # Safety
/// AVX2 and FMA are present; the tile's elements are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn by_width(n: usize, t: &Tile) {
    // SAFETY: forwarded.
    unsafe { dispatch(n, t) }
}

/// [`by_width`] with AVX-512VL's 32 vector registers (no spills).
///
/// # Safety
/// AVX-512F, AVX-512VL, AVX2 and FMA are present; the tile's elements
/// are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn by_width_vl(n: usize, t: &Tile) {
    // SAFETY: forwarded.
    unsafe { dispatch(n, t) }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dispatch(n: usize, t: &Tile) {
    // SAFETY: forwarded; each instance reads and writes only n columns.
    unsafe {
        match n {
            1 => tile::<0, 1>(t),
            2 => tile::<0, 2>(t),
            4 => tile::<0, 4>(t),
            8 => tile::<1, 0>(t),
            9 => tile::<1, 1>(t),
            10 => tile::<1, 2>(t),
            12 => tile::<1, 4>(t),
            _ => unreachable!("narrow GEMM of width {n}"),
        }
    }
}

/// A's elements of four rows `bc` (broadcasts) for the shared-lane
/// columns: `R = 4` gives two vectors (rows 0–1 and 2–3, four lanes
/// each), `R = 2` one (two lanes a row); `R = 1` one holding rows 0–3 in
/// lanes 0–3 and again in 4–7, which [`tile`] merges with the next four
/// rows'. Working on four rows at a time keeps the AVX2 build within its
/// 16 registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn spread<const R: usize>(bc: &[__m256; 4]) -> [__m256; 2] {
    // SAFETY: the caller has AVX (part of AVX2).
    unsafe {
        match R {
            4 => [
                _mm256_blend_ps::<0xF0>(bc[0], bc[1]),
                _mm256_blend_ps::<0xF0>(bc[2], bc[3]),
            ],
            2 => {
                let lo = _mm256_blend_ps::<0xCC>(bc[0], bc[1]);
                let hi = _mm256_blend_ps::<0xCC>(bc[2], bc[3]);
                [_mm256_blend_ps::<0xF0>(lo, hi), lo]
            }
            _ => {
                let lo = _mm256_blend_ps::<0xAA>(bc[0], bc[1]);
                let hi = _mm256_blend_ps::<0xAA>(bc[2], bc[3]);
                [_mm256_blend_ps::<0xCC>(lo, hi), lo]
            }
        }
    }
}

/// B's last `R` elements of a row repeated across 8 lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn repeat<const R: usize>(b: *const f32) -> __m256 {
    // SAFETY: b points at R readable floats (any alignment: the loads
    // below are unaligned ones, and the compiler folds each into one
    // broadcast from memory).
    unsafe {
        match R {
            4 => {
                let four = _mm_loadu_ps(b);
                _mm256_set_m128(four, four)
            }
            2 => _mm256_castpd_ps(_mm256_set1_pd(b.cast::<f64>().read_unaligned())),
            _ => _mm256_set1_ps(b.read()),
        }
    }
}

/// The tile for `n = 8·Q + R`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile<const Q: usize, const R: usize>(t: &Tile) {
    // SAFETY: the caller has AVX2 and FMA.
    let zero = unsafe { _mm256_setzero_ps() };
    let mut full = [zero; TILE_ROWS];
    let mut shared = [zero; 4];
    for p in 0..t.kc {
        // SAFETY: in bounds by `tiles`' checks: A's (i, p) for i < 8,
        // B's row p of n = 8·Q + R floats.
        unsafe {
            let brow = t.b.add(p * t.ldb);
            let b0 = if Q == 1 { _mm256_loadu_ps(brow) } else { zero };
            let br = if R > 0 {
                repeat::<R>(brow.add(8 * Q))
            } else {
                zero
            };
            let mut first_half = zero;
            for h in 0..2 {
                let mut bc = [zero; 4];
                for (i, v) in bc.iter_mut().enumerate() {
                    *v = _mm256_broadcast_ss(&*t.a.add((4 * h + i) * t.rsa + p * t.csa));
                }
                if Q == 1 {
                    for (acc, &ai) in full[4 * h..4 * h + 4].iter_mut().zip(&bc) {
                        *acc = _mm256_fmadd_ps(ai, b0, *acc);
                    }
                }
                let s = spread::<R>(&bc);
                match R {
                    4 => {
                        shared[2 * h] = _mm256_fmadd_ps(s[0], br, shared[2 * h]);
                        shared[2 * h + 1] = _mm256_fmadd_ps(s[1], br, shared[2 * h + 1]);
                    }
                    2 => shared[h] = _mm256_fmadd_ps(s[0], br, shared[h]),
                    1 if h == 0 => first_half = s[0],
                    1 => {
                        let rows = _mm256_blend_ps::<0xF0>(first_half, s[0]);
                        shared[0] = _mm256_fmadd_ps(rows, br, shared[0]);
                    }
                    _ => {}
                }
            }
        }
    }
    // SAFETY: C's 8 rows of n = 8·Q + R floats, ldc apart, are in bounds.
    unsafe {
        if Q == 1 {
            for (i, acc) in full.iter().enumerate() {
                let ci = t.c.add(i * t.ldc);
                let v = if t.add {
                    _mm256_add_ps(_mm256_loadu_ps(ci), *acc)
                } else {
                    *acc
                };
                _mm256_storeu_ps(ci, v);
            }
        }
        if let Some(rows_per_vector) = 8usize.checked_div(R) {
            for (v, acc) in shared.iter().enumerate().take(R) {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
                for (l, &x) in lanes.iter().enumerate() {
                    let row = v * rows_per_vector + l / R;
                    let cv = t.c.add(row * t.ldc + 8 * Q + l % R);
                    *cv = if t.add { *cv + x } else { x };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{accumulate, Matrix};
    use crate::KernelSet;

    /// `C += A·B` into a C that already holds values (a convolution's
    /// accumulated products) gives the packed driver's bits: the same
    /// blocks added in the same order. The packed driver runs for a B
    /// stored transposed.
    #[test]
    fn accumulating_into_c_gives_the_packed_bits() {
        let sets = [KernelSet::Avx2, KernelSet::Avx512];
        for set in sets.into_iter().filter(|s| s.available()) {
            for &(m, k, n) in &[
                (8, 5, 10),
                (21, 300, 10),
                (16, 70, 8),
                (11, 3, 12),
                (9, 260, 1),
            ] {
                let a: Vec<f32> = (0..m * k)
                    .map(|x| ((x * 37) % 17) as f32 / 7.0 - 1.0)
                    .collect();
                let b: Vec<f32> = (0..k * n)
                    .map(|x| ((x * 11) % 13) as f32 / 5.0 - 1.2)
                    .collect();
                let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
                let c0: Vec<f32> = (0..m * n).map(|x| (x % 7) as f32 * 0.3).collect();
                let a_m = Matrix::from_slice(&a, 0, k, 1);
                let (mut narrow, mut packed) = (c0.clone(), c0.clone());
                assert!(super::applies(set, n, &Matrix::from_slice(&b, 0, n, 1)) || n > 8);
                accumulate(
                    set,
                    &a_m,
                    &Matrix::from_slice(&b, 0, n, 1),
                    (m, k, n),
                    &mut narrow,
                    false,
                );
                accumulate(
                    set,
                    &a_m,
                    &Matrix::from_slice(&bt, 0, 1, k),
                    (m, k, n),
                    &mut packed,
                    false,
                );
                assert_eq!(narrow, packed, "{set:?} {m}×{k}×{n}");
                assert_ne!(narrow, c0);
            }
        }
    }
}
