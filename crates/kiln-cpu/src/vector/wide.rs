//! The reference loops compiled once per SIMD kernel set, with that set's
//! features enabled, so the compiler emits its vector instructions.
//!
//! Each entry takes the kernel set and a scalar body; the body is the same
//! function the reference kernels use, and every op routed here is exactly
//! rounded (relu, add, max, `mul_add`, …), so results are bitwise the
//! reference's. On aarch64 NEON is part of the baseline ISA: the plain loop
//! already is NEON code.

use std::mem::MaybeUninit;

use kiln_core::{bf16, HostData, Result, SgdStep};

use crate::fresh::Slot;
use crate::KernelSet;

// Each loop writes every element of `out` (its inputs are checked to be
// at least as long): what `Workers::filled` relies on.

#[inline(always)]
fn map_loop(x: &[f32], out: &mut [impl Slot], f: impl Fn(f32) -> f32) {
    assert!(
        x.len() >= out.len(),
        "map: {} inputs for {} outputs",
        x.len(),
        out.len()
    );
    for (o, &v) in out.iter_mut().zip(x) {
        o.put(f(v));
    }
}

#[inline(always)]
fn zip_loop(a: &[f32], b: &[f32], out: &mut [impl Slot], f: impl Fn(f32, f32) -> f32) {
    assert!(
        a.len().min(b.len()) >= out.len(),
        "zip: inputs shorter than the output"
    );
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        o.put(f(x, y));
    }
}

#[inline(always)]
fn zip3_loop(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    out: &mut [impl Slot],
    f: impl Fn(f32, f32, f32) -> f32,
) {
    assert!(
        a.len().min(b.len()).min(c.len()) >= out.len(),
        "zip3: inputs shorter than the output"
    );
    for (((o, &x), &y), &z) in out.iter_mut().zip(a).zip(b).zip(c) {
        o.put(f(x, y, z));
    }
}

/// Defines `$name(set, …)`, which runs `$body` compiled for `set`.
macro_rules! per_set {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:path;) => {
        $(#[$doc])*
        ///
        /// `set` must have been checked against this processor (every
        /// `CpuBackend` checks its set when it is built).
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name(set: KernelSet, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                match set {
                    // SAFETY: the set was checked against this processor
                    // (the contract above); AVX-512 sets include AVX2+FMA.
                    KernelSet::Avx2 => return unsafe { avx2($($arg),*) },
                    // SAFETY: as above.
                    KernelSet::Avx512 => return unsafe { avx512($($arg),*) },
                    _ => {}
                }
            }
            let _ = set;
            $body($($arg),*)
        }
    };
}

/// Also for kernels outside this module (`crate::norm`).
pub(crate) use per_set;

per_set! {
    /// `out[i] = f(x[i])`.
    fn map(x: &[f32], out: &mut [impl Slot], f: impl Fn(f32) -> f32) -> () = map_loop;
}

per_set! {
    /// `out[i] = f(a[i], b[i])`.
    fn zip(a: &[f32], b: &[f32], out: &mut [impl Slot], f: impl Fn(f32, f32) -> f32) -> () = zip_loop;
}

per_set! {
    /// `out[i] = f(a[i], b[i], c[i])`.
    fn zip3(a: &[f32], b: &[f32], c: &[f32], out: &mut [impl Slot], f: impl Fn(f32, f32, f32) -> f32) -> () = zip3_loop;
}

#[inline(always)]
fn zip_rows_loop(a: &[f32], row: &[f32], out: &mut [impl Slot], f: impl Fn(f32, f32) -> f32) {
    assert!(
        a.len() >= out.len() && (out.is_empty() || !row.is_empty()),
        "zip_rows: short inputs"
    );
    let len = row.len().max(1);
    for (o, chunk) in out.chunks_mut(len).zip(a.chunks(len)) {
        zip_loop(chunk, row, o, &f);
    }
}

#[inline(always)]
fn zip_cols_loop(
    a: &[f32],
    col: &[f32],
    run: usize,
    out: &mut [impl Slot],
    f: impl Fn(f32, f32) -> f32,
) {
    let run = run.max(1);
    assert!(
        a.len() >= out.len() && col.len() >= out.len().div_ceil(run),
        "zip_cols: short inputs"
    );
    for ((o, chunk), &y) in out.chunks_mut(run).zip(a.chunks(run)).zip(col) {
        map_loop(chunk, o, |x| f(x, y));
    }
}

#[inline(always)]
fn update_loop(x: &mut [f32], f: impl Fn(f32) -> f32) {
    for v in x {
        *v = f(*v);
    }
}

per_set! {
    /// `x[i] = f(x[i])`, in place.
    fn update(x: &mut [f32], f: impl Fn(f32) -> f32) -> () = update_loop;
}

#[inline(always)]
fn max_u32_loop(x: &[u32]) -> u32 {
    x.iter().fold(0, |m, &v| m.max(v))
}

per_set! {
    /// The largest element of `x` (0 when empty).
    fn max_u32(x: &[u32]) -> u32 = max_u32_loop;
}

