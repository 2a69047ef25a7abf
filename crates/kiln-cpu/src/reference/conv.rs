//! Reference 2-D convolution and max-pooling (NCHW): direct loops, every
//! sum in a fixed order — input channel, then window row, then window
//! column for the convolution; batch, then output row, then output column
//! for the filter gradient. Convolution padding is zeros that take part in
//! the products, as im2col makes them.

use kiln_core::conv::{
    conv2d_backward_data_shape, conv2d_backward_filter_shape, conv2d_output, pool2d_backward_shape,
    pool2d_output,
};
use kiln_core::{Activation, DType, Error, HostData, Result, View, Window2d};

use super::elementwise::activate;
use crate::storage::{read_f32, read_u32, store_f32};

/// The dtype all of `views` share, or an error naming `op`.
pub(crate) fn common_dtype(op: &'static str, views: &[View<'_, HostData>]) -> Result<DType> {
    let dtype = views[0].storage.dtype();
    for v in &views[1..] {
        if v.storage.dtype() != dtype {
            return Err(Error::DType {
                op,
                expected: dtype,
                got: v.storage.dtype(),
            });
        }
    }
    Ok(dtype)
}

/// The input coordinate window offset `d` reaches from output `o`, if it
/// falls inside an input of extent `n` (not in the padding).
#[inline]
pub(crate) fn source(o: usize, d: usize, stride: usize, pad: usize, n: usize) -> Option<usize> {
    (o * stride + d).checked_sub(pad).filter(|&v| v < n)
}

pub(crate) fn conv2d(
    x: View<'_, HostData>,
    weight: View<'_, HostData>,
    bias: Option<View<'_, HostData>>,
    activation: Activation,
    win: &Window2d,
) -> Result<HostData> {
    let [n, o, oh, ow] = conv2d_output(
        x.layout.dims(),
        weight.layout.dims(),
        bias.map(|b| b.layout.dims()),
        win,
    )?;
    let mut views = vec![x, weight];
    views.extend(bias);
    let dtype = common_dtype("conv2d", &views)?;
    let [_, c, h, w] = x.layout.dims()[..] else {
        unreachable!("checked by conv2d_output")
    };
    let (xs, ws) = (read_f32("conv2d", x)?, read_f32("conv2d", weight)?);
    let bs = bias.map(|b| read_f32("conv2d", b)).transpose()?;
    let ([kh, kw], [sh, sw], [pt, _, pl, _]) = (win.kernel, win.stride, win.padding);
    let mut out = vec![0f32; n * o * oh * ow];
    let mut cells = out.iter_mut();
    for img in 0..n {
        for oc in 0..o {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = 0f32;
                    for ic in 0..c {
                        let plane = &xs[(img * c + ic) * h * w..][..h * w];
                        let filter = &ws[(oc * c + ic) * kh * kw..][..kh * kw];
                        for di in 0..kh {
                            let y = source(i, di, sh, pt, h);
                            for dj in 0..kw {
                                // Padding is zeros that take part (0·∞ is NaN).
                                let v = match (y, source(j, dj, sw, pl, w)) {
                                    (Some(y), Some(xx)) => plane[y * w + xx],
                                    _ => 0.0,
                                };
                                acc += v * filter[di * kw + dj];
                            }
                        }
                    }
                    let v = acc + bs.as_ref().map_or(0.0, |b| b[oc]);
                    *cells.next().expect("one cell per output") = activate(activation, v);
                }
            }
        }
    }
    store_f32("conv2d", dtype, out)
}

