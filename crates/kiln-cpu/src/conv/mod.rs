//! Convolution for the SIMD kernel sets: im2col per image, then the packed
//! GEMM with the set's micro-kernel.
//!
//! Per image, the patch matrix `cols` is `[c·kh·kw, oh·ow]` (row `(ic, di,
//! dj)` holds the input cell each output reads at that window offset, 0 in
//! the padding), and
//! - forward: `y = W·cols` (`W` as `[o, c·kh·kw]`), then bias and activation;
//! - backward-data: `dcols = Wᵀ·dy`, scattered back onto the input (col2im);
//! - backward-filter: `dW = Σ dy·colsᵀ` over the batch.
//!
//! Images are split over the worker pool; the filter gradient sums fixed
//! groups of [`GROUP`] images and then the groups in order, so every result
//! is independent of the thread count. Behind a max-pool, the filter
//! gradient skips the cells the pool routed nothing to ([`routed`]).
//!
//! Convolution + (ReLU or no activation) + 2×2 pool (the CNNs' first
//! layer) has a whole-image AVX-512 kernel for f32 (`avx512.rs`): no patch
//! matrix, no packing, no convolution output in memory, and the same bits
//! as the path above; the backward pass's transposed patch matrix is built
//! there too, sixteen cells at a time.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod routed;

use crate::workers::Workers;
use kiln_core::conv::{conv2d_backward_data_shape, conv2d_backward_filter_shape, conv2d_output};
use kiln_core::{Activation, Error, HostData, Result, View, Window2d};

use crate::gemm::{accumulate, Matrix};
use crate::reference::conv::{common_dtype, source};
use crate::reference::elementwise::activate;
use crate::vector::convert;
use crate::KernelSet;

/// Images per partial sum of the filter gradient.
const GROUP: usize = 8;

/// One image's geometry.
#[derive(Clone, Copy)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    win: Window2d,
}

impl Geometry {
    fn patch(&self) -> usize {
        self.c * self.win.kernel[0] * self.win.kernel[1]
    }
    fn cells(&self) -> usize {
        self.oh * self.ow
    }

    /// The range of output columns `j` whose window offset `dj` lands
    /// inside the input row, for stride 1 (empty as `(j, j)`; only a
    /// non-empty range may be used to index the input).
    fn inside(&self, dj: usize) -> (usize, usize) {
        let pl = self.win.padding[2];
        let j0 = pl.saturating_sub(dj).min(self.ow);
        let j1 = (self.w + pl).saturating_sub(dj).min(self.ow).max(j0);
        (j0, j1)
    }

    /// Visits every (patch row, output row) pair: `f(row, i, Some(y))` with
    /// the input row `y` it reads, or `None` in the padding.
    fn rows(&self, mut f: impl FnMut(usize, usize, usize, Option<usize>)) {
        let ([kh, kw], [sh, _], [pt, ..]) = (self.win.kernel, self.win.stride, self.win.padding);
        for ic in 0..self.c {
            for di in 0..kh {
                for dj in 0..kw {
                    let r = (ic * kh + di) * kw + dj;
                    for i in 0..self.oh {
                        f(
                            r,
                            i,
                            dj,
                            source(i, di, sh, pt, self.h).map(|y| ic * self.h + y),
                        );
                    }
                }
            }
        }
    }

