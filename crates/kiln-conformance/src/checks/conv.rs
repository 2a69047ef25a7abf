//! Convolution and max-pooling over NCHW tensors.
//!
//! The oracle treats padding as zeros that take part in the products (so
//! `0·∞` is NaN, as in every framework that pads explicitly). Bounds: each
//! convolution output, and each gradient element, is a dot product whose
//! length is the number of terms it sums, within γₙ·Σ|terms| (f32
//! accumulation) plus the bias addition; max-pooling is exact, value and
//! index; its gradient sums the `dy` cells routed to one input cell.

use kiln_core::{bounds, Activation, Backend, DType, HostData, Layout, Shape, View, Window2d};
use proptest::prelude::*;

use super::fetch_all;
use crate::values::{contiguous, operand, Domain, Operand};
use crate::{compare, run_cases, Bound, CaseError, Config, Report, Sizer, Tier};

/// A problem's sizes: batch, channels in and out, input, window.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    n: usize,
    c: usize,
    o: usize,
    h: usize,
    w: usize,
    win: Window2d,
    out: [usize; 2],
}

/// One batch/channel/spatial/window draw, before its geometry is checked.
type Draw = (
    usize,
    usize,
    usize,
    usize,
    usize,
    (usize, usize),
    (usize, usize),
    [usize; 4],
);

/// A problem of each tier. Blocked problems come in three families: patch
/// lengths `c·kh·kw` across the [`kiln_core::SwitchPoints::conv_patch`]
/// (the implicit GEMM's k blocks), batches across the filter gradient's
/// image groups with `batch·oh·ow` past its split-K chunks, and output
/// channels across the [`kiln_core::SwitchPoints::conv_channels`] (tiles).
/// The first cases, whatever the seed, are the problems one past each of
/// those points and one past each
/// [`kiln_core::SwitchPoints::conv_reduction`] (one image, one row wide).
fn sizes(z: &Sizer) -> BoxedStrategy<Sizes> {
    let p = &z.points;
    let pad = || prop::array::uniform4(0usize..3);
    let draws: BoxedStrategy<Draw> = match z.tier {
        Tier::Edge => (
            0usize..=2,
            1usize..=3,
            1usize..=4,
            1usize..=9,
            1usize..=9,
            (1usize..=3, 1usize..=3),
            (1usize..=3, 1usize..=3),
            pad(),
        )
            .boxed(),
        Tier::Blocked => {
            // Channels whose patch length sits at a switch point, for 1×1
            // and 3×3 windows.
            let patch = Sizer::near(&p.conv_patch, &[]);
            let c3: Vec<usize> = patch
                .iter()
                .flat_map(|&q| [q / 9, q.div_ceil(9)])
                .filter(|&c| c >= 1)
                .collect();
            let long_patch = prop_oneof![
                (Sizer::pick(patch), Just((1usize, 1usize))),
                (Sizer::pick(c3), Just((3usize, 3usize))),
            ];
            let past = Sizer::past;
            let (one, three, none) = ((1usize, 1usize), (3usize, 3usize), [0usize; 4]);
            let corners: Vec<Draw> = Sizer::take_turns(vec![
                past(&p.conv_reduction)
                    .into_iter()
                    .map(|r| (1, 2, 4, 1, r, one, one, none))
                    .collect(),
                past(&p.conv_patch)
                    .into_iter()
                    .map(|c| (2, c, 9, 12, 12, one, one, none))
                    .collect(),
                past(&p.conv_batch)
                    .into_iter()
                    .map(|n| (n, 3, 4, 14, 14, three, one, none))
                    .collect(),
                past(&p.conv_channels)
                    .into_iter()
                    .map(|o| (2, 2, o, 16, 16, three, one, none))
                    .collect(),
            ]);
            let random = prop_oneof![
                (
                    1usize..=2,
                    long_patch,
                    1usize..=9,
                    5usize..=12,
                    5usize..=12,
                    (1usize..=2, 1usize..=2),
                    pad()
                )
                    .prop_map(|(n, (c, k), o, h, w, st, pd)| (n, c, o, h, w, k, st, pd)),
                (
                    Sizer::pick(Sizer::near(&p.conv_batch, &[])),
                    1usize..=3,
                    1usize..=4,
                    6usize..=14,
                    6usize..=14,
                    (1usize..=3, 1usize..=3),
                    Just((1usize, 1usize)),
                    pad()
                ),
                (
                    1usize..=2,
                    1usize..=2,
                    Sizer::pick(Sizer::near(&p.conv_channels, &[])),
                    10usize..=16,
                    10usize..=16,
                    (1usize..=3, 1usize..=3),
                    (1usize..=2, 1usize..=2),
                    pad()
                ),
            ];
            z.corners_first(corners, random.boxed())
        }
        Tier::Large => (
            16usize..=32,
            8usize..=16,
            16usize..=32,
            28usize..=32,
            28usize..=32,
            prop::sample::select(vec![(3usize, 3usize), (5, 5)]),
            Just((1usize, 1usize)),
            pad(),
        )
            .boxed(),
    };
    draws
        .prop_filter_map(
            "window fits the input",
            |(n, c, o, h, w, (kh, kw), (sh, sw), p)| {
                let win = Window2d {
                    kernel: [kh, kw],
                    stride: [sh, sw],
                    padding: [p[0] % kh, p[1] % kh, p[2] % kw, p[3] % kw],
                };
                let out = win.output("conformance", [h, w]).ok()?;
                Some(Sizes {
                    n,
                    c,
                    o,
                    h,
                    w,
                    win,
                    out,
                })
            },
        )
        .boxed()
}