/// One output row of an unpadded max-pool: the first window offset seeds
/// every column, then for each later offset in row-major order a column
/// takes the offset's cell if it beats the best so far
/// (`!best.is_nan() && (v.is_nan() || v > best)`, the reference's rule).
/// Branch-free over slices, so it vectorises across columns.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pool_row_loop(
    x: &[f32],
    w: usize,
    top: usize,
    kernel: [usize; 2],
    sw: usize,
    best: &mut [f32],
    at: &mut [u32],
) {
    let ow = best.len();
    if ow == 0 {
        return;
    }
    let span = (ow - 1) * sw + 1;
    for di in 0..kernel[0] {
        let row = (top + di) * w;
        for dj in 0..kernel[1] {
            let start = row + dj;
            let cells = &x[start..start + span];
            let first = di == 0 && dj == 0;
            let update = |(j, ((b, a), &v)): (usize, ((&mut f32, &mut u32), &f32))| {
                let idx = (start + j * sw) as u32;
                let take = first | (!b.is_nan() & (v.is_nan() | (v > *b)));
                *b = if take { v } else { *b };
                *a = if take { idx } else { *a };
            };
            let slots = best.iter_mut().zip(at.iter_mut());
            match sw {
                1 => slots.zip(cells).enumerate().for_each(update),
                2 => slots
                    .zip(cells.chunks(2).map(|c| &c[0]))
                    .enumerate()
                    .for_each(update),
                _ => slots
                    .zip(cells.iter().step_by(sw))
                    .enumerate()
                    .for_each(update),
            }
        }
    }
}

per_set! {
    /// An unpadded max-pool's output row whose windows start at input row
    /// `top`: maxima into `best`, their plane indices into `at`.
    fn pool_row(
        x: &[f32],
        w: usize,
        top: usize,
        kernel: [usize; 2],
        sw: usize,
        best: &mut [f32],
        at: &mut [u32]
    ) -> () = pool_row_loop;
}

#[inline(always)]
fn sum_rows_loop(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; cols];
    for row in x.chunks_exact(cols.max(1)) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
    out
}

/// Lanes of the interleaved sums in [`sum_runs`].
const LANES: usize = 16;

/// One run's sum: sixteen interleaved partial sums, combined pairwise, plus
/// the tail summed in order.
#[inline(always)]
fn sum_run(r: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = r.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    let tail = chunks.remainder().iter().fold(0f32, |s, &v| s + v);
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0] + tail
}

#[inline(always)]
fn sum_runs_loop(x: &[f32], run: usize) -> Vec<f32> {
    x.chunks_exact(run.max(1)).map(sum_run).collect()
}

#[inline(always)]
pub(crate) fn max_loop(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut nan = false;
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            nan |= v.is_nan();
            *a = if v > *a { v } else { *a };
        }
    }
    for &v in chunks.remainder() {
        nan |= v.is_nan();
        acc[0] = if v > acc[0] { v } else { acc[0] };
    }
    if nan {
        return f32::NAN;
    }
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

#[inline(always)]
fn scale_loop(x: &mut [f32], divisor: f32) {
    for v in x {
        *v /= divisor;
    }
}

per_set! {
    /// The largest element of `x` (−∞ if empty), NaN if any is NaN.
    fn max(x: &[f32]) -> f32 = max_loop;
}

per_set! {
    /// The sum of `x` in sixteen interleaved lanes (as [`sum_runs`]).
    fn sum(x: &[f32]) -> f32 = sum_run;
}

per_set! {
    /// `x[i] /= divisor`, in place.
    fn scale(x: &mut [f32], divisor: f32) -> () = scale_loop;
}

per_set! {
    /// `out[i] = f(a[i], row[i mod row.len()])`: `row` repeated along `a`,
    /// whose length is a multiple of it.
    fn zip_rows(a: &[f32], row: &[f32], out: &mut [impl Slot], f: impl Fn(f32, f32) -> f32) -> () = zip_rows_loop;
}

per_set! {
    /// `out[i] = f(a[i], col[i / run])`: `a` against one value per run of
    /// `run` elements (an operand broadcast along its trailing axes).
    fn zip_cols(a: &[f32], col: &[f32], run: usize, out: &mut [impl Slot], f: impl Fn(f32, f32) -> f32) -> () = zip_cols_loop;
}

per_set! {
    /// Column sums of the row-major `[len/cols, cols]` matrix `x`, each
    /// summed down the rows in order.
    fn sum_rows(x: &[f32], cols: usize) -> Vec<f32> = sum_rows_loop;
}

per_set! {
    /// The sum of each run of `run` consecutive elements: sixteen
    /// interleaved partial sums combined pairwise, then the tail.
    fn sum_runs(x: &[f32], run: usize) -> Vec<f32> = sum_runs_loop;
}

per_set! {
    /// The reference SGD step ([`crate::reference::optim::sgd`]).
    fn sgd(
        param: &mut HostData,
        grad: &HostData,
        velocity: Option<&mut HostData>,
        step: &SgdStep
    ) -> Result<()> = crate::reference::optim::sgd;
}

per_set! {
    /// The reference Adam step ([`crate::reference::optim::adam_slices`]); sqrt and
    /// division are correctly rounded, so the result is bitwise the
    /// reference's.
    fn adam(
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        k: &crate::reference::optim::AdamConstants
    ) -> () = crate::reference::optim::adam_slices;
}

per_set! {
    /// f32 → bf16 ([`super::convert::to_bf16_loop`]) compiled for the set.
    fn to_bf16(x: &[f32]) -> Vec<bf16> = super::convert::to_bf16_loop;
}

per_set! {
    /// bf16 → f32 ([`super::convert::from_bf16_loop`]) compiled for the set.
    fn from_bf16(x: &[bf16]) -> Vec<f32> = super::convert::from_bf16_loop;
}

per_set! {
    /// f32 → bf16 into a fresh buffer ([`super::convert::to_bf16_into_loop`]).
    fn to_bf16_into(x: &[f32], out: &mut [MaybeUninit<bf16>]) -> () = super::convert::to_bf16_into_loop;
}

per_set! {
    /// bf16 → f32 into a buffer, fresh or not ([`super::convert::from_bf16_into_loop`]).
    fn from_bf16_into(x: &[bf16], out: &mut [impl Slot]) -> () = super::convert::from_bf16_into_loop;
}