    /// Fills `cols` (`patch × cells`) from one image (`c × h × w`).
    fn im2col(&self, image: &[f32], cols: &mut [f32]) {
        let (w, ow, cells) = (self.w, self.ow, self.cells());
        let (sw, pl) = (self.win.stride[1], self.win.padding[2]);
        self.rows(|r, i, dj, y| {
            let dst = &mut cols[r * cells + i * ow..][..ow];
            let Some(y) = y else {
                dst.fill(0.0);
                return;
            };
            let src = &image[y * w..][..w];
            if sw == 1 {
                let (j0, j1) = self.inside(dj);
                if j0 == j1 {
                    dst.fill(0.0);
                    return;
                }
                dst[..j0].fill(0.0);
                dst[j0..j1].copy_from_slice(&src[j0 + dj - pl..j1 + dj - pl]);
                dst[j1..].fill(0.0);
            } else {
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = source(j, dj, sw, pl, w).map_or(0.0, |x| src[x]);
                }
            }
        });
    }

    /// Fills `cols_t` (`cells` rows, `ld ≥ patch` floats apart): the
    /// transpose of [`Self::im2col`]'s matrix, the patch each output cell
    /// reads in one row (columns `patch..ld` are left as they were, or
    /// zeroed up to 16 on AVX-512). Built directly where every window is
    /// inside the image; elsewhere through im2col and a transposition.
    fn im2col_t(&self, set: KernelSet, image: &[f32], cols_t: &mut [f32], ld: usize) {
        if self.win.stride == [1, 1] && self.win.padding == [0; 4] {
            #[cfg(target_arch = "x86_64")]
            if set == KernelSet::Avx512 && self.patch() <= 16 && ld >= 16 {
                // SAFETY: the set is AVX-512, checked against this
                // processor when the backend was built; the kernel checks
                // its operands' sizes.
                return unsafe {
                    avx512::im2col_t_rows(
                        image,
                        [self.c, self.h, self.w],
                        self.win.kernel,
                        cols_t,
                        ld,
                    )
                };
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = set;
            return self.im2col_t_inside(image, cols_t, ld);
        }
        // Strides and padding: im2col's matrix, transposed.
        let (patch, cells) = (self.patch(), self.cells());
        crate::scratch::sized(patch * cells, |cols| {
            self.im2col(image, cols);
            for (r, row) in cols.chunks_exact(cells.max(1)).enumerate() {
                for (dst, &v) in cols_t.iter_mut().skip(r).step_by(ld).zip(row) {
                    *dst = v;
                }
            }
        })
    }

    /// [`Self::im2col_t`] for stride 1 and no padding, where every window
    /// lies inside the image: row by row, each a run of `c·kh` copies of
    /// `kw` neighbours.
    fn im2col_t_inside(&self, image: &[f32], cols_t: &mut [f32], ld: usize) {
        let ([kh, kw], (c, h, w)) = (self.win.kernel, (self.c, self.h, self.w));
        let patch = self.patch();
        let rows = cols_t.chunks_mut(ld).take(self.cells());
        for (cell, row) in rows.enumerate() {
            let (i, j) = (cell / self.ow, cell % self.ow);
            let segments = row[..patch].chunks_exact_mut(kw);
            let sources = (0..c).flat_map(|ic| (0..kh).map(move |di| (ic * h + i + di) * w + j));
            for (seg, start) in segments.zip(sources) {
                let from = &image[start..][..kw];
                match (
                    <&mut [f32; 3]>::try_from(&mut *seg),
                    <&[f32; 3]>::try_from(from),
                ) {
                    // 3-wide windows: one fixed-size move.
                    (Ok(seg), Ok(from)) => *seg = *from,
                    _ => seg.copy_from_slice(from),
                }
            }
        }
    }

    /// Adds `cols` back onto one image's gradient (the adjoint of im2col).
    fn col2im(&self, cols: &[f32], image: &mut [f32]) {
        let (w, ow, cells) = (self.w, self.ow, self.cells());
        let (sw, pl) = (self.win.stride[1], self.win.padding[2]);
        self.rows(|r, i, dj, y| {
            let Some(y) = y else { return };
            let src = &cols[r * cells + i * ow..][..ow];
            let dst = &mut image[y * w..][..w];
            if sw == 1 {
                let (j0, j1) = self.inside(dj);
                if j0 == j1 {
                    return;
                }
                for (d, &s) in dst[j0 + dj - pl..j1 + dj - pl].iter_mut().zip(&src[j0..j1]) {
                    *d += s;
                }
            } else {
                for (j, &s) in src.iter().enumerate() {
                    if let Some(x) = source(j, dj, sw, pl, w) {
                        dst[x] += s;
                    }
                }
            }
        });
    }
}

/// Adds each output channel's bias and applies the activation, one loop
/// per activation, compiled for `set`, so each is straight vector code.
fn finish(
    set: KernelSet,
    y: &mut [f32],
    cells: usize,
    bias: Option<&[f32]>,
    activation: Activation,
) {
    macro_rules! each {
        ($($act:ident),*) => {
            match activation {
                $(Activation::$act => {
                    for (oc, row) in y.chunks_exact_mut(cells).enumerate() {
                        let add = bias.map_or(0.0, |b| b[oc]);
                        crate::vector::wide::update(set, row, |v| activate(Activation::$act, v + add));
                    }
                })*
            }
        };
    }
    each!(None, Relu, Sigmoid, Tanh);
}

/// The filter and bias gradients summed over the image groups' partial
/// sums, in group order (so the thread count never changes the result).
fn sum_groups(
    partials: Vec<(Vec<f32>, Vec<f32>)>,
    weights: usize,
    biases: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut dw = vec![0f32; weights];
    let mut db = vec![0f32; biases];
    for (pw, pb) in partials {
        for (a, b) in dw.iter_mut().zip(pw) {
            *a += b;
        }
        for (a, b) in db.iter_mut().zip(pb) {
            *a += b;
        }
    }
    (dw, db)
}