/// The input value a window offset reads, zero in the padding.
fn read(
    x: &[f64],
    plane: usize,
    s: &Sizes,
    i: usize,
    j: usize,
    di: usize,
    dj: usize,
) -> Option<usize> {
    let y = (i * s.win.stride[0] + di)
        .checked_sub(s.win.padding[0])
        .filter(|&y| y < s.h)?;
    let xx = (j * s.win.stride[1] + dj)
        .checked_sub(s.win.padding[2])
        .filter(|&v| v < s.w)?;
    let _ = x;
    Some(plane + y * s.w + xx)
}

#[derive(Debug, Clone)]
struct Forward {
    s: Sizes,
    x: Operand,
    weight: Operand,
    bias: Option<Operand>,
    relu: bool,
}

pub(crate) fn conv2d<B: Backend>(backend: &B, dtype: DType, cfg: &Config) -> Report {
    let strategy = move |z: &Sizer| {
        sizes(z)
            .prop_flat_map(move |s| {
                let [kh, kw] = s.win.kernel;
                (
                    operand(dtype, vec![s.n, s.c, s.h, s.w], Domain::General, false),
                    operand(dtype, vec![s.o, s.c, kh, kw], Domain::General, false),
                    prop::option::of(contiguous(dtype, vec![s.o], Domain::Moderate(4.0))),
                    any::<bool>(),
                )
                    .prop_map(move |(x, weight, bias, relu)| Forward {
                        s,
                        x,
                        weight,
                        bias,
                        relu,
                    })
            })
            .boxed()
    };
    run_cases("conv2d", dtype, cfg, strategy, |c| {
        let s = c.s;
        let (sx, sw) = (c.x.upload(backend)?, c.weight.upload(backend)?);
        let sb = c.bias.as_ref().map(|b| b.upload(backend)).transpose()?;
        let act = if c.relu {
            Activation::Relu
        } else {
            Activation::None
        };
        let out = backend.conv2d(
            View::new(&sx, &c.x.layout),
            View::new(&sw, &c.weight.layout),
            c.bias
                .as_ref()
                .zip(sb.as_ref())
                .map(|(b, st)| View::new(st, &b.layout)),
            act,
            &s.win,
        )?;
        let dims = [s.n, s.o, s.out[0], s.out[1]];
        let got = fetch_all(backend, &out, &dims)?;
        let (xv, wv) = (c.x.logical(), c.weight.logical());
        let bv = c.bias.as_ref().map(|b| b.logical());
        let [kh, kw] = s.win.kernel;
        let mut want = Vec::with_capacity(got.len());
        for img in 0..s.n {
            for oc in 0..s.o {
                for i in 0..s.out[0] {
                    for j in 0..s.out[1] {
                        let (mut dot, mut mass) = (0f64, 0f64);
                        for ic in 0..s.c {
                            let plane = (img * s.c + ic) * s.h * s.w;
                            for di in 0..kh {
                                for dj in 0..kw {
                                    let xval =
                                        read(&xv, plane, &s, i, j, di, dj).map_or(0.0, |at| xv[at]);
                                    let p = xval * wv[((oc * s.c + ic) * kh + di) * kw + dj];
                                    dot += p;
                                    mass += p.abs();
                                }
                            }
                        }
                        let len = s.c * kh * kw;
                        let mut err = bounds::dot(len, mass);
                        let add = bv.as_ref().map_or(0.0, |b| b[oc]);
                        let pre = dot + add;
                        if bv.is_some() {
                            err = bounds::epilogue(1, dot.abs() + add.abs(), err);
                        }
                        let y = if c.relu && !pre.is_nan() {
                            pre.max(0.0)
                        } else {
                            pre
                        };
                        want.push((y, bounds::activated(act, y, err, mass, len)));
                    }
                }
            }
        }
        compare("conv2d", dtype, &dims, &got, &want)
    })
}

