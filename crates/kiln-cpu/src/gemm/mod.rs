//! Packed, blocked GEMM for the SIMD kernel sets (BLIS-style).
//!
//! Contract of every micro-kernel ([`MicroKernel`]): given packed panels
//! `Ã` (`kc × MR`, column `p` of the panel holding `A[i0..i0+MR, p]`) and
//! `B̃` (`kc × NR`), write the `MR × NR` tile `Σₚ Ã[p]·B̃[p]ᵀ` row-major to
//! `c`. Panels are zero-padded to whole tiles, so kernels never read or write
//! outside their buffers; the driver copies only the valid part of an edge
//! tile into C (a last panel at most half full is computed by the kernel's
//! left half alone, [`MicroKernel::half_tile_into`]). Outputs at most [`DIRECT_A_MAX_PANELS`] panels wide read A
//! in place, and, in short row blocks, B too ([`MicroKernel::tile_into`]
//! takes both operands' strides).
//!
//! Blocking ([`blocking`]): `NC` columns of B at a time, `KC` rows of the k
//! dimension at a time, and row blocks of A of at most `MC` rows (packed
//! per task), sized from this processor's caches. Threads take whole row
//! blocks of C and share each packed block of B — all of B's k blocks
//! packed in one fork when they fit 4 MiB — or, for few rows and many
//! columns, whole panels of columns of every row, each packing its own
//! panels of B — or, for few rows over several k blocks with B read in
//! place, whole k blocks of every row, each block's sum a partial of its
//! own added into C in block order. Every C element is accumulated in the
//! same order (k ascending within a `KC` block, each block's sum added to
//! C, blocks ascending) whatever the split, the thread count or `MC`, so
//! results are independent of the number of threads.

pub(crate) mod blocking;
mod narrow;
pub(crate) mod pack;
mod rows;
#[cfg(target_arch = "x86_64")]
mod tile;

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod bf16;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::borrow::Cow;
use std::mem::MaybeUninit;

use crate::workers::Workers;
use kiln_core::{Activation, Error, GemmEpilogue, HostData, Result, View};

use crate::reference::elementwise::activate;
use crate::storage::read_f32;
use crate::vector::convert;
use crate::KernelSet;
use blocking::{Blocking, KC_MAX};
pub(crate) use pack::Matrix;
use pack::{pack_a, pack_b};

/// Multiply-adds below which a block is not split among threads.
const PARALLEL_MIN_WORK: usize = 1 << 20;
/// Multiply-adds below which a batch of small products stays on one thread.
const BATCH_MIN_WORK: usize = 1 << 18;
/// Output elements per task of the epilogue (bias, activation, `β·C₀`).
const EPILOGUE_PER_TASK: usize = 1 << 15;
/// Floats of packed B (4 MiB) up to which a product of several k blocks
/// packs all of them at once ([`pack::pack_b_all`]).
const WHOLE_K_MAX: usize = 1 << 20;
/// The largest tile of any micro-kernel (AVX-512: 8 × 32).
const MAX_TILE: usize = 8 * 32;
/// Outputs at most this many micro-panels wide read A in place instead of
/// packing it: a packed A block would be reused by too few B panels to
/// repay the copy (the MLP's 64- and 10-wide layers).
const DIRECT_A_MAX_PANELS: usize = 4;

/// Rows per row block up to which a product of [`DIRECT_A_MAX_PANELS`]
/// whole panels or fewer, with B's rows contiguous, reads B in place
/// instead of packing it (on kernels with `B_IN_PLACE`). On two threads
/// with 64-row blocks, the MLP's 128 × 784 × 64 forward product went from
/// 141–177 to 193–321 GFLOP/s without the packing fork, the CNN's 128 ×
/// 5408 × 64 from 151–219 to 228–270; with more rows per block (1000 × 784
/// × 64, 768 × 512 × 128) the in-place panel, its rows 256–512 bytes
/// apart, measured 8–15 % slower than a packed one, whose lines fill every
/// L1 set. (Whatever the row blocks, B is read in place when its k block
/// fills at most three quarters of L1D: the MLP's weight gradient, 784 ×
/// 128 × 64 in 104-row blocks, skipped its packing fork, 74–77 → 69 µs on
/// two threads in two of three alternating rounds and alike in the third.)
const IN_PLACE_B_MAX_ROWS: usize = 64;

/// Row blocks per thread, at least, of a product at most
/// [`DIRECT_A_MAX_PANELS`] wide on several threads. Such products are
/// short (tens of microseconds in the MLP's step), and a thread whose
/// inputs sit in the other core's cache runs its half about a fifth
/// slower (400 KB written on one core read at 19 GB/s from the other, 56
/// from its own, on the Emerald Rapids Xeon): with whole halves the first
/// thread waited for the second; with smaller blocks, a thread done with
/// its own share takes over the other's last ones. MLP epochs on 2
/// threads, medians of 15 epoch times: 0.138 s with two row blocks in all,
/// 0.136 s with four, 0.120 s with eight (this setting; with each thread
/// owning its share, fourteenth session: 0.0751 s against 0.0761 with
/// four).
const ROW_TASKS_PER_THREAD: usize = 4;

/// Rows up to which a product read as in [`IN_PLACE_B_MAX_ROWS`] with at
/// least a k block per thread splits its k blocks over the threads rather
/// than its rows. Split by rows, each thread reads all of B: the MLP's
/// 784 × 64 weight, whose halves the optimiser's two threads had just
/// updated, crossed between the cores' caches at every step, and the two
/// halves of each input row went to different cores in the forward pass
/// and in the weight gradient. Split by k, thread t reads the same half of
/// the weight the optimiser's thread t updates and the same columns of
/// the input the gradient's thread t reads, for one m × n partial sum per
/// k block added up at the end (block order: the same bits). Seed MLP
/// epochs on the 2-core Xeon, alternating runs: 0.0650 → 0.0620 s; the
/// CNN's (128 × 5408 × 64 in 22 blocks of KC 256) 0.90 → 0.82 s. With more rows the
/// partial sums outweigh B.
const SPLIT_K_MAX_ROWS: usize = 128;

/// Floats of partial sums (16 MiB) up to which a product splits by k
/// blocks: the CNN's 128 × 5408 × 64 takes 172 Ki (80 Ki with a Zen 4's
/// KC 512); a deeper product splits
/// by rows, as one thread would need no scratch at all.
const SPLIT_K_MAX_PARTIALS: usize = 1 << 22;

/// Floats of partial sums from which a k-split product adds them into C on
/// the whole team (the CNN's 21 partials of 128 × 64, 10 on a Zen 4)
/// rather than on the calling thread (the MLP's 3, 1 on a Zen 4).
const REDUCE_SPLIT_MIN: usize = 1 << 16;

