//! Host storage helpers: validated strided reads and writes, fills and casts.

use std::borrow::Cow;

use kiln_core::{
    bf16, bf16_from_f64, f16, f16_from_f64, DType, Error, HostData, Layout, Result, View,
};

use crate::unsupported;
use crate::workers::Workers;
use crate::KernelSet;

/// Errors unless `layout` stays inside a storage of `len` elements.
pub(crate) fn check_bounds(op: &'static str, layout: &Layout, len: usize) -> Result<()> {
    kiln_core::plan::check_span(op, layout, len)
}

fn gather_typed<T: Copy>(data: &[T], layout: &Layout) -> Vec<T> {
    match layout.contiguous_range() {
        Some(r) => data[r].to_vec(),
        None => {
            let mut out = Vec::with_capacity(layout.numel());
            layout.for_each_run(|o, len, stride| {
                if stride == 1 {
                    out.extend_from_slice(&data[o..o + len]);
                } else {
                    out.extend((0..len).map(|j| data[o + j * stride]));
                }
            });
            out
        }
    }
}

/// The elements of `src` in row-major order, in their own dtype.
pub(crate) fn gather(src: View<'_, HostData>) -> Result<HostData> {
    check_bounds("download", src.layout, src.storage.len())?;
    Ok(match src.storage {
        HostData::F32(d) => HostData::F32(gather_typed(d, src.layout)),
        HostData::F16(d) => HostData::F16(gather_typed(d, src.layout)),
        HostData::BF16(d) => HostData::BF16(gather_typed(d, src.layout)),
        HostData::U32(d) => HostData::U32(gather_typed(d, src.layout)),
    })
}

/// Elements below which a strided gather stays on the calling thread.
const GATHER_PARALLEL_MIN: usize = 1 << 16;

/// [`gather`], with a large strided f32 view (attention's head split and
/// merge) copied in slabs of its outer dimensions on `pool`'s threads.
pub(crate) fn gather_on(pool: &Workers, src: View<'_, HostData>) -> Result<HostData> {
    let l = src.layout;
    let data = match src.storage {
        HostData::F32(d)
            if pool.threads() > 1
                && l.rank() > 1
                && l.numel() >= GATHER_PARALLEL_MIN
                && l.contiguous_range().is_none() =>
        {
            d
        }
        _ => return gather(src),
    };
    check_bounds("download", l, data.len())?;
    // Outer dimensions enough for a few slabs per thread.
    let dims = l.dims();
    let (mut slabs, mut outer) = (1, 0);
    while outer + 1 < dims.len() && slabs < 4 * pool.threads() {
        slabs *= dims[outer];
        outer += 1;
    }
    let slab = l.numel() / slabs;
    // Each slab's view: outer indices in row-major order.
    let views = (0..slabs)
        .map(|mut rest| {
            let mut sub = l.clone();
            for d in (0..outer).rev() {
                sub = sub.narrow(d, rest % dims[d], 1)?;
                rest /= dims[d];
            }
            Ok(sub)
        })
        .collect::<Result<Vec<_>>>()?;
    let fill = |start: usize, part: &mut [std::mem::MaybeUninit<f32>]| {
        let mut at = 0;
        views[start / slab].for_each_run(|o, len, stride| {
            let dst = &mut part[at..at + len];
            if stride == 1 {
                crate::fresh::copy(dst, &data[o..o + len]);
            } else {
                for (j, v) in dst.iter_mut().enumerate() {
                    v.write(data[o + j * stride]);
                }
            }
            at += len;
        });
        assert_eq!(at, part.len(), "a slab's runs cover it");
    };
    // SAFETY: a slab's runs cover it (asserted before the chunk is taken
    // as written: a short cover panics, which `filled` resumes before it
    // would set the length).
    let out = unsafe { pool.filled(l.numel(), slab, fill) };
    Ok(HostData::F32(out))
}

/// The elements of a float operand as f32, row-major; borrowed when the
/// operand is contiguous f32.
pub(crate) fn read_f32<'a>(op: &'static str, v: View<'a, HostData>) -> Result<Cow<'a, [f32]>> {
    check_bounds(op, v.layout, v.storage.len())?;
    Ok(match v.storage {
        HostData::F32(d) => match v.layout.contiguous_range() {
            Some(r) => Cow::Borrowed(&d[r]),
            None => Cow::Owned(gather_typed(d, v.layout)),
        },
        HostData::F16(d) => Cow::Owned(widened(d, v.layout, f16::to_f32)),
        HostData::BF16(d) => Cow::Owned(widened(d, v.layout, bf16::to_f32)),
        HostData::U32(_) => return Err(unsupported(op, DType::U32)),
    })
}