#[derive(Debug, Clone)]
struct Backward {
    s: Sizes,
    x: Operand,
    weight: Operand,
    dy: Operand,
}

fn backward_strategy(z: &Sizer, dtype: DType) -> BoxedStrategy<Backward> {
    sizes(z)
        .prop_flat_map(move |s| {
            let [kh, kw] = s.win.kernel;
            (
                operand(dtype, vec![s.n, s.c, s.h, s.w], Domain::General, false),
                operand(dtype, vec![s.o, s.c, kh, kw], Domain::General, false),
                operand(
                    dtype,
                    vec![s.n, s.o, s.out[0], s.out[1]],
                    Domain::General,
                    false,
                ),
            )
                .prop_map(move |(x, weight, dy)| Backward { s, x, weight, dy })
        })
        .boxed()
}

pub(crate) fn conv2d_backward_data<B: Backend>(backend: &B, dtype: DType, cfg: &Config) -> Report {
    run_cases(
        "conv2d_backward_data",
        dtype,
        cfg,
        |z| backward_strategy(z, dtype),
        |c| {
            let s = c.s;
            let (sw, sd) = (c.weight.upload(backend)?, c.dy.upload(backend)?);
            let out = backend.conv2d_backward_data(
                View::new(&sd, &c.dy.layout),
                View::new(&sw, &c.weight.layout),
                &s.win,
                [s.h, s.w],
            )?;
            let dims = [s.n, s.c, s.h, s.w];
            let got = fetch_all(backend, &out, &dims)?;
            let (wv, gv) = (c.weight.logical(), c.dy.logical());
            let [kh, kw] = s.win.kernel;
            let mut acc = vec![(0f64, 0f64, 0usize); s.n * s.c * s.h * s.w];
            for img in 0..s.n {
                for oc in 0..s.o {
                    for i in 0..s.out[0] {
                        for j in 0..s.out[1] {
                            let g = gv[((img * s.o + oc) * s.out[0] + i) * s.out[1] + j];
                            for ic in 0..s.c {
                                let plane = (img * s.c + ic) * s.h * s.w;
                                for di in 0..kh {
                                    for dj in 0..kw {
                                        if let Some(at) = read(&[], plane, &s, i, j, di, dj) {
                                            let p = g * wv[((oc * s.c + ic) * kh + di) * kw + dj];
                                            acc[at].0 += p;
                                            acc[at].1 += p.abs();
                                            acc[at].2 += 1;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let want: Vec<(f64, Bound)> = acc
                .into_iter()
                .map(|(v, mass, len)| (v, Bound::summed(bounds::dot(len.max(1), mass), mass, len)))
                .collect();
            compare("conv2d_backward_data", dtype, &dims, &got, &want)
        },
    )
}

pub(crate) fn conv2d_backward_filter<B: Backend>(
    backend: &B,
    dtype: DType,
    cfg: &Config,
) -> Report {
    run_cases(
        "conv2d_backward_filter",
        dtype,
        cfg,
        |z| backward_strategy(z, dtype),
        |c| {
            let s = c.s;
            let (sx, sd) = (c.x.upload(backend)?, c.dy.upload(backend)?);
            let (dw, db) = backend.conv2d_backward_filter(
                View::new(&sx, &c.x.layout),
                View::new(&sd, &c.dy.layout),
                &s.win,
            )?;
            let [kh, kw] = s.win.kernel;
            let wdims = [s.o, s.c, kh, kw];
            let got_w = fetch_all(backend, &dw, &wdims)?;
            let got_b = fetch_all(backend, &db, &[s.o])?;
            let (xv, gv) = (c.x.logical(), c.dy.logical());
            let cells = s.out[0] * s.out[1];
            let mut want_w = Vec::with_capacity(got_w.len());
            for oc in 0..s.o {
                for ic in 0..s.c {
                    for di in 0..kh {
                        for dj in 0..kw {
                            let (mut dot, mut mass) = (0f64, 0f64);
                            for img in 0..s.n {
                                let plane = (img * s.c + ic) * s.h * s.w;
                                for i in 0..s.out[0] {
                                    for j in 0..s.out[1] {
                                        let g = gv[(img * s.o + oc) * cells + i * s.out[1] + j];
                                        let xval = read(&xv, plane, &s, i, j, di, dj)
                                            .map_or(0.0, |at| xv[at]);
                                        dot += g * xval;
                                        mass += (g * xval).abs();
                                    }
                                }
                            }
                            want_w.push((
                                dot,
                                Bound::summed(
                                    bounds::dot((s.n * cells).max(1), mass),
                                    mass,
                                    s.n * cells,
                                ),
                            ));
                        }
                    }
                }
            }
            let want_b: Vec<(f64, Bound)> = (0..s.o)
                .map(|oc| {
                    let terms =
                        (0..s.n).flat_map(|img| gv[(img * s.o + oc) * cells..][..cells].iter());
                    let (sum, mass) = terms.fold((0f64, 0f64), |(a, m), &g| (a + g, m + g.abs()));
                    (
                        sum,
                        Bound::summed(bounds::dot((s.n * cells).max(1), mass), mass, s.n * cells),
                    )
                })
                .collect();
            let w = compare(
                "conv2d_backward_filter (weight)",
                dtype,
                &wdims,
                &got_w,
                &want_w,
            )?;
            let b = compare(
                "conv2d_backward_filter (bias)",
                dtype,
                &[s.o],
                &got_b,
                &want_b,
            )?;
            Ok(w.max(b))
        },
    )
}

/// The oracle's max-pool: values and input-plane indices.
fn pool_oracle(xv: &[f64], s: &Sizes) -> (Vec<f64>, Vec<usize>) {
    let [kh, kw] = s.win.kernel;
    let (mut vals, mut idx) = (Vec::new(), Vec::new());
    for p in 0..s.n * s.c {
        for i in 0..s.out[0] {
            for j in 0..s.out[1] {
                let mut best: Option<(f64, usize)> = None;
                for di in 0..kh {
                    for dj in 0..kw {
                        if let Some(at) = read(xv, p * s.h * s.w, s, i, j, di, dj) {
                            let v = xv[at];
                            let better =
                                best.is_none_or(|(b, _)| !b.is_nan() && (v.is_nan() || v > b));
                            if better {
                                best = Some((v, at - p * s.h * s.w));
                            }
                        }
                    }
                }
                let (v, at) = best.expect("windows always cover a cell");
                vals.push(v);
                idx.push(at);
            }
        }
    }
    (vals, idx)
}

#[derive(Debug, Clone)]
struct Pool {
    s: Sizes,
    x: Operand,
    dy: Operand,
}

fn pool_strategy(z: &Sizer, dtype: DType) -> BoxedStrategy<Pool> {
    sizes(z)
        .prop_flat_map(move |s| {
            (
                operand(dtype, vec![s.n, s.c, s.h, s.w], Domain::General, false),
                operand(
                    dtype,
                    vec![s.n, s.c, s.out[0], s.out[1]],
                    Domain::General,
                    false,
                ),
            )
                .prop_map(move |(x, dy)| Pool { s, x, dy })
        })
        .boxed()
}

pub(crate) fn max_pool2d<B: Backend>(backend: &B, dtype: DType, cfg: &Config) -> Report {
    run_cases(
        "max_pool2d",
        dtype,
        cfg,
        |z| pool_strategy(z, dtype),
        |c| {
            let s = c.s;
            let sx = c.x.upload(backend)?;
            let (y, at) = backend.max_pool2d(View::new(&sx, &c.x.layout), &s.win)?;
            let dims = [s.n, s.c, s.out[0], s.out[1]];
            let got = fetch_all(backend, &y, &dims)?;
            let got_at = fetch_all(backend, &at, &dims)?;
            let (vals, idx) = pool_oracle(&c.x.logical(), &s);
            let want: Vec<_> = vals.into_iter().map(|v| (v, Bound::Exact)).collect();
            let want_at: Vec<_> = idx.into_iter().map(|i| (i as f64, Bound::Exact)).collect();
            let a = compare("max_pool2d", dtype, &dims, &got, &want)?;
            let b = compare("max_pool2d (argmax)", DType::U32, &dims, &got_at, &want_at)?;
            Ok(a.max(b))
        },
    )
}

pub(crate) fn max_pool2d_backward<B: Backend>(backend: &B, dtype: DType, cfg: &Config) -> Report {
    run_cases(
        "max_pool2d_backward",
        dtype,
        cfg,
        |z| pool_strategy(z, dtype),
        |c| {
            let s = c.s;
            let (_, idx) = pool_oracle(&c.x.logical(), &s);
            let dims = [s.n, s.c, s.out[0], s.out[1]];
            let at_host = HostData::U32(idx.iter().map(|&i| i as u32).collect());
            let at = backend.upload(&at_host)?;
            let at_layout = Layout::contiguous(Shape::new(&dims).map_err(CaseError::from)?);
            let sd = c.dy.upload(backend)?;
            let dx = backend.max_pool2d_backward(
                View::new(&sd, &c.dy.layout),
                View::new(&at, &at_layout),
                &s.win,
                [s.h, s.w],
            )?;
            let xdims = [s.n, s.c, s.h, s.w];
            let got = fetch_all(backend, &dx, &xdims)?;
            let gv = c.dy.logical();
            let cells = s.out[0] * s.out[1];
            let mut acc = vec![(0f64, 0f64, 0usize); s.n * s.c * s.h * s.w];
            for (k, &g) in gv.iter().enumerate() {
                let cell = (k / cells) * s.h * s.w + idx[k];
                acc[cell].0 += g;
                acc[cell].1 += g.abs();
                acc[cell].2 += 1;
            }
            let want: Vec<_> = acc
                .into_iter()
                .map(|(v, mass, len)| (v, Bound::summed(bounds::dot(len.max(1), mass), mass, len)))
                .collect();
            compare("max_pool2d_backward", dtype, &xdims, &got, &want)
        },
    )
}

#[derive(Debug, Clone)]
struct Fused {
    s: Sizes,
    pool: Window2d,
    pooled_dims: [usize; 4],
    x: Operand,
    weight: Operand,
    bias: Option<Operand>,
    dpooled: Operand,
    relu: bool,
}

fn fused_strategy(z: &Sizer, dtype: DType) -> BoxedStrategy<Fused> {
    (sizes(z), (1usize..=3, 1usize..=3, 1usize..=2, 1usize..=2))
        .prop_filter_map(
            "pool fits the convolution's output",
            |(s, (kh, kw, sh, sw))| {
                // A window no larger than the output, so that no problem
                // is rejected (a rejected corner would be lost).
                let pool = Window2d::valid([kh.min(s.out[0]), kw.min(s.out[1])], [sh, sw]);
                let [ph, pw] = pool.output("conformance", s.out).ok()?;
                Some((s, pool, [s.n, s.o, ph, pw]))
            },
        )
        .prop_flat_map(move |(s, pool, pooled_dims)| {
            let [kh, kw] = s.win.kernel;
            (
                operand(
                    dtype,
                    vec![s.n, s.c, s.h, s.w],
                    Domain::Moderate(2.0),
                    false,
                ),
                operand(dtype, vec![s.o, s.c, kh, kw], Domain::Moderate(2.0), false),
                prop::option::of(contiguous(dtype, vec![s.o], Domain::Moderate(1.0))),
                contiguous(dtype, pooled_dims.to_vec(), Domain::Moderate(2.0)),
                any::<bool>(),
            )
                .prop_map(move |(x, weight, bias, dpooled, relu)| Fused {
                    s,
                    pool,
                    pooled_dims,
                    x,
                    weight,
                    bias,
                    dpooled,
                    relu,
                })
        })
        .boxed()
}

/// The fused convolution + activation + max-pool: forward bitwise equal to
/// the backend's own `max_pool2d(conv2d(…))`; backward against the f64
/// oracle of the gradient it routes (`dpooled` times the activation's
/// derivative at the pooled value, at `argmax`), through the filter, bias
/// and input gradients.
pub(crate) fn conv2d_pool<B: Backend>(backend: &B, dtype: DType, cfg: &Config) -> Report {
    run_cases(
        "conv2d_pool",
        dtype,
        cfg,
        |z| fused_strategy(z, dtype),
        |c| {
            let s = c.s;
            let (sx, sw) = (c.x.upload(backend)?, c.weight.upload(backend)?);
            let sb = c.bias.as_ref().map(|b| b.upload(backend)).transpose()?;
            let bias = || {
                c.bias
                    .as_ref()
                    .zip(sb.as_ref())
                    .map(|(b, st)| View::new(st, &b.layout))
            };
            let act = if c.relu {
                Activation::Relu
            } else {
                Activation::None
            };
            let (xv, wv) = (
                View::new(&sx, &c.x.layout),
                View::new(&sw, &c.weight.layout),
            );
            let (pooled, argmax) = backend.conv2d_pool(xv, wv, bias(), act, &s.win, &c.pool)?;
            let y = backend.conv2d(xv, wv, bias(), act, &s.win)?;
            let ydims = [s.n, s.o, s.out[0], s.out[1]];
            let ylayout = Layout::contiguous(Shape::new(&ydims).map_err(CaseError::from)?);
            let (want_p, want_a) = backend.max_pool2d(View::new(&y, &ylayout), &c.pool)?;
            let pd = c.pooled_dims;
            let got_p = fetch_all(backend, &pooled, &pd)?;
            let got_a = fetch_all(backend, &argmax, &pd)?;
            let exact = |v: Vec<f64>| v.into_iter().map(|v| (v, Bound::Exact)).collect::<Vec<_>>();
            compare(
                "conv2d_pool (pooled)",
                dtype,
                &pd,
                &got_p,
                &exact(fetch_all(backend, &want_p, &pd)?),
            )?;
            compare(
                "conv2d_pool (argmax)",
                DType::U32,
                &pd,
                &got_a,
                &exact(fetch_all(backend, &want_a, &pd)?),
            )?;

            let sd = c.dpooled.upload(backend)?;
            let pl = Layout::contiguous(Shape::new(&pd).map_err(CaseError::from)?);
            let (dx, dw, db) = backend.conv2d_pool_backward(
                xv,
                wv,
                View::new(&pooled, &pl),
                View::new(&argmax, &pl),
                View::new(&sd, &c.dpooled.layout),
                act,
                &s.win,
                &c.pool,
                true,
            )?;
            // The routed gradient of the convolution's output, exactly.
            let cells = s.out[0] * s.out[1];
            // dzm: the magnitudes routed to each cell, for the bound.
            let mut dz = vec![0f64; s.n * s.o * cells];
            let mut dzm = vec![0f64; s.n * s.o * cells];
            let pcells = pd[2] * pd[3];
            for (k, &g) in c.dpooled.logical().iter().enumerate() {
                let d = if c.relu && got_p[k] <= 0.0 { 0.0 } else { g };
                dz[(k / pcells) * cells + got_a[k] as usize] += d;
                dzm[(k / pcells) * cells + got_a[k] as usize] += d.abs();
            }
            let overlap = c.pool.kernel[0].div_ceil(c.pool.stride[0])
                * c.pool.kernel[1].div_ceil(c.pool.stride[1]);
            let [kh, kw] = s.win.kernel;
            let (xl, wl) = (c.x.logical(), c.weight.logical());
            let mut want_w = Vec::new();
            for oc in 0..s.o {
                for ic in 0..s.c {
                    for di in 0..kh {
                        for dj in 0..kw {
                            let (mut dot, mut mass, mut routed) = (0f64, 0f64, 0f64);
                            for img in 0..s.n {
                                for i in 0..s.out[0] {
                                    for j in 0..s.out[1] {
                                        let at = (img * s.o + oc) * cells + i * s.out[1] + j;
                                        let plane = (img * s.c + ic) * s.h * s.w;
                                        let xval = read(&xl, plane, &s, i, j, di, dj)
                                            .map_or(0.0, |at| xl[at]);
                                        dot += dz[at] * xval;
                                        mass += (dz[at] * xval).abs();
                                        routed += (dzm[at] * xval).abs();
                                    }
                                }
                            }
                            let len = s.n * cells;
                            let err = bounds::routed(dtype, mass, routed, len, overlap);
                            want_w.push((dot, Bound::summed(err, mass, len)));
                        }
                    }
                }
            }
            let want_b: Vec<_> = (0..s.o)
                .map(|oc| {
                    let at = |img: usize| (img * s.o + oc) * cells;
                    let terms = (0..s.n).flat_map(|img| dz[at(img)..][..cells].iter());
                    let (sum, mass) = terms.fold((0f64, 0f64), |(a, m), &g| (a + g, m + g.abs()));
                    let routed: f64 = (0..s.n)
                        .flat_map(|img| dzm[at(img)..][..cells].iter())
                        .sum();
                    let len = s.n * cells;
                    (
                        sum,
                        Bound::summed(bounds::routed(dtype, mass, routed, len, overlap), mass, len),
                    )
                })
                .collect();
            let mut acc = vec![(0f64, 0f64, 0f64, 0usize); s.n * s.c * s.h * s.w];
            for img in 0..s.n {
                for oc in 0..s.o {
                    for i in 0..s.out[0] {
                        for j in 0..s.out[1] {
                            let cell = (img * s.o + oc) * cells + i * s.out[1] + j;
                            let (g, gm) = (dz[cell], dzm[cell]);
                            for ic in 0..s.c {
                                let plane = (img * s.c + ic) * s.h * s.w;
                                for di in 0..kh {
                                    for dj in 0..kw {
                                        if let Some(at) = read(&[], plane, &s, i, j, di, dj) {
                                            let wv = wl[((oc * s.c + ic) * kh + di) * kw + dj];
                                            acc[at].0 += g * wv;
                                            acc[at].1 += (g * wv).abs();
                                            acc[at].2 += (gm * wv).abs();
                                            acc[at].3 += 1;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let want_x: Vec<_> = acc
                .into_iter()
                .map(|(v, mass, routed, len)| {
                    let err = bounds::routed(dtype, mass, routed, len, overlap);
                    (v, Bound::summed(err, mass, len))
                })
                .collect();
            let wdims = [s.o, s.c, kh, kw];
            let xdims = [s.n, s.c, s.h, s.w];
            let dx = dx.ok_or_else(|| {
                CaseError::Fail("conv2d_pool_backward: no dx though asked".into())
            })?;
            let a = compare(
                "conv2d_pool_backward (weight)",
                dtype,
                &wdims,
                &fetch_all(backend, &dw, &wdims)?,
                &want_w,
            )?;
            let b = compare(
                "conv2d_pool_backward (bias)",
                dtype,
                &[s.o],
                &fetch_all(backend, &db, &[s.o])?,
                &want_b,
            )?;
            let x = compare(
                "conv2d_pool_backward (input)",
                dtype,
                &xdims,
                &fetch_all(backend, &dx, &xdims)?,
                &want_x,
            )?;
            Ok(a.max(b).max(x))
        },
    )
}