/// A register-blocked kernel computing one `MR × NR` tile from panels of
/// A and B, packed or read in place.
pub(crate) trait MicroKernel {
    /// Rows of the tile.
    const MR: usize;
    /// Columns of the tile.
    const NR: usize;
    /// Writes `Σₚ a[p·MR + i]·b[p·NR + j]` to `c[i·NR + j]`.
    ///
    /// # Safety
    /// The processor supports the kernel's instruction set; `a` holds
    /// `kc·MR` floats, `b` holds `kc·NR`, `c` has room for `MR·NR`.
    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32);

    /// Whether [`MicroKernel::half_tile_into`] computes half a tile on its
    /// own (where the default computes the whole tile: no path changes).
    const HALF_TILE: bool = false;

    /// Whether [`MicroKernel::tile_into`] reads B in place at full speed
    /// (any `rsb`); the driver reads B in place only for kernels that do.
    const B_IN_PLACE: bool = false;

    /// `c[i·ldc + j] += tile(i, j)` (`add`) or `c[i·ldc + j] = tile(i, j)`
    /// for a whole tile, with A read as in [`MicroKernel::tile_strided`]
    /// (`rsa = 1, csa = MR` for a packed panel) and B's row `p` the `NR`
    /// floats at `b[p·rsb ..]` (`rsb = NR` for a packed panel): the call
    /// the driver makes. Storing without reading C matters for fresh
    /// output buffers: reading a page first maps the
    /// shared zero page, and the write that follows then costs a
    /// copy-on-write fault and a TLB shootdown across every worker thread.
    /// The default goes through a buffer.
    ///
    /// # Safety
    /// As for [`MicroKernel::tile_strided`], except that `b[p·rsb + j]` is
    /// in bounds for `p < kc`, `j < NR` (where `tile_strided` has a packed
    /// panel), and `c` holds `MR` rows of `NR` floats, `ldc` apart.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_into(
        kc: usize,
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        rsb: usize,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        if (rsb, ldc, add) == (Self::NR, Self::NR, false) {
            // A packed B panel into a bare tile: nothing to merge.
            // SAFETY: forwarded; c holds MR rows of NR floats, NR apart.
            return unsafe { Self::tile_strided(kc, a, rsa, csa, b, c) };
        }
        let mut tile = [0f32; MAX_TILE];
        if rsb == Self::NR {
            // SAFETY: forwarded (B is a packed panel); the buffer holds
            // MAX_TILE ≥ MR·NR floats.
            unsafe { Self::tile_strided(kc, a, rsa, csa, b, tile.as_mut_ptr()) };
        } else {
            // B in place, for kernels without `B_IN_PLACE` (the driver does
            // not ask them): the same sums, one element at a time.
            for i in 0..Self::MR {
                for j in 0..Self::NR {
                    // SAFETY: A's and B's elements are in bounds (the contract).
                    tile[i * Self::NR + j] = (0..kc).fold(0f32, |acc, p| unsafe {
                        (*a.add(i * rsa + p * csa)).mul_add(*b.add(p * rsb + j), acc)
                    });
                }
            }
        }
        for i in 0..Self::MR {
            for j in 0..Self::NR {
                let t = tile[i * Self::NR + j];
                // SAFETY: c holds MR rows of NR floats, ldc apart.
                unsafe {
                    let cv = c.add(i * ldc + j);
                    *cv = if add { *cv + t } else { t };
                }
            }
        }
    }

    /// The same tile with A read in place: element `(i, p)` of the
    /// `MR × kc` block at `a[i·rsa + p·csa]`, no packing. The default
    /// gathers the block into a packed panel on the stack and calls
    /// [`MicroKernel::tile`].
    ///
    /// # Safety
    /// As for [`MicroKernel::tile`], and every `a[i·rsa + p·csa]` with
    /// `i < MR`, `p < kc ≤ KC_MAX` is in bounds.
    unsafe fn tile_strided(
        kc: usize,
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        c: *mut f32,
    ) {
        if (rsa, csa) == (1, Self::MR) {
            // Already a packed panel.
            // SAFETY: forwarded.
            return unsafe { Self::tile(kc, a, b, c) };
        }
        debug_assert!(kc <= KC_MAX);
        crate::scratch::with(|panel| {
            panel.clear();
            panel.extend((0..kc).flat_map(|p| {
                // SAFETY: in bounds by the caller's contract.
                (0..Self::MR).map(move |i| unsafe { *a.add(i * rsa + p * csa) })
            }));
            // SAFETY: the panel holds kc·MR floats; the rest is forwarded.
            unsafe { Self::tile(kc, panel.as_ptr(), b, c) }
        })
    }

    /// The tile's left half, columns `j < NR / 2`, stored (not added) to
    /// `c[i·ldc + j]`, with A and B read as in [`MicroKernel::tile_into`]
    /// (`rsb = NR` for a packed panel): the driver's call for the last
    /// panel of an output whose columns fill at most half of it (the GPT's
    /// LM head, 73 columns: two whole AVX-512 panels and 9). Columns from
    /// `NR / 2` on are left unspecified. Kernels whose tile is two vectors
    /// wide compute one vector; the default computes the whole tile.
    ///
    /// # Safety
    /// As for [`MicroKernel::tile_into`] (`c` holds `MR` rows of `NR`
    /// floats, `ldc` apart).
    #[allow(clippy::too_many_arguments)]
    unsafe fn half_tile_into(
        kc: usize,
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        rsb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY: forwarded.
        unsafe { Self::tile_into(kc, a, rsa, csa, b, rsb, c, ldc, false) }
    }
}

/// A GEMM's operands checked and read: what both the reference and the
/// packed implementations start from.
pub(crate) struct Problem<'a> {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub dtype: kiln_core::DType,
    pub bias: Option<Cow<'a, [f32]>>,
    pub c0: Option<(f32, Cow<'a, [f32]>)>,
}

impl<'a> Problem<'a> {
    /// Checks shapes and dtypes and reads the epilogue operands.
    pub(crate) fn new(
        a: View<'_, HostData>,
        b: View<'_, HostData>,
        ep: &GemmEpilogue<'a, HostData>,
    ) -> Result<Self> {
        let kiln_core::GemmPlan {
            batch,
            m,
            k,
            n,
            dtype,
        } = kiln_core::GemmPlan::new(a, b, ep)?;
        let bias = ep.bias.map(|v| read_f32("gemm", v)).transpose()?;
        let c0 = ep
            .beta_c
            .map(|(beta, v)| read_f32("gemm", v).map(|c| (beta, c)))
            .transpose()?;
        Ok(Problem {
            batch,
            m,
            k,
            n,
            dtype,
            bias,
            c0,
        })
    }

