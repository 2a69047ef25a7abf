//! Max-pooling for the SIMD kernel sets: the reference's semantics (first
//! maximum in row-major window order, NaN maximal, padding never chosen)
//! with the planes split over the worker pool. Unpadded windows take
//! branch-free kernels: whole planes of 2×2 windows at stride 2 (the CNNs'
//! pool) hand-written for AVX-512 (`avx512.rs`) and AVX2 (`avx2.rs`: the
//! generic row was half of a CNN epoch there); other windows a row of
//! outputs at a time, hand-written for AVX-512 and compiled per set from
//! `vector::wide` for the others. Exact, like the reference: results are
//! bitwise equal.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

use std::mem::MaybeUninit;

use crate::workers::Workers;
use kiln_core::conv::{pool2d_backward_shape, pool2d_output};
use kiln_core::{Error, HostData, Result, View, Window2d};

use crate::reference::conv::window_max;
use crate::storage::read_u32;
use crate::vector::convert;
use crate::vector::wide;
use crate::KernelSet;

/// Whether `set` pools `win` with a kernel that only stores its outputs:
/// AVX-512's for every unpadded window, AVX2's for 2×2 windows at stride 2.
fn stores_only(set: KernelSet, win: &Window2d) -> bool {
    cfg!(target_arch = "x86_64")
        && win.padding == [0; 4]
        && match set {
            KernelSet::Avx512 => true,
            KernelSet::Avx2 => (win.kernel, win.stride) == ([2, 2], [2, 2]),
            _ => false,
        }
}

/// [`plane`] into fresh outputs: written whole without being zeroed first
/// where the set's kernel only stores ([`stores_only`]), zeroed and then
/// written elsewhere. Every element is written on return. Plane indices
/// must fit u32 (callers check `h·w`; the kernels add them modulo 2³²).
#[allow(clippy::too_many_arguments)]
pub(crate) fn fresh_plane(
    set: KernelSet,
    x: &[f32],
    [h, w]: [usize; 2],
    win: &Window2d,
    [oh, ow]: [usize; 2],
    out: &mut [MaybeUninit<f32>],
    at: &mut [MaybeUninit<u32>],
) {
    #[cfg(target_arch = "x86_64")]
    if stores_only(set, win) {
        let ([sh, sw], [kh, kw]) = (win.stride, win.kernel);
        assert!(
            out.len() == oh * ow
                && at.len() == oh * ow
                && (oh == 0 || ow == 0 || ((oh - 1) * sh + kh) * w <= x.len() && (ow - 1) * sw + kw <= w),
            "max-pool plane: {oh}×{ow} windows of {kh}×{kw} by {sh}×{sw} over {h}×{w} into {} outputs",
            out.len()
        );
        let whole_2x2 = (win.kernel, win.stride) == ([2, 2], [2, 2]);
        match set {
            KernelSet::Avx512 if whole_2x2 => {
                // SAFETY: the set was checked against this processor; the
                // windows fit the plane and the outputs hold oh·ow
                // (asserted).
                unsafe { avx512::plane_2x2(x, w, [oh, ow], out, at) };
                return;
            }
            KernelSet::Avx2 if whole_2x2 => {
                // SAFETY: as for AVX-512's.
                unsafe { avx2::plane_2x2(x, w, [oh, ow], out, at) };
                return;
            }
            KernelSet::Avx512 => {}
            _ => unreachable!("stores_only names no other kernel"),
        }
        let rows = out
            .chunks_exact_mut(ow.max(1))
            .zip(at.chunks_exact_mut(ow.max(1)));
        for (i, (o, a)) in rows.enumerate() {
            // SAFETY: the set was checked against this processor; the
            // windows of output row i end at row i·sh + kh − 1 and column
            // (ow − 1)·sw + kw − 1, inside the plane (asserted above); the
            // kernel stores all of `o` and `a` (ow each) and reads neither.
            unsafe { avx512::row(x, w, i * sh, win.kernel, sw, o, a) };
        }
        return;
    }
    let (out, at) = (crate::fresh::zeros(out), crate::fresh::filled_with(at, 0));
    plane(set, x, [h, w], win, [oh, ow], out, at);
}