pub(crate) fn conv2d(
    set: KernelSet,
    pool: &Workers,
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
    let g = Geometry {
        c,
        h,
        w,
        oh,
        ow,
        win: *win,
    };
    let (xs, ws) = (
        convert::read_f32(set, None, "conv2d", x)?,
        convert::read_f32(set, None, "conv2d", weight)?,
    );
    let bs = bias
        .map(|b| convert::read_f32(set, None, "conv2d", b))
        .transpose()?;
    let (patch, cells) = (g.patch(), g.cells());
    let total = n * o * cells;
    if total == 0 {
        return convert::store_f32(set, "conv2d", dtype, Vec::new());
    }
    // A fresh output, each image's part zeroed by the thread that fills it.
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let filters = Matrix::from_slice(&ws, 0, patch, 1);
    pool.for_each(
        out.spare_capacity_mut()[..total]
            .chunks_mut(o * cells)
            .enumerate()
            .collect(),
        |(img, y)| {
            let y = crate::fresh::zeros(y);
            crate::scratch::sized(patch * cells, |cols| {
                g.im2col(&xs[img * c * h * w..][..c * h * w], cols);
                let b = Matrix::from_slice(cols, 0, cells, 1);
                accumulate(set, &filters, &b, (o, patch, cells), y, true);
                finish(set, y, cells, bs.as_deref(), activation);
            })
        },
    );
    // SAFETY: the chunks cover `0..total` (whole images), `for_each` ran
    // every one (a panic is resumed before this line), and each task zeroed
    // its chunk first thing.
    unsafe { out.set_len(total) };
    convert::store_f32(set, "conv2d", dtype, out)
}

pub(crate) fn conv2d_backward_data(
    set: KernelSet,
    pool: &Workers,
    dy: View<'_, HostData>,
    weight: View<'_, HostData>,
    win: &Window2d,
    input: [usize; 2],
) -> Result<HostData> {
    let dtype = common_dtype("conv2d_backward_data", &[dy, weight])?;
    let [n, c, h, w] =
        conv2d_backward_data_shape(dy.layout.dims(), weight.layout.dims(), win, input)?;
    let [_, o, oh, ow] = dy.layout.dims()[..] else {
        unreachable!("checked above")
    };
    let g = Geometry {
        c,
        h,
        w,
        oh,
        ow,
        win: *win,
    };
    let (gs, ws) = (
        convert::read_f32(set, None, "conv2d_backward_data", dy)?,
        convert::read_f32(set, None, "conv2d_backward_data", weight)?,
    );
    let (patch, cells) = (g.patch(), g.cells());
    let mut dx = vec![0f32; n * c * h * w];
    if dx.is_empty() {
        return convert::store_f32(set, "conv2d_backward_data", dtype, dx);
    }
    let filters_t = Matrix::from_slice(&ws, 0, 1, patch);
    pool.for_each(
        dx.chunks_mut(c * h * w).enumerate().collect(),
        |(img, image)| {
            crate::scratch::sized(patch * cells, |cols| {
                let grad = Matrix::from_slice(&gs, img * o * cells, cells, 1);
                accumulate(set, &filters_t, &grad, (patch, o, cells), cols, true);
                g.col2im(cols, image);
            })
        },
    );
    convert::store_f32(set, "conv2d_backward_data", dtype, dx)
}

pub(crate) fn conv2d_backward_filter(
    set: KernelSet,
    pool: &Workers,
    x: View<'_, HostData>,
    dy: View<'_, HostData>,
    win: &Window2d,
) -> Result<(HostData, HostData)> {
    let dtype = common_dtype("conv2d_backward_filter", &[x, dy])?;
    let [n, o, oh, ow] = conv2d_backward_filter_shape(x.layout.dims(), dy.layout.dims(), win)?;
    let [_, c, h, w] = x.layout.dims()[..] else {
        unreachable!("checked above")
    };
    let g = Geometry {
        c,
        h,
        w,
        oh,
        ow,
        win: *win,
    };
    let (xs, gs) = (
        convert::read_f32(set, None, "conv2d_backward_filter", x)?,
        convert::read_f32(set, None, "conv2d_backward_filter", dy)?,
    );
    let (patch, cells) = (g.patch(), g.cells());
    let group = |first: usize| {
        let mut dw = vec![0f32; o * patch];
        let mut db = vec![0f32; o];
        let mut cols = vec![0f32; patch * cells];
        for img in first..(first + GROUP).min(n) {
            g.im2col(&xs[img * c * h * w..][..c * h * w], &mut cols);
            let grad = Matrix::from_slice(&gs, img * o * cells, cells, 1);
            let cols_t = Matrix::from_slice(&cols, 0, 1, cells);
            accumulate(
                set,
                &grad,
                &cols_t,
                (o, cells, patch),
                &mut dw,
                img == first,
            );
            for (b, row) in db
                .iter_mut()
                .zip(gs[img * o * cells..][..o * cells].chunks_exact(cells.max(1)))
            {
                *b += crate::vector::wide::sum(set, row);
            }
        }
        (dw, db)
    };
    let firsts: Vec<usize> = (0..n).step_by(GROUP).collect();
    let partials: Vec<(Vec<f32>, Vec<f32>)> = pool.map(firsts, group);
    let (dw, db) = sum_groups(partials, o * patch, o);
    Ok((
        convert::store_f32(set, "conv2d_backward_filter", dtype, dw)?,
        convert::store_f32(set, "conv2d_backward_filter", dtype, db)?,
    ))
}