    /// Whether `act(α·acc + β·C₀ + bias)` leaves the products as they are
    /// (α = 1, no C₀, no bias, no activation): the result is then only
    /// stored in the operands' dtype.
    pub(crate) fn plain(&self, alpha: f32, act: Activation) -> bool {
        alpha == 1.0 && self.c0.is_none() && self.bias.is_none() && act == Activation::None
    }

    /// Applies `act(α·acc + β·C₀ + bias)` to the accumulated products and
    /// stores the result in the operands' dtype; over `pool`'s threads in
    /// blocks of rows when given. Each step is one pass over a row, in
    /// that order, so the rounding is the same for every element whatever
    /// the split.
    pub(crate) fn finish(
        &self,
        set: KernelSet,
        mut out: Vec<f32>,
        alpha: f32,
        act: Activation,
        pool: Option<&Workers>,
    ) -> Result<HostData> {
        if self.plain(alpha, act) {
            // Nothing to apply: skip a pass over the output.
            return convert::store_f32_on(set, pool, "gemm", self.dtype, out);
        }
        let n = self.n.max(1);
        let rows_per_task = (EPILOGUE_PER_TASK / n).max(1);
        let epilogue = |(task, block): (usize, &mut [f32])| {
            for (r, row) in block.chunks_mut(n).enumerate() {
                let i = task * rows_per_task + r;
                if alpha != 1.0 {
                    row.iter_mut().for_each(|c| *c *= alpha);
                }
                if let Some((beta, c0)) = &self.c0 {
                    for (c, &z) in row.iter_mut().zip(&c0[i * n..(i + 1) * n]) {
                        *c += beta * z;
                    }
                }
                if let Some(bias) = &self.bias {
                    for (c, &b) in row.iter_mut().zip(bias.iter()) {
                        *c += b;
                    }
                }
                if act != Activation::None {
                    row.iter_mut().for_each(|c| *c = activate(act, *c));
                }
            }
        };
        let split = out.len() > rows_per_task * n;
        let blocks = out.chunks_mut(rows_per_task * n).enumerate();
        match pool.filter(|p| split && p.threads() > 1) {
            Some(pool) => pool.for_each(blocks.collect(), epilogue),
            None => blocks.for_each(epilogue),
        }
        convert::store_f32_on(set, pool, "gemm", self.dtype, out)
    }
}

/// The packed GEMM with the micro-kernel of `set` (a SIMD set this
/// processor supports), on `pool`.
pub(crate) fn gemm(
    set: KernelSet,
    a: View<'_, HostData>,
    b: View<'_, HostData>,
    ep: &GemmEpilogue<'_, HostData>,
    pool: &Workers,
) -> Result<HostData> {
    let prob = Problem::new(a, b, ep)?;
    let (batch, m, k, n) = (prob.batch, prob.m, prob.k, prob.n);
    // bf16 on AVX-512 BF16: pairs of products per instruction, f32 sums.
    #[cfg(target_arch = "x86_64")]
    if set == KernelSet::Avx512 && prob.dtype == kiln_core::DType::BF16 && bf16::available() {
        let total = batch * m * n;
        if total == 0 || k == 0 {
            let out = vec![0f32; total];
            return prob.finish(set, out, ep.alpha, ep.activation, Some(pool));
        }
        let mut out: Vec<f32> = Vec::with_capacity(total);
        // Nothing to apply after the product: the bf16 result is rounded
        // by the GEMM's own tasks, each tile while it is in cache.
        let plain = prob.plain(ep.alpha, ep.activation);
        let mut rounded: Vec<kiln_core::bf16> = Vec::with_capacity(if plain { total } else { 0 });
        let done = bf16::gemm(
            a,
            b,
            (batch, m, k, n),
            &mut out.spare_capacity_mut()[..total],
            plain.then(|| &mut rounded.spare_capacity_mut()[..total]),
            pool,
        );
        if done.is_some() {
            if plain {
                // SAFETY: `bf16::gemm` returned Some with `rounded` given,
                // so it wrote every element of it.
                unsafe { rounded.set_len(total) };
                return Ok(HostData::BF16(rounded));
            }
            // SAFETY: `bf16::gemm` returned Some, so it wrote every element.
            unsafe { out.set_len(total) };
            return prob.finish(set, out, ep.alpha, ep.activation, Some(pool));
        }
    }
    // f32 operands are packed straight from their strided storage; f16 and
    // bf16 are widened to f32 first (exact).
    let (a32, b32) = (Matrix::batched(set, a)?, Matrix::batched(set, b)?);
    if k == 0 || m == 0 || n == 0 {
        // Empty sums (or an empty output): zeros, with no product to run.
        let out = vec![0f32; batch * m * n];
        return prob.finish(set, out, ep.alpha, ep.activation, Some(pool));
    }
    // Fresh output, not zeroed: every product path stores each element of
    // its C (the first k block stores, later ones add), so none is read
    // before it is written.
    let total = batch * m * n;
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let c_all = &mut out.spare_capacity_mut()[..total];
    let each = m * k * n;
    if batch > 1 && each < PARALLEL_MIN_WORK && batch * each >= BATCH_MIN_WORK {
        // A batch of small products (attention's per-head matrices):
        // whole products per task, each on one thread.
        let jobs = c_all.chunks_mut(m * n).enumerate().collect();
        pool.map(jobs, |(p, c)| {
            product(set, &a32.batch(p), &b32.batch(p), (m, k, n), c, None)
        })
        .into_iter()
        .collect::<Result<()>>()?;
    } else {
        for (p, c) in c_all.chunks_mut(m * n).enumerate() {
            product(set, &a32.batch(p), &b32.batch(p), (m, k, n), c, Some(pool))?;
        }
    }
    // SAFETY: every product returned Ok (an error returns above, leaving
    // the vector empty), and a product with k > 0 writes all m × n
    // elements of its C: the paths in `product` store every element in
    // their first k block.
    unsafe { out.set_len(total) };
    prob.finish(set, out, ep.alpha, ep.activation, Some(pool))
}