/// One plane: maxima and their indices (into the plane) for every output
/// cell.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plane(
    set: KernelSet,
    x: &[f32],
    [h, w]: [usize; 2],
    win: &Window2d,
    [oh, ow]: [usize; 2],
    out: &mut [f32],
    at: &mut [u32],
) {
    if stores_only(set, win) {
        // SAFETY: `fresh_plane` takes this path for these arguments, whose
        // kernels only store computed values.
        let (out, at) = unsafe { (crate::fresh::as_slots(out), crate::fresh::as_slots(at)) };
        return fresh_plane(set, x, [h, w], win, [oh, ow], out, at);
    }
    let [sh, sw] = win.stride;
    if win.padding == [0; 4] {
        // Every window cell is inside the plane: whole output rows at once.
        let rows = out
            .chunks_exact_mut(ow.max(1))
            .zip(at.chunks_exact_mut(ow.max(1)));
        for (i, (o, a)) in rows.enumerate() {
            wide::pool_row(set, x, w, i * sh, win.kernel, sw, o, a);
        }
        return;
    }
    for i in 0..oh {
        for j in 0..ow {
            let (v, a) = window_max(x, [h, w], win, [i, j]);
            out[i * ow + j] = v;
            at[i * ow + j] = a as u32;
        }
    }
}

pub(crate) fn max_pool2d(
    set: KernelSet,
    pool: &Workers,
    x: View<'_, HostData>,
    win: &Window2d,
) -> Result<(HostData, HostData)> {
    let [n, c, oh, ow] = pool2d_output(x.layout.dims(), win)?;
    let [_, _, h, w] = x.layout.dims()[..] else {
        unreachable!("checked by pool2d_output")
    };
    if h * w > u32::MAX as usize {
        return Err(Error::shape(
            "max_pool2d",
            format!("an input plane of {h}×{w} cells does not fit u32 indices"),
        ));
    }
    let xs = convert::read_f32(set, None, "max_pool2d", x)?;
    let cells = oh * ow;
    let mut out = vec![0f32; n * c * cells];
    let mut at = vec![0u32; n * c * cells];
    if !out.is_empty() {
        let planes = out.chunks_mut(cells).zip(at.chunks_mut(cells));
        pool.for_each(planes.enumerate().collect(), |(p, (o, a))| {
            plane(set, &xs[p * h * w..][..h * w], [h, w], win, [oh, ow], o, a)
        });
    }
    Ok((
        convert::store_f32(set, "max_pool2d", x.storage.dtype(), out)?,
        HostData::U32(at),
    ))
}