/// The elements of a 16-bit float view widened to f32, row-major: one pass
/// over the slice a contiguous view covers (a loop the compiler
/// vectorises), or a walk over the offsets of a strided one.
fn widened<T: Copy>(d: &[T], layout: &Layout, widen: impl Fn(T) -> f32) -> Vec<f32> {
    if let Some(r) = layout.contiguous_range() {
        return d[r].iter().map(|&x| widen(x)).collect();
    }
    let mut out = Vec::with_capacity(layout.numel());
    layout.for_each_offset(|o| out.push(widen(d[o])));
    out
}

/// The elements of a u32 operand, row-major.
pub(crate) fn read_u32<'a>(op: &'static str, v: View<'a, HostData>) -> Result<Cow<'a, [u32]>> {
    check_bounds(op, v.layout, v.storage.len())?;
    match v.storage {
        HostData::U32(d) => Ok(match v.layout.contiguous_range() {
            Some(r) => Cow::Borrowed(&d[r]),
            None => Cow::Owned(gather_typed(d, v.layout)),
        }),
        other => Err(Error::DType {
            op,
            expected: DType::U32,
            got: other.dtype(),
        }),
    }
}

/// `Ok` if every index in `at` is below `len`, else `err` of the first
/// that is not. A max fold compiled for `set` (the baseline x86-64 has no
/// unsigned 32-bit max): pooling's backward passes check every argmax they
/// are given (692k a batch of the seed CNN), and a `find` loop over them
/// was 4 % of its epoch.
pub(crate) fn check_indices(
    set: KernelSet,
    at: &[u32],
    len: usize,
    err: impl FnOnce(u32) -> Error,
) -> Result<()> {
    let max = crate::vector::wide::max_u32(set, at);
    if at.is_empty() || (max as usize) < len {
        return Ok(());
    }
    let bad = at.iter().copied().find(|&a| a as usize >= len);
    Err(err(bad.unwrap_or(max)))
}