/// Convolution, activation and max-pooling fused per image: the image's
/// convolution output (`o × oh·ow`, 86 KB for the seed CNN) is produced,
/// finished and pooled while it sits in the core's cache, and never
/// written out. Bitwise the unfused composition (the same GEMM, epilogue
/// and pooling code per image). Where `fuses_whole` holds (the seed
/// CNN's layer on AVX-512), one kernel computes the pooled outputs
/// straight from the image, with the same sums in the same order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_pool(
    set: KernelSet,
    pool: &Workers,
    x: View<'_, HostData>,
    weight: View<'_, HostData>,
    bias: Option<View<'_, HostData>>,
    activation: Activation,
    conv: &Window2d,
    pooling: &Window2d,
) -> Result<(HostData, HostData)> {
    let [n, o, oh, ow] = conv2d_output(
        x.layout.dims(),
        weight.layout.dims(),
        bias.map(|b| b.layout.dims()),
        conv,
    )?;
    let [_, _, ph, pw] = kiln_core::conv::pool2d_output(&[n, o, oh, ow], pooling)?;
    let mut views = vec![x, weight];
    views.extend(bias);
    let dtype = common_dtype("conv2d_pool", &views)?;
    let [_, c, h, w] = x.layout.dims()[..] else {
        unreachable!("checked by conv2d_output")
    };
    if oh * ow > u32::MAX as usize {
        return Err(Error::shape(
            "conv2d_pool",
            format!("a convolution output plane of {oh}×{ow} does not fit u32 indices"),
        ));
    }
    let g = Geometry {
        c,
        h,
        w,
        oh,
        ow,
        win: *conv,
    };
    let (xs, ws) = (
        convert::read_f32(set, None, "conv2d_pool", x)?,
        convert::read_f32(set, None, "conv2d_pool", weight)?,
    );
    let bs = bias
        .map(|b| convert::read_f32(set, None, "conv2d_pool", b))
        .transpose()?;
    let (patch, cells, pcells) = (g.patch(), g.cells(), ph * pw);
    let total = n * o * pcells;
    if total == 0 {
        return Ok((
            convert::store_f32(set, "conv2d_pool", dtype, Vec::new())?,
            HostData::U32(Vec::new()),
        ));
    }
    // Fresh outputs, each image's part written by the thread that computes
    // it, and not zeroed first where the pool kernel only stores.
    let mut pooled: Vec<f32> = Vec::with_capacity(total);
    let mut argmax: Vec<u32> = Vec::with_capacity(total);
    let filters = Matrix::from_slice(&ws, 0, patch, 1);
    let images = pooled.spare_capacity_mut()[..total]
        .chunks_mut(o * pcells)
        .zip(argmax.spare_capacity_mut()[..total].chunks_mut(o * pcells));
    #[cfg(target_arch = "x86_64")]
    if fuses_whole(set, dtype, &g, activation, pooling) {
        pool.for_each(images.enumerate().collect(), |(img, (p, a))| {
            let image = avx512::Image {
                x: &xs[img * c * h * w..][..c * h * w],
                chw: [c, h, w],
                kernel: conv.kernel,
                filters: &ws,
                bias: bs.as_deref(),
                relu: activation == Activation::Relu,
                round_bf16: dtype == kiln_core::DType::BF16,
            };
            crate::scratch::sized(image.taps_len(), |taps| {
                // SAFETY: the set is AVX-512 (`fuses_whole`), which the
                // backend checked against this processor when it was
                // built; the kernel checks its operands' lengths.
                unsafe { avx512::conv_relu_pool(&image, p, a, taps) }
            })
        });
        // SAFETY: as below; `conv_relu_pool` writes every output of its
        // image.
        unsafe {
            pooled.set_len(total);
            argmax.set_len(total);
        }
        return Ok((
            convert::store_f32(set, "conv2d_pool", dtype, pooled)?,
            HostData::U32(argmax),
        ));
    }
    pool.for_each(images.enumerate().collect(), |(img, (p, a))| {
        crate::scratch::sized(patch * cells, |cols| {
            crate::scratch::sized(o * cells, |y| {
                g.im2col(&xs[img * c * h * w..][..c * h * w], cols);
                let b = Matrix::from_slice(cols, 0, cells, 1);
                accumulate(set, &filters, &b, (o, patch, cells), y, true);
                finish(set, y, cells, bs.as_deref(), activation);
                // Pool what the unfused convolution would have stored.
                convert::round_to(set, dtype, y);
                let planes = y.chunks_exact(cells).zip(p.chunks_exact_mut(pcells));
                for ((plane, pp), pa) in planes.zip(a.chunks_exact_mut(pcells)) {
                    crate::pool::fresh_plane(set, plane, [oh, ow], pooling, [ph, pw], pp, pa);
                }
            })
        })
    });
    // SAFETY: the chunks cover `0..total` (whole images of `o · pcells`),
    // `for_each` ran every one (a task's panic is resumed before this
    // line), and each task wrote every plane of its chunks (`fresh_plane`).
    unsafe {
        pooled.set_len(total);
        argmax.set_len(total);
    }
    Ok((
        convert::store_f32(set, "conv2d_pool", dtype, pooled)?,
        HostData::U32(argmax),
    ))
}

