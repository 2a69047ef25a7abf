//! Memory ops: upload/download, strided copies, fills and casts — all exact.

use kiln_core::{Backend, DType, Layout, Shape, View};
use proptest::prelude::*;

use super::{fetch, fetch_all};
use crate::bound::round_to;
use crate::values::{operand, value, Domain};
use crate::{compare, run_cases, Bound, Config, Report, Sizer};

pub(crate) fn upload_download<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    let s = move |z: &Sizer| {
        z.elementwise(4, 9)
            .prop_flat_map(move |d| operand(dtype, d, Domain::General, true))
            .boxed()
    };
    run_cases("upload_download", dtype, cfg, s, |x| {
        let st = x.upload(b)?;
        let got = fetch(b, &st, &x.layout)?;
        let want: Vec<_> = x.logical().into_iter().map(|v| (v, Bound::Exact)).collect();
        compare("download", dtype, x.dims(), &got, &want)
    })
}

pub(crate) fn contiguous<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    // Transposed, sliced and broadcast sources; the blocked tier's sizes
    // split the copy among threads.
    let s = move |z: &Sizer| {
        z.elementwise(4, 9)
            .prop_flat_map(move |d| operand(dtype, d, Domain::General, true))
            .boxed()
    };
    run_cases("contiguous", dtype, cfg, s, |x| {
        let st = x.upload(b)?;
        let copy = b.contiguous(View::new(&st, &x.layout))?;
        let got = fetch_all(b, &copy, x.dims())?;
        let want: Vec<_> = x.logical().into_iter().map(|v| (v, Bound::Exact)).collect();
        compare("contiguous copy", dtype, x.dims(), &got, &want)
    })
}

pub(crate) fn copy_strided<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    // A source in any arrangement, copied into a window of a larger buffer.
    let s = move |z: &Sizer| {
        z.elementwise(3, 9)
            .prop_flat_map(move |d| {
                let window = prop::collection::vec((0usize..3, 0usize..3), d.len());
                (
                    operand(dtype, d, Domain::General, true),
                    window,
                    any::<bool>(),
                )
            })
            .boxed()
    };
    run_cases(
        "copy_strided",
        dtype,
        cfg,
        s,
        |(src, window, transposed)| {
            let dims = src.dims().to_vec();
            let big: Vec<usize> = dims
                .iter()
                .zip(&window)
                .map(|(&d, &(s, p))| d + s + p)
                .collect();
            let mut dst_layout = Layout::contiguous(Shape::new(&big)?);
            for (i, (&d, &(s, _))) in dims.iter().zip(&window).enumerate() {
                dst_layout = dst_layout.narrow(i, s, d)?;
            }
            if transposed && dims.len() >= 2 && dims[0] == dims[dims.len() - 1] {
                dst_layout = dst_layout.transpose(0, dims.len() - 1)?;
            }
            let fill = if dtype == DType::U32 { 7.0 } else { -3.5 };
            let total: usize = big.iter().product();
            let mut dst = b.full(total, dtype, fill)?;
            let st = src.upload(b)?;
            b.copy_strided(View::new(&st, &src.layout), &mut dst, &dst_layout)?;
            let got = fetch_all(b, &dst, &[total])?;
            let mut want = vec![(fill, Bound::Exact); total];
            for (o, v) in dst_layout.offsets().into_iter().zip(src.logical()) {
                want[o] = (v, Bound::Exact);
            }
            compare("copy_strided destination", dtype, &[total], &got, &want)
        },
    )
}

pub(crate) fn full<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    let s = move |z: &Sizer| {
        (
            z.elementwise(1, 70)
                .prop_map(|d| d.iter().product::<usize>()),
            value(Domain::General, DType::F32).prop_union(value(Domain::General, dtype).boxed()),
        )
            .boxed()
    };
    run_cases("full", dtype, cfg, s, |(n, v)| {
        let st = b.full(n, dtype, v)?;
        let got = fetch_all(b, &st, &[n])?;
        // u32 fills truncate toward zero and saturate (NaN → 0), as `as` does.
        let want = if dtype == DType::U32 {
            v as u32 as f64
        } else {
            round_to(dtype, v)
        };
        compare("full", dtype, &[n], &got, &vec![(want, Bound::Exact); n])
    })
}

/// Casts from `dtype` to every other dtype.
pub(crate) fn cast<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    let s = move |z: &Sizer| {
        z.elementwise(3, 9)
            .prop_flat_map(move |d| operand(dtype, d, Domain::General, true))
            .boxed()
    };
    run_cases("cast", dtype, cfg, s, |x| {
        let st = x.upload(b)?;
        let mut worst = 0f64;
        for to in DType::ALL {
            let out = b.cast(View::new(&st, &x.layout), to)?;
            let got = fetch_all(b, &out, x.dims())?;
            let want: Vec<_> = x
                .logical()
                .into_iter()
                .map(|v| {
                    (
                        if to == DType::U32 {
                            v as u32 as f64
                        } else {
                            round_to(to, v)
                        },
                        Bound::Exact,
                    )
                })
                .collect();
            worst = worst.max(compare(
                &format!("cast {dtype} → {to}"),
                to,
                x.dims(),
                &got,
                &want,
            )?);
        }
        Ok(worst)
    })
}