/// f32 results stored in `dtype`, rounded once (round-to-nearest-even).
pub(crate) fn store_f32(op: &'static str, dtype: DType, v: Vec<f32>) -> Result<HostData> {
    Ok(match dtype {
        DType::F32 => HostData::F32(v),
        DType::F16 => HostData::F16(v.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => HostData::BF16(v.into_iter().map(bf16::from_f32).collect()),
        DType::U32 => return Err(unsupported(op, DType::U32)),
    })
}

/// Elements from which an f32 fill is split over the team.
pub(crate) const FULL_PARALLEL_MIN: usize = 1 << 16;

/// `numel` copies of `value`, rounded to `dtype` (u32: truncated, saturating).
pub(crate) fn full(numel: usize, dtype: DType, value: f64) -> HostData {
    match dtype {
        DType::F32 => HostData::F32(vec![value as f32; numel]),
        DType::F16 => HostData::F16(vec![f16_from_f64(value); numel]),
        DType::BF16 => HostData::BF16(vec![bf16_from_f64(value); numel]),
        DType::U32 => HostData::U32(vec![value as u32; numel]),
    }
}

fn scatter_typed<T: Copy>(src: &[T], dst: &mut [T], layout: &Layout) {
    match layout.contiguous_range() {
        Some(r) => dst[r].copy_from_slice(src),
        None => {
            let mut i = 0;
            layout.for_each_run(|o, len, stride| {
                if stride == 1 {
                    dst[o..o + len].copy_from_slice(&src[i..i + len]);
                } else {
                    for j in 0..len {
                        dst[o + j * stride] = src[i + j];
                    }
                }
                i += len;
            });
        }
    }
}

/// `src` (through `src_layout`, in bounds) into `dst` through `dst_layout`:
/// straight from a contiguous source, through one gather otherwise.
fn copy_typed<T: Copy>(src: &[T], src_layout: &Layout, dst: &mut [T], dst_layout: &Layout) {
    match src_layout.contiguous_range() {
        Some(r) => scatter_typed(&src[r], dst, dst_layout),
        None => scatter_typed(&gather_typed(src, src_layout), dst, dst_layout),
    }
}

/// Copies `src` into `dst` through `dst_layout`.
pub(crate) fn copy_strided(
    src: View<'_, HostData>,
    dst: &mut HostData,
    dst_layout: &Layout,
) -> Result<()> {
    if src.layout.shape() != dst_layout.shape() {
        return Err(Error::shape(
            "copy_strided",
            format!(
                "source {} and destination {} differ",
                src.layout.shape(),
                dst_layout.shape()
            ),
        ));
    }
    check_bounds("copy_strided", dst_layout, dst.len())?;
    check_bounds("copy_strided", src.layout, src.storage.len())?;
    match (src.storage, dst) {
        (HostData::F32(s), HostData::F32(d)) => copy_typed(s, src.layout, d, dst_layout),
        (HostData::F16(s), HostData::F16(d)) => copy_typed(s, src.layout, d, dst_layout),
        (HostData::BF16(s), HostData::BF16(d)) => copy_typed(s, src.layout, d, dst_layout),
        (HostData::U32(s), HostData::U32(d)) => copy_typed(s, src.layout, d, dst_layout),
        (s, d) => {
            return Err(Error::DType {
                op: "copy_strided",
                expected: d.dtype(),
                got: s.dtype(),
            })
        }
    }
    Ok(())
}

/// Converts `src` to `dtype`: widening exact, narrowing round-to-nearest-even
/// (from the exact value, never through an intermediate rounding).
pub(crate) fn cast(src: View<'_, HostData>, dtype: DType) -> Result<HostData> {
    let values = gather(src)?;
    if values.dtype() == dtype {
        return Ok(values);
    }
    Ok(match (values, dtype) {
        // f32 holds every f16, bf16 and u32 ≤ 2²⁴ exactly; f64 holds every u32.
        (HostData::F32(v), DType::F16) => HostData::F16(v.into_iter().map(f16::from_f32).collect()),
        (HostData::F32(v), DType::BF16) => {
            HostData::BF16(v.into_iter().map(bf16::from_f32).collect())
        }
        (HostData::F32(v), DType::U32) => HostData::U32(v.into_iter().map(|x| x as u32).collect()),
        (HostData::U32(v), DType::F32) => HostData::F32(v.into_iter().map(|x| x as f32).collect()),
        (HostData::U32(v), DType::F16) => {
            HostData::F16(v.into_iter().map(|x| f16_from_f64(f64::from(x))).collect())
        }
        (HostData::U32(v), DType::BF16) => {
            HostData::BF16(v.into_iter().map(|x| bf16_from_f64(f64::from(x))).collect())
        }
        (other, dtype) => {
            let wide = other.to_f32_vec();
            match dtype {
                DType::F32 => HostData::F32(wide),
                DType::F16 => HostData::F16(wide.into_iter().map(f16::from_f32).collect()),
                DType::BF16 => HostData::BF16(wide.into_iter().map(bf16::from_f32).collect()),
                DType::U32 => HostData::U32(wide.into_iter().map(|x| x as u32).collect()),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Shape;

    #[test]
    fn indices_past_the_plane_are_refused_naming_the_first() {
        let err = |bad| Error::invalid(format!("argmax {bad}"));
        let set = KernelSet::best();
        assert!(check_indices(set, &[], 0, err).is_ok());
        assert!(check_indices(set, &[0, 5, 3], 6, err).is_ok());
        let e = check_indices(set, &[1, 9, 6, 12], 6, err).unwrap_err();
        assert!(e.to_string().contains("argmax 9"), "{e}");
        let e = check_indices(set, &[u32::MAX], 6, err).unwrap_err();
        assert!(e.to_string().contains(&u32::MAX.to_string()), "{e}");
    }

    #[test]
    fn a_gather_split_among_threads_matches_one_thread() {
        let pool = Workers::new(3).unwrap();
        // Attention's head split [n, t, 3, h, d] → [3, h, n, t, d] and merge,
        // a transpose, a slice with a broadcast row.
        let values: Vec<f32> = (0..12 * 64 * 3 * 4 * 32).map(|i| i as f32).collect();
        let data = HostData::F32(values);
        let full = |dims: &[usize]| Layout::contiguous(Shape::new(dims).unwrap());
        let layouts = [
            full(&[12, 64, 3, 4, 32]).permute(&[2, 3, 0, 1, 4]).unwrap(),
            full(&[4, 12, 64, 96]).permute(&[1, 2, 0, 3]).unwrap(),
            full(&[768, 384]).transpose(0, 1).unwrap(),
            full(&[3, 1, 100_000]).narrow(2, 7, 70_000).unwrap(),
            full(&[1, 294_912])
                .broadcast_as(&Shape::new(&[2, 294_912]).unwrap())
                .unwrap(),
        ];
        for layout in &layouts {
            let src = View::new(&data, layout);
            let want = gather(src).unwrap();
            assert_eq!(gather_on(&pool, src).unwrap(), want, "{layout:?}");
        }
        // Out of bounds is an error, not a panic.
        let too_far = full(&[1000, 1000]).transpose(0, 1).unwrap();
        assert!(gather_on(&pool, View::new(&data, &too_far)).is_err());
    }
}