/// `c = a·b` for one product of a batch with `set`'s micro-kernel, split
/// among `pool`'s threads when given and worth it; `k > 0`, and `c` (fresh)
/// is written whole before any of it is read.
fn product(
    set: KernelSet,
    a: &Matrix<'_>,
    b: &Matrix<'_>,
    (m, k, n): (usize, usize, usize),
    c: &mut [MaybeUninit<f32>],
    pool: Option<&Workers>,
) -> Result<()> {
    debug_assert!(k > 0);
    let blk = blocking_of(set).for_depth(k);
    if rows::applies(set, m, b) {
        rows::gemm(set, blk.kc, a, b, (m, k, n), c, pool);
        return Ok(());
    }
    if narrow::applies(set, n, b) {
        narrow::gemm(set, blk.kc, a, b, (m, k, n), c, true, pool);
        return Ok(());
    }
    match set {
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx2 => blocked::<avx2::Avx2>(blk, a, b, m, k, n, c, true, pool),
        // A 32-wide tile would waste most of its lanes on narrow outputs.
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx512 if n <= 16 => blocked::<avx2::Avx2>(blk, a, b, m, k, n, c, true, pool),
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx512 => blocked::<avx512::Avx512>(blk, a, b, m, k, n, c, true, pool),
        #[cfg(target_arch = "aarch64")]
        KernelSet::Neon => blocked::<neon::Neon>(blk, a, b, m, k, n, c, true, pool),
        other => {
            return Err(Error::invalid(format!(
                "no packed GEMM for kernel set {}",
                other.name()
            )))
        }
    }
    Ok(())
}

/// `c += a·b` — or `c = a·b` when `fresh`, without reading `c` — for an
/// `m × k` and a `k × n` strided f32 matrix into the row-major `m × n`
/// slice `c`, with `set`'s micro-kernel on the calling thread (convolutions
/// split their work over images themselves).
pub(crate) fn accumulate(
    set: KernelSet,
    a: &Matrix<'_>,
    b: &Matrix<'_>,
    (m, k, n): (usize, usize, usize),
    c: &mut [f32],
    fresh: bool,
) {
    if fresh && k == 0 {
        c[..m * n].fill(0.0);
    }
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let blk = blocking_of(set).for_depth(k);
    // SAFETY: the paths below write only computed values into C.
    let c = unsafe { crate::fresh::as_slots(c) };
    if narrow::applies(set, n, b) {
        return narrow::gemm(set, blk.kc, a, b, (m, k, n), c, fresh, None);
    }
    match set {
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx2 => blocked::<avx2::Avx2>(blk, a, b, m, k, n, c, fresh, None),
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx512 if n <= 16 => blocked::<avx2::Avx2>(blk, a, b, m, k, n, c, fresh, None),
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx512 => blocked::<avx512::Avx512>(blk, a, b, m, k, n, c, fresh, None),
        #[cfg(target_arch = "aarch64")]
        KernelSet::Neon => blocked::<neon::Neon>(blk, a, b, m, k, n, c, fresh, None),
        _ => {
            // The scalar set never gets here; be correct anyway.
            // SAFETY: the caller's C is initialised (`as_slots` above).
            let c = unsafe { crate::fresh::assume_written(c) };
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0f32;
                    for p in 0..k {
                        acc += a.at(i, p) * b.at(p, j);
                    }
                    let cv = &mut c[i * n + j];
                    *cv = if fresh { acc } else { *cv + acc };
                }
            }
        }
    }
}

/// The blocking of `set`'s products: derived for the set's widest
/// micro-kernel and used by all its kernels, so that `KC` — the summation
/// order, with [`Blocking::for_depth`] for a product's depth — is one per
/// set and depth ([`rows`] and [`narrow`] follow it too).
pub(crate) fn blocking_of(set: KernelSet) -> Blocking {
    static SETS: [std::sync::OnceLock<Blocking>; 4] = [const { std::sync::OnceLock::new() }; 4];
    let (mr, nr) = tile_of(set);
    let (slot, fma) = match set {
        KernelSet::Avx512 => (0, blocking::Fma::of_avx512()),
        KernelSet::Avx2 => (1, blocking::Fma::Full),
        KernelSet::Neon => (2, blocking::Fma::Full),
        KernelSet::Scalar => (3, blocking::Fma::Full),
    };
    *SETS[slot].get_or_init(|| Blocking::for_tile(fma, mr, nr))
}

/// The rows and columns of `set`'s widest micro-kernel, `MR × NR` (8 × 8
/// for the scalar loops, and for a set this target has no kernel of).
fn tile_of(set: KernelSet) -> (usize, usize) {
    match set {
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx512 => (avx512::Avx512::MR, avx512::Avx512::NR),
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx2 => (avx2::Avx2::MR, avx2::Avx2::NR),
        #[cfg(target_arch = "aarch64")]
        KernelSet::Neon => (neon::Neon::MR, neon::Neon::NR),
        _ => (8, 8),
    }
}

/// Where `set`'s products change path on this machine: its micro-tile
/// (and, on x86, a tile and a half wide, where a last panel stops being
/// computed by [`MicroKernel::half_tile_into`]), and the `KC`, `MC` and `NC`
/// [`blocking_of`] derived from this
/// machine's caches (or `KILN_GEMM_BLOCKING` gave); `KC` is also where a
/// convolution's patch takes a second k block. The conformance suite
/// aims at these beside kiln's defaults ([`CpuBackend`]'s capabilities).
///
/// [`CpuBackend`]: crate::CpuBackend
pub(crate) fn switch_points(set: KernelSet) -> kiln_core::SwitchPoints {
    let (mr, nr) = tile_of(set);
    let b = blocking_of(set);
    kiln_core::SwitchPoints {
        gemm_m: vec![mr, b.mc],
        gemm_n: if half_tile_of(set) {
            vec![nr, nr + nr / 2, b.nc]
        } else {
            vec![nr, b.nc]
        },
        gemm_k: vec![b.kc],
        row: Vec::new(),
        elements: Vec::new(),
        conv_patch: vec![b.kc],
        conv_channels: Vec::new(),
        conv_batch: Vec::new(),
        conv_reduction: Vec::new(),
    }
}

/// Whether `set`'s widest kernel computes half a tile on its own
/// ([`MicroKernel::HALF_TILE`]).
fn half_tile_of(set: KernelSet) -> bool {
    match set {
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx512 => avx512::Avx512::HALF_TILE,
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx2 => avx2::Avx2::HALF_TILE,
        #[cfg(target_arch = "aarch64")]
        KernelSet::Neon => neon::Neon::HALF_TILE,
        _ => false,
    }
}

/// Rows of C handed to the tasks of one product, each of which writes its
/// own elements — a block of rows, or panels of columns of every row —
/// and no other; the product waits for all of them before C is read. (The
/// bf16 GEMM hands its rounded copy of C to its tasks the same way.)
#[derive(Clone, Copy)]
struct SharedC<T = f32> {
    /// The first element of the rows.
    ptr: *mut MaybeUninit<T>,
    /// Elements from `ptr` to the end of C.
    len: usize,
}

// SAFETY: a `SharedC` is only given to tasks that write disjoint elements
// of it (see the type's docs) while its owner waits for them.
unsafe impl<T: Send> Send for SharedC<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedC<T> {}

impl<T> SharedC<T> {
    /// The rows `c`, for tasks that write disjoint parts of them.
    fn of(c: &mut [MaybeUninit<T>]) -> Self {
        SharedC {
            ptr: c.as_mut_ptr(),
            len: c.len(),
        }
    }