pub(crate) fn conv2d_backward_data(
    dy: View<'_, HostData>,
    weight: View<'_, HostData>,
    win: &Window2d,
    input: [usize; 2],
) -> Result<HostData> {
    let dtype = common_dtype("conv2d_backward_data", &[dy, weight])?;
    let [n, c, h, w] =
        conv2d_backward_data_shape(dy.layout.dims(), weight.layout.dims(), win, input)?;
    let [o, _, kh, kw] = weight.layout.dims()[..] else {
        unreachable!("checked above")
    };
    let [_, _, oh, ow] = dy.layout.dims()[..] else {
        unreachable!("checked above")
    };
    let (gs, ws) = (
        read_f32("conv2d_backward_data", dy)?,
        read_f32("conv2d_backward_data", weight)?,
    );
    let ([sh, sw], [pt, _, pl, _]) = (win.stride, win.padding);
    let mut dx = vec![0f32; n * c * h * w];
    for img in 0..n {
        for ic in 0..c {
            let plane = &mut dx[(img * c + ic) * h * w..][..h * w];
            for oc in 0..o {
                let g = &gs[(img * o + oc) * oh * ow..][..oh * ow];
                let filter = &ws[(oc * c + ic) * kh * kw..][..kh * kw];
                for i in 0..oh {
                    for di in 0..kh {
                        let Some(y) = source(i, di, sh, pt, h) else {
                            continue;
                        };
                        for j in 0..ow {
                            for dj in 0..kw {
                                if let Some(xx) = source(j, dj, sw, pl, w) {
                                    plane[y * w + xx] += g[i * ow + j] * filter[di * kw + dj];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    store_f32("conv2d_backward_data", dtype, dx)
}

pub(crate) fn conv2d_backward_filter(
    x: View<'_, HostData>,
    dy: View<'_, HostData>,
    win: &Window2d,
) -> Result<(HostData, HostData)> {
    let dtype = common_dtype("conv2d_backward_filter", &[x, dy])?;
    let [n, o, oh, ow] = conv2d_backward_filter_shape(x.layout.dims(), dy.layout.dims(), win)?;
    let [_, c, h, w] = x.layout.dims()[..] else {
        unreachable!("checked above")
    };
    let (xs, gs) = (
        read_f32("conv2d_backward_filter", x)?,
        read_f32("conv2d_backward_filter", dy)?,
    );
    let ([kh, kw], [sh, sw], [pt, _, pl, _]) = (win.kernel, win.stride, win.padding);
    let mut dw = vec![0f32; o * c * kh * kw];
    let mut db = vec![0f32; o];
    for oc in 0..o {
        for img in 0..n {
            for &g in &gs[(img * o + oc) * oh * ow..][..oh * ow] {
                db[oc] += g;
            }
        }
        for ic in 0..c {
            for di in 0..kh {
                for dj in 0..kw {
                    let mut acc = 0f32;
                    for img in 0..n {
                        let plane = &xs[(img * c + ic) * h * w..][..h * w];
                        let g = &gs[(img * o + oc) * oh * ow..][..oh * ow];
                        for i in 0..oh {
                            let y = source(i, di, sh, pt, h);
                            for j in 0..ow {
                                let v = match (y, source(j, dj, sw, pl, w)) {
                                    (Some(y), Some(xx)) => plane[y * w + xx],
                                    _ => 0.0,
                                };
                                acc += g[i * ow + j] * v;
                            }
                        }
                    }
                    dw[((oc * c + ic) * kh + di) * kw + dj] = acc;
                }
            }
        }
    }
    Ok((
        store_f32("conv2d_backward_filter", dtype, dw)?,
        store_f32("conv2d_backward_filter", dtype, db)?,
    ))
}

/// The maximum of output cell `(i, j)`'s window over one `h × w` plane and
/// its index in the plane: the first maximum in row-major window order,
/// NaN counting as maximal, padding never chosen.
pub(crate) fn window_max(
    plane: &[f32],
    [h, w]: [usize; 2],
    win: &Window2d,
    [i, j]: [usize; 2],
) -> (f32, usize) {
    let ([kh, kw], [sh, sw], [pt, _, pl, _]) = (win.kernel, win.stride, win.padding);
    let mut best: Option<(f32, usize)> = None;
    for di in 0..kh {
        let Some(y) = source(i, di, sh, pt, h) else {
            continue;
        };
        for dj in 0..kw {
            if let Some(xx) = source(j, dj, sw, pl, w) {
                let v = plane[y * w + xx];
                if best.is_none_or(|(b, _)| !b.is_nan() && (v.is_nan() || v > b)) {
                    best = Some((v, y * w + xx));
                }
            }
        }
    }
    // Padding is smaller than the window, so every window holds a cell.
    best.expect("a window always covers an input cell")
}

pub(crate) fn max_pool2d(x: View<'_, HostData>, win: &Window2d) -> Result<(HostData, HostData)> {
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
    let dtype = x.storage.dtype();
    let xs = read_f32("max_pool2d", x)?;
    let mut out = Vec::with_capacity(n * c * oh * ow);
    let mut idx = Vec::with_capacity(n * c * oh * ow);
    for plane in xs.chunks_exact((h * w).max(1)).take(n * c) {
        for i in 0..oh {
            for j in 0..ow {
                let (v, at) = window_max(plane, [h, w], win, [i, j]);
                out.push(v);
                idx.push(at as u32);
            }
        }
    }
    Ok((store_f32("max_pool2d", dtype, out)?, HostData::U32(idx)))
}

pub(crate) fn max_pool2d_backward(
    dy: View<'_, HostData>,
    argmax: View<'_, HostData>,
    win: &Window2d,
    input: [usize; 2],
) -> Result<HostData> {
    let out = pool2d_backward_shape(dy.layout.dims(), argmax.layout.dims(), win, input)?;
    let [n, c, ..] = out;
    let [h, w] = input;
    let gs = read_f32("max_pool2d_backward", dy)?;
    let at = read_u32("max_pool2d_backward", argmax)?;
    let cells = out[2] * out[3];
    let mut dx = vec![0f32; n * c * h * w];
    for (p, plane) in dx.chunks_exact_mut((h * w).max(1)).take(n * c).enumerate() {
        for (&g, &a) in gs[p * cells..][..cells]
            .iter()
            .zip(&at[p * cells..][..cells])
        {
            let slot = plane.get_mut(a as usize).ok_or_else(|| {
                Error::invalid(format!(
                    "max_pool2d_backward: argmax {a} is outside the {h}×{w} input plane"
                ))
            })?;
            *slot += g;
        }
    }
    store_f32("max_pool2d_backward", dy.storage.dtype(), dx)
}