pub(crate) fn max_pool2d_backward(
    set: KernelSet,
    pool: &Workers,
    dy: View<'_, HostData>,
    argmax: View<'_, HostData>,
    win: &Window2d,
    input: [usize; 2],
) -> Result<HostData> {
    let out = pool2d_backward_shape(dy.layout.dims(), argmax.layout.dims(), win, input)?;
    let [n, c, ..] = out;
    let [h, w] = input;
    let gs = convert::read_f32(set, None, "max_pool2d_backward", dy)?;
    let at = read_u32("max_pool2d_backward", argmax)?;
    crate::storage::check_indices(set, &at, h * w, |bad| {
        Error::invalid(format!(
            "max_pool2d_backward: argmax {bad} is outside the {h}×{w} input plane"
        ))
    })?;
    let cells = out[2] * out[3];
    let mut dx = vec![0f32; n * c * h * w];
    if !dx.is_empty() {
        pool.for_each(dx.chunks_mut(h * w).enumerate().collect(), |(p, plane)| {
            for (&g, &a) in gs[p * cells..][..cells]
                .iter()
                .zip(&at[p * cells..][..cells])
            {
                plane[a as usize] += g;
            }
        });
    }
    convert::store_f32(set, "max_pool2d_backward", dy.storage.dtype(), dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every set's planes against the reference's window scan, bit for bit
    /// with their indices: 2×2 windows at stride 2 (the whole-plane
    /// kernels, at widths around their groups of 8 and 16 outputs — short
    /// groups of 1, 2, 5, 6 and 7 — and odd planes whose last column no
    /// window reads) and other windows, on data full of ties (zeros, as
    /// after a ReLU, and repeated values), NaNs of both signs (two in one
    /// window row, and one in each row of another: the first must win),
    /// infinities and −0 — through fresh outputs and through outputs
    /// already written.
    #[test]
    fn every_set_pools_as_the_reference_scan() {
        let sets = [KernelSet::Avx512, KernelSet::Avx2, KernelSet::Neon];
        let windows = [
            Window2d::valid([2, 2], [2, 2]),
            Window2d::valid([3, 3], [2, 2]),
            Window2d::valid([2, 2], [1, 1]),
            Window2d::valid([3, 2], [3, 1]),
        ];
        for set in sets.into_iter().filter(|s| s.available()) {
            for win in &windows {
                for (h, w) in [
                    (2, 2),
                    (3, 5),
                    (4, 12),
                    (4, 15),
                    (6, 16),
                    (5, 17),
                    (4, 26),
                    (4, 31),
                    (7, 33),
                    (2, 34),
                ] {
                    let Ok([oh, ow]) = win.output("pool test", [h, w]) else {
                        continue;
                    };
                    let mut x: Vec<f32> = (0..h * w)
                        .map(|i| match (i * 7919) % 13 {
                            0..=4 => 0.0,
                            5 | 6 => 1.5,
                            k => k as f32 - 9.0,
                        })
                        .collect();
                    let specials = [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0];
                    for (k, v) in specials.into_iter().enumerate() {
                        x[(11 * k + 3) % (h * w)] = v;
                    }
                    // NaNs sharing a window: the first in window order
                    // wins, by its bits and index — in one row (cells 0
                    // and 1), and across rows (the top one of cells 5 and
                    // w + 4).
                    x[0] = f32::NAN;
                    x[1] = -f32::NAN;
                    if w >= 6 && h >= 2 {
                        x[5] = -f32::NAN;
                        x[w + 4] = f32::NAN;
                    }
                    let mut fresh_out = vec![MaybeUninit::uninit(); oh * ow];
                    let mut fresh_at = vec![MaybeUninit::uninit(); oh * ow];
                    fresh_plane(
                        set,
                        &x,
                        [h, w],
                        win,
                        [oh, ow],
                        &mut fresh_out,
                        &mut fresh_at,
                    );
                    let (mut out, mut at) = (vec![7f32; oh * ow], vec![7u32; oh * ow]);
                    plane(set, &x, [h, w], win, [oh, ow], &mut out, &mut at);
                    for i in 0..oh {
                        for j in 0..ow {
                            let (v, a) = window_max(&x, [h, w], win, [i, j]);
                            let k = i * ow + j;
                            // SAFETY: `fresh_plane` writes every element.
                            let fresh =
                                unsafe { (fresh_out[k].assume_init(), fresh_at[k].assume_init()) };
                            let what =
                                format!("{} {win:?} over {h}×{w}: output ({i}, {j})", set.name());
                            assert_eq!(
                                (out[k].to_bits(), at[k]),
                                (v.to_bits(), a as u32),
                                "{what}"
                            );
                            assert_eq!(
                                (fresh.0.to_bits(), fresh.1),
                                (v.to_bits(), a as u32),
                                "{what}, fresh"
                            );
                        }
                    }
                }
            }
        }
    }
}