/// Whether [`conv2d_pool`] runs the whole-image AVX-512 kernel
/// ([`avx512::conv_relu_pool`]): f32 or bf16 (widened, each convolution
/// output rounded back before pooling as on the per-image path), a
/// stride-1 unpadded convolution
/// whose patch fits one of the GEMM's `KC` blocks (so the sums are the
/// GEMM's, in the same order), no activation or the ReLU, and a 2×2 pool
/// at stride 2, unpadded.
#[cfg(target_arch = "x86_64")]
fn fuses_whole(
    set: KernelSet,
    dtype: kiln_core::DType,
    g: &Geometry,
    activation: Activation,
    pooling: &Window2d,
) -> bool {
    set == KernelSet::Avx512
        && matches!(dtype, kiln_core::DType::F32 | kiln_core::DType::BF16)
        && g.win.stride == [1, 1]
        && g.win.padding == [0; 4]
        && (1..=crate::gemm::blocking_of(set).kc).contains(&g.patch())
        && matches!(activation, Activation::None | Activation::Relu)
        && *pooling == Window2d::valid([2, 2], [2, 2])
}

/// The backward pass of [`conv2d_pool`], per image with the gradient of the
/// convolution's output built in cache: `dpooled` times the activation's
/// derivative at the pooled value, added at `argmax`; then the filter
/// gradient (fixed groups of [`GROUP`] images, summed in order) and, if
/// asked, the input gradient.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_pool_backward(
    set: KernelSet,
    pool: &Workers,
    x: View<'_, HostData>,
    weight: View<'_, HostData>,
    pooled: View<'_, HostData>,
    argmax: View<'_, HostData>,
    dpooled: View<'_, HostData>,
    activation: Activation,
    conv: &Window2d,
    pooling: &Window2d,
    need_dx: bool,
) -> Result<kiln_core::ConvGrads<HostData>> {
    let op = "conv2d_pool_backward";
    let dtype = common_dtype(op, &[x, weight, pooled, dpooled])?;
    let conv_dims = conv2d_output(x.layout.dims(), weight.layout.dims(), None, conv)?;
    let [n, o, oh, ow] = conv_dims;
    let pdims = kiln_core::conv::pool2d_output(&conv_dims, pooling)?;
    for (what, v) in [("pooled", pooled), ("argmax", argmax), ("dpooled", dpooled)] {
        if v.layout.dims() != pdims {
            return Err(Error::shape(
                op,
                format!(
                    "{what} has shape {}, the pool's output is {pdims:?}",
                    v.layout.shape()
                ),
            ));
        }
    }
    let [_, c, h, w] = x.layout.dims()[..] else {
        unreachable!("checked by conv2d_output")
    };
    let g = Geometry {
        c,
        h,
        w,
        oh,
        ow,
        win: *conv,
    };
    let xs = convert::read_f32(set, None, op, x)?;
    let ws = convert::read_f32(set, None, op, weight)?;
    let ys = convert::read_f32(set, None, op, pooled)?;
    let gs = convert::read_f32(set, None, op, dpooled)?;
    let at = crate::storage::read_u32(op, argmax)?;
    // Checked image by image in the tasks, while each image's indices are
    // in cache for the kernels that follow (a pass over them all on this
    // thread first was 1.5 % of a 2-thread CNN epoch).
    let check = |at: &[u32]| {
        crate::storage::check_indices(set, at, oh * ow, |bad| {
            Error::invalid(format!(
                "{op}: argmax {bad} is outside the {oh}×{ow} convolution output plane"
            ))
        })
    };
    let (patch, cells, pcells) = (g.patch(), g.cells(), pdims[2] * pdims[3]);
    // One image's routed gradients: `dpooled` times the activation's
    // derivative at the pooled value, one loop per activation so the
    // derivative is inlined.
    let derivatives = |img: usize, d: &mut [f32]| {
        let k0 = img * o * pcells;
        let (ys, gs) = (&ys[k0..][..o * pcells], &gs[k0..][..o * pcells]);
        // Compiled for the set, one loop per activation.
        macro_rules! each {
            ($($act:ident),*) => {
                match activation {
                    $(Activation::$act => {
                        crate::vector::wide::zip(set, ys, gs, d, |y, g| {
                            match Activation::$act.as_unary() {
                                Some(u) => crate::reference::elementwise::backward_f32(u, 0.0, y, g),
                                None => g,
                            }
                        })
                    })*
                }
            };
        }
        each!(None, Relu, Sigmoid, Tanh);
    };
    let filters_t = Matrix::from_slice(&ws, 0, 1, patch);
    let ldw = routed::padded(patch);
    let group = |first: usize, dx: Option<&mut [f32]>| {
        let mut dw = vec![0f32; o * ldw];
        let mut db = vec![0f32; o];
        let mut dx = dx;
        // Rows of whole vectors (so no slack), on 64-byte lines: no load
        // splits a line (7 % of the op at the seed CNN's 9-float patches).
        let len = cells * ldw + routed::slack(ldw);
        crate::scratch::sized(len + 16, |cols_t| -> Result<()> {
            let skip = cols_t.as_ptr().align_offset(64).min(16);
            let cols_t = &mut cols_t[skip..][..len];
            // Columns past the patch land in `dw`'s padding only; zeros
            // all the same.
            cols_t.fill(0.0);
            crate::scratch::sized(o * pcells, |d| {
                for img in first..(first + GROUP).min(n) {
                    let at = &at[img * o * pcells..][..o * pcells];
                    check(at)?;
                    derivatives(img, d);
                    for (b, row) in db.iter_mut().zip(d.chunks_exact(pcells.max(1))) {
                        *b += crate::vector::wide::sum(set, row);
                    }
                    g.im2col_t(set, &xs[img * c * h * w..][..c * h * w], cols_t, ldw);
                    let image = routed::Image {
                        cols_t,
                        ld: ldw,
                        routed: d,
                        at,
                        pcells,
                    };
                    routed::filter(set, image, &mut dw);
                    if let Some(dx) = dx.as_deref_mut() {
                        // The input gradient from the dense routed gradient:
                        // dcols = Wᵀ·dz, then col2im.
                        let image = &mut dx[(img - first) * c * h * w..][..c * h * w];
                        crate::scratch::sized(o * cells, |dz| {
                            dz.fill(0.0);
                            let planes = dz
                                .chunks_exact_mut(cells.max(1))
                                .zip(d.chunks_exact(pcells.max(1)));
                            for ((plane, d), at) in planes.zip(at.chunks_exact(pcells.max(1))) {
                                for (&d, &a) in d.iter().zip(at) {
                                    plane[a as usize] += d;
                                }
                            }
                            crate::scratch::sized(patch * cells, |cols| {
                                let grad = Matrix::from_slice(dz, 0, cells, 1);
                                accumulate(set, &filters_t, &grad, (patch, o, cells), cols, true);
                                g.col2im(cols, image);
                            })
                        });
                    }
                }
                Ok(())
            })
        })?;
        let dw: Vec<f32> = dw
            .chunks_exact(ldw.max(1))
            .flat_map(|row| &row[..patch])
            .copied()
            .collect();
        Ok((dw, db))
    };
    let firsts: Vec<usize> = (0..n).step_by(GROUP).collect();
    let mut dx = need_dx.then(|| vec![0f32; n * c * h * w]);
    let partials: Vec<Result<(Vec<f32>, Vec<f32>)>> = match dx.as_mut() {
        Some(dx) if !dx.is_empty() => {
            let jobs = dx.chunks_mut(GROUP * c * h * w).zip(firsts).collect();
            pool.map(jobs, |(chunk, f)| group(f, Some(chunk)))
        }
        _ => pool.map(firsts, |f| group(f, None)),
    };
    let partials = partials.into_iter().collect::<Result<Vec<_>>>()?;
    let (dw, db) = sum_groups(partials, o * patch, o);
    let dx = dx
        .map(|d| convert::store_f32(set, op, dtype, d))
        .transpose()?;
    Ok((
        dx,
        convert::store_f32(set, op, dtype, dw)?,
        convert::store_f32(set, op, dtype, db)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Layout, Shape};

    /// An argmax outside the convolution's output plane is an error naming
    /// it, from whichever image group (and thread) meets it.
    #[test]
    fn a_bad_argmax_in_any_image_is_an_error() {
        let set = KernelSet::best();
        let pool = Workers::new(2).unwrap();
        let (n, o) = (20, 3);
        let data = |len: usize| HostData::F32((0..len).map(|i| (i % 7) as f32 - 3.0).collect());
        let lay = |d: &[usize]| Layout::contiguous(Shape::new(d).unwrap());
        let (x, w) = (data(n * 6 * 6), data(o * 9));
        let (xl, wl, pl) = (lay(&[n, 1, 6, 6]), lay(&[o, 1, 3, 3]), lay(&[n, o, 2, 2]));
        let conv = Window2d::valid([3, 3], [1, 1]);
        let pooling = Window2d::valid([2, 2], [2, 2]);
        let pooled = data(n * o * 4);
        let mut at = vec![0u32; n * o * 4];
        // The 17th image: its group is not the first.
        at[17 * o * 4 + 5] = 16;
        let (at, dp) = (HostData::U32(at), data(n * o * 4));
        let e = conv2d_pool_backward(
            set,
            &pool,
            View::new(&x, &xl),
            View::new(&w, &wl),
            View::new(&pooled, &pl),
            View::new(&at, &pl),
            View::new(&dp, &pl),
            Activation::Relu,
            &conv,
            &pooling,
            false,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("argmax 16 is outside the 4×4"),
            "{e}"
        );
    }

    /// The whole-image AVX-512 kernel gives the bits of the unfused
    /// composition (im2col, GEMM, epilogue, then the pool kernel) — maxima
    /// and indices — for images narrower and wider than its 16 pooled
    /// columns, odd and even planes, channel counts that leave partial
    /// register blocks, ties (ReLU zeros, repeated values) and NaNs; in f32
    /// and in bf16 (where the convolution's output is rounded before the
    /// pool compares, and rounding makes more ties).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_fused_avx512_kernel_is_bitwise_the_unfused_composition() {
        use kiln_core::DType;
        let set = KernelSet::Avx512;
        if !set.available() {
            return;
        }
        let pool = Workers::new(2).unwrap();
        let lay = |d: &[usize]| Layout::contiguous(Shape::new(d).unwrap());
        let pooling = Window2d::valid([2, 2], [2, 2]);
        // Values on a coarse grid, so sums and maxima tie often.
        let grid = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7919 + seed * 104_729) % 13) as f32 * 0.25 - 1.5)
                .collect()
        };
        let shapes = [
            // (n, c, h, w, kernel, o)
            (3, 1, 28, 28, [3, 3], 32),
            (2, 1, 7, 6, [3, 3], 5),
            (2, 2, 9, 36, [3, 3], 6),
            (1, 3, 12, 69, [2, 4], 7),
            (2, 1, 5, 35, [1, 1], 3),
            (1, 2, 11, 40, [5, 5], 9),
            (1, 1, 3, 3, [2, 2], 2),
            (1, 1, 4, 2, [3, 1], 1),
            // 16 and 32 pooled columns: whole masks, the widest span.
            (1, 1, 6, 34, [3, 3], 3),
            (1, 2, 5, 66, [3, 3], 4),
        ];
        let cast = |dtype: DType, v: Vec<f32>| match dtype {
            DType::BF16 => HostData::BF16(v.into_iter().map(kiln_core::bf16::from_f32).collect()),
            _ => HostData::F32(v),
        };
        for ((n, c, h, w, kernel, o), dtype) in shapes
            .into_iter()
            .flat_map(|s| [(s, DType::F32), (s, DType::BF16)])
        {
            // (relu, bias, NaNs, smooth): a smooth image's neighbouring
            // outputs differ by less than a bf16 ulp, so rounding first
            // makes ties the first maximum must win.
            for (relu, with_bias, nans, smooth) in [
                (true, true, false, false),
                (false, false, true, false),
                (true, false, true, false),
                (false, true, false, true),
            ] {
                let conv = Window2d::valid(kernel, [1, 1]);
                let mut xs = grid(n * c * h * w, 1);
                if smooth {
                    xs = (0..xs.len())
                        .map(|i| 1.0 + (i % w) as f32 / 512.0)
                        .collect();
                }
                if nans {
                    for i in (5..xs.len()).step_by(97) {
                        xs[i] = f32::NAN;
                    }
                }
                let x = cast(dtype, xs);
                // Weights off the grid in bf16, so sums round differently.
                let scale = if dtype == DType::BF16 { 1.0 / 3.0 } else { 1.0 };
                let ws = grid(o * c * kernel[0] * kernel[1], 2);
                let wt = cast(dtype, ws.into_iter().map(|v| v * scale).collect());
                let b = cast(dtype, grid(o, 3));
                let (xl, wl, bl) = (
                    lay(&[n, c, h, w]),
                    lay(&[o, c, kernel[0], kernel[1]]),
                    lay(&[o]),
                );
                let act = if relu {
                    Activation::Relu
                } else {
                    Activation::None
                };
                let bias = with_bias.then(|| View::new(&b, &bl));
                let [oh, ow] = [h + 1 - kernel[0], w + 1 - kernel[1]];
                let g = Geometry {
                    c,
                    h,
                    w,
                    oh,
                    ow,
                    win: conv,
                };
                assert!(fuses_whole(set, dtype, &g, act, &pooling));
                let what = format!("{dtype} {n}×{c}×{h}×{w}, {kernel:?}, {o} filters, relu {relu}, bias {with_bias}, NaNs {nans}, smooth {smooth}");
                let (fused, fused_at) = conv2d_pool(
                    set,
                    &pool,
                    View::new(&x, &xl),
                    View::new(&wt, &wl),
                    bias,
                    act,
                    &conv,
                    &pooling,
                )
                .unwrap();
                let y = conv2d(
                    set,
                    &pool,
                    View::new(&x, &xl),
                    View::new(&wt, &wl),
                    bias,
                    act,
                    &conv,
                )
                .unwrap();
                let (want, want_at) = crate::pool::max_pool2d(
                    set,
                    &pool,
                    View::new(&y, &lay(&[n, o, oh, ow])),
                    &pooling,
                )
                .unwrap();
                assert_eq!(fused.dtype(), dtype, "{what}");
                let (got, want) = (fused.to_f32_vec(), want.to_f32_vec());
                assert_eq!(got.len(), want.len(), "{what}");
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{what}: pooled output {i}: {g} against {w}"
                    );
                }
                let (HostData::U32(got), HostData::U32(want)) = (&fused_at, &want_at) else {
                    panic!("{what}: indices not u32")
                };
                assert_eq!(got.len(), want.len(), "{what}: argmax");
                if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
                    panic!("{what}: argmax {i}: {} against {}", got[i], want[i]);
                }
            }
        }
    }

    /// The transposed patch matrix is im2col's, transposed, for windows
    /// inside, across and wider than the input, at strides 1 to 3.
    #[test]
    fn transposed_im2col_is_the_transpose_of_im2col() {
        let sets: Vec<KernelSet> = KernelSet::ALL
            .into_iter()
            .filter(|s| s.available())
            .collect();
        for (c, h, w) in [
            (1, 6, 7),
            (2, 5, 4),
            (1, 2, 2),
            (3, 3, 1),
            (1, 5, 40),
            (2, 4, 21),
        ] {
            for kernel in [[1, 1], [3, 3], [2, 4], [3, 5]] {
                for stride in [[1, 1], [2, 1], [1, 3]] {
                    for padding in [[0; 4], [1, 0, 2, 1], [0, 2, 0, 3]] {
                        let win = Window2d {
                            kernel,
                            stride,
                            padding,
                        };
                        let Ok([oh, ow]) = win.output("test", [h, w]) else {
                            continue;
                        };
                        let g = Geometry {
                            c,
                            h,
                            w,
                            oh,
                            ow,
                            win,
                        };
                        let image: Vec<f32> = (1..=c * h * w).map(|v| v as f32).collect();
                        let (patch, cells) = (g.patch(), g.cells());
                        let mut cols = vec![f32::NAN; patch * cells];
                        g.im2col(&image, &mut cols);
                        for (set, ld) in sets
                            .iter()
                            .flat_map(|&s| [(s, patch), (s, patch + 3), (s, patch.max(16))])
                        {
                            let mut cols_t = vec![f32::NAN; ld * cells];
                            g.im2col_t(set, &image, &mut cols_t, ld);
                            for (cell, row) in cols_t.chunks_exact(ld).enumerate() {
                                // Left as they were, or zeros up to 16.
                                let zeroed = if set == KernelSet::Avx512 { 16 } else { 0 };
                                let kept =
                                    |(r, v): (usize, &f32)| v.is_nan() || (r < zeroed && *v == 0.0);
                                assert!(
                                    row.iter().enumerate().skip(patch).all(kept),
                                    "{set:?}, {c}×{h}×{w}, {win:?}, ld {ld}: row {cell}'s padding was written"
                                );
                            }
                            for r in 0..patch {
                                for cell in 0..cells {
                                    assert_eq!(
                                        cols_t[cell * ld + r].to_bits(),
                                        cols[r * cells + cell].to_bits(),
                                        "{c}×{h}×{w}, {win:?}, ld {ld}: patch row {r}, cell {cell}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