    /// Elements `start .. start + len` of these, for a task of their own.
    fn part(self, start: usize, len: usize) -> Self {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "a part past the end of C"
        );
        SharedC {
            ptr: self.ptr.wrapping_add(start),
            len,
        }
    }
}

/// `task((i, block))` for each block `i` of `len` elements of `c` (the
/// last may be shorter): spread over `pool`'s threads when given, else in
/// order on this one.
fn each_block(
    c: &mut [MaybeUninit<f32>],
    len: usize,
    pool: Option<&Workers>,
    task: impl Fn((usize, &mut [MaybeUninit<f32>])) + Sync,
) {
    let blocks = c.chunks_mut(len).enumerate();
    match pool {
        Some(pool) => pool.for_each(blocks.collect(), task),
        None => blocks.for_each(task),
    }
}

/// Where a row block's micro-kernels read B.
#[derive(Clone, Copy)]
enum Panels<'b> {
    /// The k block's `NR`-wide panels, packed (`pack_b` or `pack_b_all`).
    Packed(&'b [f32]),
    /// B's own rows, `rs` apart: whole panels of contiguous columns.
    InPlace,
}

/// One `m × k` by `k × n` product accumulated into the row-major `c`, on
/// `pool` when given and the product is worth splitting.
#[allow(clippy::too_many_arguments)]
fn blocked<K: MicroKernel>(
    blk: Blocking,
    a: &Matrix<'_>,
    b: &Matrix<'_>,
    m: usize,
    k: usize,
    n: usize,
    c: &mut [MaybeUninit<f32>],
    fresh: bool,
    pool: Option<&Workers>,
) {
    // Row blocks: whole tiles of at most MC rows, as many as a multiple of
    // the thread count and of even height, so that the threads finish
    // together (512 rows in MC = 200 would be 200, 200 and 112: one
    // thread's 312 rows against 256) — and, for outputs a few panels wide
    // on several threads, at least ROW_TASKS_PER_THREAD per thread.
    let threads = pool.map_or(1, Workers::threads);
    let mc_max = (blk.mc / K::MR * K::MR).max(K::MR);
    let nc_max = (blk.nc / K::NR * K::NR).max(K::NR);
    let direct = n.div_ceil(K::NR) <= DIRECT_A_MAX_PANELS;
    let least = if direct && threads > 1 {
        threads * ROW_TASKS_PER_THREAD
    } else {
        1
    };
    let blocks = m.div_ceil(mc_max).max(least).next_multiple_of(threads);
    let mc = m
        .div_ceil(blocks)
        .next_multiple_of(K::MR)
        .clamp(K::MR, mc_max);
    // Those outputs in whole panels, with B's rows contiguous, and row
    // blocks short enough that a packed B would be reused by few tiles —
    // or a k block of B small enough to stay in L1D whatever its layout,
    // beside A's and C's lines (at most three quarters of it: the MLP's
    // 128 × 64 `dy` in its weight gradient `xᵀ·dy`, 32 of 48 KiB) — read B
    // in place too, on kernels that can.
    let b_block_in_l1 = k.min(blk.kc) * n * std::mem::size_of::<f32>()
        <= blocking::Caches::of_this_machine().l1d / 4 * 3;
    let in_place = K::B_IN_PLACE
        && direct
        && (mc <= IN_PLACE_B_MAX_ROWS || b_block_in_l1)
        && b.cs() == 1
        && n.is_multiple_of(K::NR);
    // Rows `ic .. ic + mcb` of C (`rows`: C from row ic on), columns
    // `jc..jc + nc`, from the k block of `kc` steps at `pc` (`panels`:
    // where B's are read). It writes those elements of C and no other, through
    // `rows`' pointer: callers give concurrent calls disjoint rows or
    // disjoint columns (`SharedC`).
    let row_block_to = |(jc, nc): (usize, usize),
                        (pc, kc): (usize, usize),
                        panels: Panels<'_>,
                        (ic, mcb): (usize, usize),
                        rows: SharedC,
                        add: bool| {
        assert!(
            ic + mcb <= m && jc + nc <= n && rows.len >= mcb * n,
            "GEMM driver: rows {ic}.. ({mcb}), columns {jc}.. ({nc}) of {m} × {n}, {} elements given",
            rows.len
        );
        // Direct mode packs only a partial last panel of rows.
        let full = if direct { mcb / K::MR * K::MR } else { 0 };
        crate::scratch::with(|a_packed| {
            pack_a(a, ic + full, mcb - full, pc, kc, K::MR, a_packed);
            let mut tile = [0f32; MAX_TILE];
            for jr in (0..nc).step_by(K::NR) {
                let nr = K::NR.min(nc - jr);
                // B's panel: packed, or B's own rows `rs` apart (a whole
                // panel of columns: `in_place` needs n a multiple of NR).
                let (b_panel, rsb) = match panels {
                    Panels::Packed(packed) => (
                        packed[(jr / K::NR) * K::NR * kc..][..K::NR * kc].as_ptr(),
                        K::NR,
                    ),
                    Panels::InPlace => {
                        // Whole panels only: n and NC are multiples of NR.
                        debug_assert_eq!(nr, K::NR);
                        let start = b.index(pc, jc + jr);
                        let end = b.index(pc + kc - 1, jc + jr + K::NR - 1);
                        (b.data()[start..=end].as_ptr(), b.rs())
                    }
                };
                for ir in (0..mcb).step_by(K::MR) {
                    let mr = K::MR.min(mcb - ir);
                    // A's block: in place (direct mode) or a packed panel.
                    let (a_ptr, rsa, csa) = if ir < full {
                        let start = a.index(ic + ir, pc);
                        (a.data()[start..].as_ptr(), a.rs(), a.cs())
                    } else {
                        let panel = (ir - full) / K::MR;
                        let a_panel = &a_packed[panel * K::MR * kc..][..K::MR * kc];
                        (a_panel.as_ptr(), 1, K::MR)
                    };
                    // A whole tile accumulates straight into C; an edge
                    // tile goes through the buffer.
                    let whole = mr == K::MR && nr == K::NR;
                    let (dst, ldc, add_here) = if whole {
                        // SAFETY: row ir, column jc + jr of the rows given:
                        // inside them (asserted above).
                        (
                            unsafe { rows.ptr.add(ir * n + jc + jr).cast::<f32>() },
                            n,
                            add,
                        )
                    } else {
                        (tile.as_mut_ptr(), K::NR, false)
                    };
                    // SAFETY: the kernel set was checked against this
                    // processor when the backend was built; A's MR×kc block
                    // is inside its (bounds-checked) matrix or packed panel;
                    // B's kc rows of NR floats, rsb apart, are inside its
                    // packed panel or the slice of B taken above; `dst` holds
                    // MR rows of NR floats, ldc apart: the tile buffer
                    // (MAX_TILE ≥ MR·NR), or C's rows given (asserted above),
                    // whose elements no concurrent call writes (its rows or
                    // its columns are others: the `SharedC` contract).
                    unsafe {
                        if nr <= K::NR / 2 {
                            // The last panel, at most half full: half a
                            // tile's work, into the buffer (`whole` is
                            // false).
                            K::half_tile_into(kc, a_ptr, rsa, csa, b_panel, rsb, dst, ldc)
                        } else {
                            K::tile_into(kc, a_ptr, rsa, csa, b_panel, rsb, dst, ldc, add_here)
                        }
                    };
                    if whole {
                        continue;
                    }
                    for i in 0..mr {
                        // SAFETY: columns jc + jr .. + nr of row ir + i,
                        // inside the rows given, and no concurrent call
                        // touches them (as above).
                        let row = unsafe {
                            std::slice::from_raw_parts_mut(rows.ptr.add((ir + i) * n + jc + jr), nr)
                        };
                        let part = &tile[i * K::NR..i * K::NR + nr];
                        if add {
                            // SAFETY: `add` means an earlier k
                            // block (or the caller) wrote C.
                            let row = unsafe { crate::fresh::assume_written(row) };
                            for (cv, &t) in row.iter_mut().zip(part) {
                                *cv += t;
                            }
                        } else {
                            crate::fresh::copy(row, part);
                        }
                    }
                }
            }
        });
    };
    // The first k block of a fresh C stores instead of adding.
    let row_block = |cols: (usize, usize),
                     (pc, kc): (usize, usize),
                     panels: Panels<'_>,
                     rows_at: (usize, usize),
                     rows: SharedC| {
        row_block_to(cols, (pc, kc), panels, rows_at, rows, !(fresh && pc == 0))
    };
    // Few rows and many columns (a batch times a wide layer, `dy·Wᵀ`):
    // each thread takes whole panels of columns and all the rows, packing
    // only its own panels of B, in one fork — where cutting the few rows
    // in two has both threads wait at every k block for a B packed for
    // both, twice per block. (Not for two panels over a long k, the dense
    // layers' forward pass: with a panel per thread both would read all
    // of A from memory, and training measured no gain.)
    let panels = n.div_ceil(K::NR);
    let columns = pool.filter(|_| {
        threads > 1
            && m <= mc_max
            && panels >= 2 * threads
            && m * n * k.min(blk.kc) >= threads * PARALLEL_MIN_WORK
    });
    if let Some(pool) = columns {
        let per = panels.div_ceil(threads) * K::NR;
        let ranges: Vec<(usize, usize)> = (0..n)
            .step_by(per)
            .map(|j0| (j0, per.min(n - j0)))
            .collect();
        let all = SharedC::of(c);
        pool.for_each(ranges, |(j0, width)| {
            crate::scratch::with(|b_packed| {
                for jc in (j0..j0 + width).step_by(nc_max) {
                    let nc = nc_max.min(j0 + width - jc);
                    for pc in (0..k).step_by(blk.kc) {
                        let kc = blk.kc.min(k - pc);
                        pack_b(b, pc, kc, jc, nc, K::NR, b_packed, None);
                        row_block((jc, nc), (pc, kc), Panels::Packed(b_packed), (0, m), all);
                    }
                }
            })
        });
        return;
    }
    // Few rows, B in place and several k blocks (the MLP's 128 × 784 × 64
    // forward product, the CNN's 128 × 5408 × 64): each thread takes whole
    // k blocks of every row instead of all of k for some rows.
    let k_blocks = k.div_ceil(blk.kc);
    let split_k = pool.filter(|_| {
        in_place
            && threads > 1
            && k_blocks >= threads
            && m <= SPLIT_K_MAX_ROWS
            && (k_blocks - 1) * m * n <= SPLIT_K_MAX_PARTIALS
            && m * n * k >= threads * PARALLEL_MIN_WORK
    });
    if let Some(pool) = split_k {
        // Block 0 goes into C (added to it unless fresh); every other
        // block's sum into a partial of its own, from zero; then C plus
        // the partials in block order — each element's additions exactly
        // those of one thread running the blocks in turn (a tile's sum is
        // added to C once per block), so the bits do not depend on the
        // split.
        //
        // The partials live in this thread's scratch, kept between calls: a
        // fresh allocation per product (98 KB for the MLP's, 688 KB for the
        // CNN's dense layer) came back from the allocator as freshly
        // mapped pages, a fault per page on the first write.
        let each = m * n;
        crate::scratch::sized((k_blocks - 1) * each, |partials| {
            // SAFETY: the tasks write only computed values through the view.
            let spare = SharedC::of(unsafe { crate::fresh::as_slots(partials) });
            let all = SharedC::of(c);
            // Each block in as few parts of its rows as make the tasks a
            // multiple of the thread count, so that the threads end level
            // (the CNN's 128 × 5408 × 64 in 11 blocks of 492 on a Zen 4,
            // 2 threads: 6 blocks against 5 took 207 GFLOP/s, 22 half
            // blocks 219) — and at least two per thread, so that a thread
            // that starts late (a helper finishing a unit of the loader's
            // work) leaves the other half a block to take over, not a whole
            // one to wait for (the MLP's 128 × 784 × 64 is 2 blocks; its
            // step's jobs of two tasks — this one, Adam's halves — found the
            // helper busy in a third of the steps, and the caller ran both
            // tasks). Thread t's own share is still whole k blocks but for a
            // part at each end.
            let parts = (1..2 * threads)
                .find(|p| (k_blocks * p).is_multiple_of(threads) && k_blocks * p >= 2 * threads)
                .unwrap_or(2 * threads);
            let part_rows = m.div_ceil(parts).next_multiple_of(K::MR);
            pool.run(k_blocks * parts, |task| {
                let (spare, all) = (spare, all);
                let (block, part) = (task / parts, task % parts);
                let (pc, kc) = (block * blk.kc, blk.kc.min(k - block * blk.kc));
                let ic = part * part_rows;
                if ic >= m {
                    return;
                }
                let rows = part_rows.min(m - ic);
                let (dst, add) = match block {
                    0 => (all, !fresh),
                    _ => (spare.part((block - 1) * each, each), false),
                };
                let dst = dst.part(ic * n, rows * n);
                for jc in (0..n).step_by(nc_max) {
                    let nc = nc_max.min(n - jc);
                    row_block_to((jc, nc), (pc, kc), Panels::InPlace, (ic, rows), dst, add);
                }
            });
            // Every block's tasks wrote all of its partial (row_block_to
            // writes each element of the rows and columns it is given, and
            // block b's parts together were all m rows and n columns of
            // partial b − 1); a task's panic was resumed above.
            // SAFETY: block 0's task wrote (or added to) all of C, as above.
            let c = unsafe { crate::fresh::assume_written(c) };
            let rows_per_task = m.div_ceil(2 * threads).max(1);
            let partials = &*partials;
            let sum = |(task, rows): (usize, &mut [f32])| {
                let at = task * rows_per_task * n;
                for part in partials.chunks_exact(each) {
                    for (cv, &p) in rows.iter_mut().zip(&part[at..]) {
                        *cv += p;
                    }
                }
            };
            let tasks = c.chunks_mut(rows_per_task * n).enumerate();
            if (k_blocks - 1) * each >= REDUCE_SPLIT_MIN {
                pool.for_each(tasks.collect(), sum);
            } else {
                tasks.for_each(sum);
            }
        });
        return;
    }
    if in_place {
        // Each task runs its rows through every block of B, read in place:
        // one fork, and no copy of B — which a few-row product reuses too
        // little to repay (the MLP's 784 × 64 weight packed for 128 rows
        // was 12 % of its forward product's samples).
        let task = |(block, rows): (usize, &mut [MaybeUninit<f32>])| {
            let rows = SharedC::of(rows);
            let height = rows.len / n;
            for jc in (0..n).step_by(nc_max) {
                let nc = nc_max.min(n - jc);
                for pc in (0..k).step_by(blk.kc) {
                    let kc = blk.kc.min(k - pc);
                    row_block(
                        (jc, nc),
                        (pc, kc),
                        Panels::InPlace,
                        (block * mc, height),
                        rows,
                    );
                }
            }
        };
        let split =
            pool.filter(|_| threads > 1 && m > mc && m * n * k.min(blk.kc) >= PARALLEL_MIN_WORK);
        each_block(c, mc * n, split, task);
        return;
    }
    crate::scratch::with(|b_packed| {
        for jc in (0..n).step_by(nc_max) {
            let nc = nc_max.min(n - jc);
            // Forking costs microseconds: only products worth more than
            // that are split over the team, and only theirs packs B in
            // parallel (a 9 × 676 convolution patch matrix packed on two
            // threads took longer than its product on one).
            let worth = |kc: usize| threads > 1 && m > mc && m * nc * kc >= PARALLEL_MIN_WORK;
            let width = nc.div_ceil(K::NR) * K::NR;
            if let Some(pool) =
                pool.filter(|_| k > blk.kc && worth(blk.kc) && width * k <= WHOLE_K_MAX)
            {
                // Several k blocks and a B that fits: all of its blocks
                // packed in one fork, then each thread runs its rows through
                // every block in a second — two forks where block by block
                // takes two per block (128 × 5408 × 64: 42).
                pack::pack_b_all(b, k, blk.kc, jc, nc, K::NR, b_packed, pool);
                let b_packed = &*b_packed;
                each_block(c, mc * n, Some(pool), |(block, rows)| {
                    let (ic, rows) = (block * mc, SharedC::of(rows));
                    for pc in (0..k).step_by(blk.kc) {
                        let kc = blk.kc.min(k - pc);
                        let panels = &b_packed[pc * width..][..kc * width];
                        let panels = Panels::Packed(panels);
                        row_block((jc, nc), (pc, kc), panels, (ic, rows.len / n), rows);
                    }
                });
                continue;
            }
            for pc in (0..k).step_by(blk.kc) {
                let kc = blk.kc.min(k - pc);
                let split = pool.filter(|_| worth(kc));
                pack_b(b, pc, kc, jc, nc, K::NR, b_packed, split);
                let b_packed = &*b_packed;
                let task = |(block, rows): (usize, &mut [MaybeUninit<f32>])| {
                    let rows = SharedC::of(rows);
                    row_block(
                        (jc, nc),
                        (pc, kc),
                        Panels::Packed(b_packed),
                        (block * mc, rows.len / n),
                        rows,
                    )
                };
                each_block(c, mc * n, split, task);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_declares_its_tile_and_this_machines_blocking() {
        for set in KernelSet::ALL.into_iter().filter(|s| s.available()) {
            let cpu = crate::CpuBackend::with_kernels(set).unwrap();
            let caps = kiln_core::Backend::capabilities(&cpu);
            assert!(caps.validate().is_ok());
            let (p, b) = (&caps.switch_points, blocking_of(set));
            let (mr, nr) = tile_of(set);
            assert!(
                p.gemm_m.contains(&mr) && p.gemm_m.contains(&b.mc),
                "{set:?}"
            );
            assert!(
                p.gemm_n.contains(&nr) && p.gemm_n.contains(&b.nc),
                "{set:?}"
            );
            assert!(
                p.gemm_k.contains(&b.kc) && p.conv_patch.contains(&b.kc),
                "{set:?}"
            );
            // kiln's defaults stay declared.
            let mut merged = p.clone();
            merged.merge(&kiln_core::SwitchPoints::default());
            assert_eq!(&merged, p, "{set:?}");
        }
    }

    /// `tile_into` with B read in place (rows `rsb` apart) and from a packed
    /// panel, storing and then adding into a C with rows wider than the
    /// tile: both equal the exact sums (small multiples of 1/32, so every
    /// rounding is exact). `kc` is not a multiple of the unrolled step.
    /// [`MicroKernel::half_tile_into`]'s left half, with A packed or read
    /// in place, holds the same sums.
    fn b_in_place_gives_the_packed_sums<K: MicroKernel>() {
        let (kc, rsb, ldc) = (37, K::NR + 5, K::NR + 3);
        let a: Vec<f32> = (0..kc * K::MR)
            .map(|i| (i % 13) as f32 / 8.0 - 0.75)
            .collect();
        let rows: Vec<f32> = (0..kc * rsb)
            .map(|i| (i % 11) as f32 / 4.0 - 1.25)
            .collect();
        let packed: Vec<f32> = (0..kc)
            .flat_map(|p| rows[p * rsb..][..K::NR].to_vec())
            .collect();
        let exact = |i: usize, j: usize| -> f32 {
            (0..kc)
                .map(|p| a[p * K::MR + i] * packed[p * K::NR + j])
                .sum()
        };
        for (b, rsb) in [(&packed, K::NR), (&rows, rsb)] {
            let mut c = vec![1f32; K::MR * ldc];
            for add in [false, true] {
                // SAFETY: this processor runs K (checked by the caller); A
                // is a packed kc × MR panel, B's rows hold NR floats rsb
                // apart, and C MR rows of ldc ≥ NR floats.
                unsafe {
                    K::tile_into(
                        kc,
                        a.as_ptr(),
                        1,
                        K::MR,
                        b.as_ptr(),
                        rsb,
                        c.as_mut_ptr(),
                        ldc,
                        add,
                    )
                };
            }
            for i in 0..K::MR {
                for j in 0..ldc {
                    let want = if j < K::NR { 2.0 * exact(i, j) } else { 1.0 };
                    assert_eq!(c[i * ldc + j], want, "rsb {rsb}: ({i}, {j})");
                }
            }
            // The left half alone, A packed and read in place (A's rows
            // `rsa` apart): its columns hold the tile's sums.
            let a_rows: Vec<f32> = (0..K::MR * kc)
                .map(|x| a[(x % kc) * K::MR + x / kc])
                .collect();
            for (a, rsa, csa) in [(&a, 1, K::MR), (&a_rows, kc, 1)] {
                let mut c = vec![f32::NAN; K::MR * ldc];
                // SAFETY: as above; A's element (i, p) is at i·rsa + p·csa.
                unsafe {
                    K::half_tile_into(
                        kc,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        c.as_mut_ptr(),
                        ldc,
                    )
                };
                for i in 0..K::MR {
                    for j in 0..K::NR / 2 {
                        let got = c[i * ldc + j];
                        assert_eq!(got, exact(i, j), "half, rsb {rsb}, rsa {rsa}: ({i}, {j})");
                    }
                }
            }
        }
    }

    /// The blocked driver's ways of reading B — in place in short row
    /// blocks, in place in tall ones (a k block of B within L1D), packed
    /// (a k block too large for it), packed by panels of columns — with A
    /// row- or column-major, read in place, against exact sums: each shape
    /// computed fresh on one thread and on a team of two, then added to
    /// on one thread (`accumulate`), for every set this processor runs.
    /// Elements are small multiples of 1/8, so every sum is exact and any
    /// path must give it to the bit. With AVX-512's 8 × 32 tile:
    /// (100, 37, 64) and (300, 41, 64) take tall in-place blocks on one
    /// thread and short ones on the team (too small to fork); (784, 128,
    /// 64) — the MLP's weight gradient — tall in-place blocks, forked on
    /// the team; (600, 120, 64) a 30 KiB B block, in place where L1D is 48
    /// KiB and packed where it is 32; (200, 200, 64) B packed on one thread
    /// and short in-place blocks forked on the team; (90, 300, 128) and
    /// (75, 600, 96) B packed on one thread, and on the team k blocks split
    /// (KC 256) or panels of columns (90 rows at a Zen 4's KC 512) (on
    /// AVX2, 6 × 16, too wide to read A in place: the column and whole-k
    /// packed paths); (128, 784, 64) — the MLP's forward product — and
    /// (100, 600, 64) k blocks split over the team on AVX-512 (KC 256: 4
    /// of 196 and 3 of 200, the latter in row parts; a Zen 4's KC 512: 2
    /// of 392 and 2 of 300; AVX2's 16-wide panels make them the column
    /// path), their partial sums added on the calling thread; (128, 5400,
    /// 64) 22 blocks of 246 (11 of 491 in row parts on a Zen 4), added on
    /// the team; (128, 784, 32) and (128, 1100, 16) k blocks split on
    /// AVX-512 and AVX2 alike (1100 in 5 of 220 or 3 of 367: row parts);
    /// (90, 130, 73), (77, 300, 169) and (40, 37, 65) end in a panel at
    /// most half full on AVX-512 (9, 9 and 1 columns; 1 on AVX2 for 65),
    /// A read in place (3 panels) and packed (6). (NEON's kernel reads B
    /// packed, so never by k blocks.)
    #[test]
    fn every_driver_path_gives_the_exact_sums() {
        let team = Workers::new(2).expect("two worker threads");
        let sets = [KernelSet::Avx512, KernelSet::Avx2, KernelSet::Neon];
        for set in sets.into_iter().filter(|s| s.available()) {
            // (m, k, n), each with a partial last row tile and a k
            // remainder (see above for the paths).
            let shapes = [
                (100, 37, 64),
                (300, 41, 64),
                (784, 128, 64),
                (600, 120, 64),
                (200, 200, 64),
                (90, 300, 128),
                (75, 600, 96),
                (128, 784, 64),
                (100, 600, 64),
                (128, 5400, 64),
                (128, 784, 32),
                (128, 1100, 16),
                (90, 130, 73),
                (77, 300, 169),
                (40, 37, 65),
            ];
            for (m, k, n) in shapes {
                let val =
                    |i: usize, j: usize, s: usize| ((i * 7 + j * 3 + s) % 17) as f32 / 8.0 - 1.0;
                let a_rows: Vec<f32> = (0..m * k).map(|x| val(x / k, x % k, 1)).collect();
                let a_cols: Vec<f32> = (0..m * k).map(|x| val(x % m, x / m, 1)).collect();
                let b: Vec<f32> = (0..k * n).map(|x| val(x / n, x % n, 2)).collect();
                let exact: Vec<f32> = (0..m * n)
                    .map(|x| {
                        let (i, j) = (x / n, x % n);
                        (0..k)
                            .map(|p| f64::from(val(i, p, 1)) * f64::from(val(p, j, 2)))
                            .sum::<f64>() as f32
                    })
                    .collect();
                let twice: Vec<f32> = exact.iter().map(|x| 2.0 * x).collect();
                let bm = Matrix::from_slice(&b, 0, n, 1);
                for (layout, a) in [
                    ("row-major", Matrix::from_slice(&a_rows, 0, k, 1)),
                    ("column-major", Matrix::from_slice(&a_cols, 0, 1, m)),
                ] {
                    for pool in [None, Some(&team)] {
                        let mut out: Vec<f32> = Vec::with_capacity(m * n);
                        product(
                            set,
                            &a,
                            &bm,
                            (m, k, n),
                            &mut out.spare_capacity_mut()[..m * n],
                            pool,
                        )
                        .expect("a supported set");
                        // SAFETY: `product` returned Ok with k > 0: it wrote all m × n.
                        unsafe { out.set_len(m * n) };
                        assert_eq!(
                            out,
                            exact,
                            "{} {m}×{k}×{n}, A {layout}, pool {}",
                            set.name(),
                            pool.is_some()
                        );
                        accumulate(set, &a, &bm, (m, k, n), &mut out, false);
                        assert_eq!(out, twice, "{} {m}×{k}×{n}, A {layout}, added", set.name());
                    }
                }
            }
        }
    }

    #[test]
    fn every_kernel_reads_b_in_place_or_packed_alike() {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                b_in_place_gives_the_packed_sums::<avx512::Avx512>();
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                b_in_place_gives_the_packed_sums::<avx2::Avx2>();
            }
        }
        // NEON's kernel has no in-place form: the trait's default runs.
        #[cfg(target_arch = "aarch64")]
        b_in_place_gives_the_packed_sums::<neon::Neon>();
    }
}
