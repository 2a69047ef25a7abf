//! Fused attention's paths that must give the same bits as each other:
//!
//! - It reads each problem in place where its rows are contiguous, however
//!   far apart the problems lie: a decoding step's keys and values narrowed
//!   from a cache's `[heads, capacity, D]` buffer, one query per head taken
//!   from a wider row. Those views must give the bits of the same values
//!   copied row-major, forward and backward; views whose rows are not
//!   contiguous (several queries from a wider row) still read correctly.
//! - It runs its queries in register blocks of 4 rows; a block's lone last
//!   row (a decoding step's query, the 65th of 65) runs alone and must give
//!   the bits the block would have given it. Causal row `i` sees keys
//!   `0..=i` only, so the first `T` rows of a longer problem over the same
//!   values are the `T`-row problem's rows: the output and `dq` (row `i` of
//!   `dq` depends on row `i` of `dy` and the keys it sees).
//!
//! - Heads side by side in each row (`AttentionOptions::with_heads`, the
//!   thirds of a fused `[n, T, 3·heads·D]` projection) are read and
//!   written in place and must give the bits of the same problems with
//!   their heads folded into the batch by copies
//!   (`kiln_core::attention::heads_folded`), dropout included (the
//!   problems are numbered alike).
//!
//! All on every kernel set, on 1 and 2 threads. And a digest of the
//! bits of two problems, pinned on the x86 SIMD sets, so that a change
//! that claims to keep attention's bits is held to it.

use kiln_core::{AttentionOptions, Backend, HostData, Layout, Result, Shape, View};
use kiln_cpu::{CpuBackend, KernelSet};

mod common;
use common::values;

/// A backend for every kernel set this machine has, on 1 and 2 threads.
fn backends() -> Result<Vec<(KernelSet, usize, CpuBackend)>> {
    let mut out = Vec::new();
    for set in KernelSet::ALL
        .into_iter()
        .filter(|s| s.check_available().is_ok())
    {
        for threads in [1, 2] {
            out.push((
                set,
                threads,
                CpuBackend::with_kernels(set)?.with_threads(threads)?,
            ));
        }
    }
    Ok(out)
}

fn contiguous(dims: &[usize]) -> Layout {
    Layout::contiguous(Shape::new(dims).unwrap())
}

/// The forward output and `dq`, `dk`, `dv`, as f32.
fn run(
    b: &CpuBackend,
    ops: [(&HostData, &Layout); 4],
    options: &AttentionOptions,
) -> Result<[Vec<f32>; 4]> {
    let [q, k, v, dy] = ops.map(|(s, l)| View::new(s, l));
    let f32s = |h: HostData| {
        h.to_f64_vec()
            .into_iter()
            .map(|x| x as f32)
            .collect::<Vec<f32>>()
    };
    let y = b.attention_causal(q, k, v, options)?;
    let g = b.attention_causal_backward(q, k, v, dy, options)?;
    Ok([f32s(y), f32s(g.dq), f32s(g.dk), f32s(g.dv)])
}

/// Whether two runs' values are the same bits.
fn same_bits(x: &[f32], y: &[f32]) -> bool {
    x.iter()
        .map(|v| v.to_bits())
        .eq(y.iter().map(|v| v.to_bits()))
}

/// A view's elements copied row-major, with their contiguous layout.
fn packed(data: &[f32], layout: &Layout) -> (HostData, Layout) {
    let out: Vec<f32> = layout.offsets().into_iter().map(|o| data[o]).collect();
    (HostData::F32(out), contiguous(layout.dims()))
}

#[test]
fn cache_views_give_the_bits_of_their_copies() -> Result<()> {
    for (set, threads, b) in backends()? {
        // (problems, queries, keys, cache capacity, head width)
        for (n, t, s, cap, d) in [
            (4, 1, 5, 8, 32),
            (3, 1, 17, 64, 33),
            (2, 3, 20, 24, 16),
            (1, 70, 70, 80, 8),
            (5, 1, 1, 4, 17),
        ] {
            // Keys and values: positions 2..2 + s of a cache.
            let kbuf = values(n * cap * d, 1);
            let vbuf = values(n * cap * d, 2);
            let kv = contiguous(&[n, cap, d]).narrow(1, 2, s)?;
            // Queries: the middle third of each position's [q | k | v] row.
            let qbuf = values(n * t * 3 * d, 3);
            let ql = contiguous(&[n, t, 3 * d]).narrow(2, d, d)?;
            let dyv = HostData::F32(values(n * t * d, 4));
            let dyl = contiguous(&[n, t, d]);
            let (kh, vh, qh) = (
                HostData::F32(kbuf.clone()),
                HostData::F32(vbuf.clone()),
                HostData::F32(qbuf.clone()),
            );
            let options = AttentionOptions::new(1.0 / (d as f32).sqrt());
            let viewed = run(
                &b,
                [(&qh, &ql), (&kh, &kv), (&vh, &kv), (&dyv, &dyl)],
                &options,
            )?;
            let (qc, qcl) = packed(&qbuf, &ql);
            let (kc, kcl) = packed(&kbuf, &kv);
            let (vc, vcl) = packed(&vbuf, &kv);
            let copied = run(
                &b,
                [(&qc, &qcl), (&kc, &kcl), (&vc, &vcl), (&dyv, &dyl)],
                &options,
            )?;
            for (what, (x, y)) in ["y", "dq", "dk", "dv"]
                .iter()
                .zip(viewed.iter().zip(&copied))
            {
                assert!(
                    same_bits(x, y),
                    "{set:?}, {threads} threads, {:?}: {what} of the views differs from the copies'",
                    (n, t, s, cap, d)
                );
            }
        }
    }
    Ok(())
}

#[test]
fn heads_read_in_place_give_the_bits_of_heads_folded_into_the_batch() -> Result<()> {
    use kiln_core::attention::{heads_folded, heads_unfolded};
    use kiln_core::AttentionDropout;
    for (set, threads, b) in backends()? {
        // (examples, queries, keys, heads, head width)
        for (n, t, s, h, d) in [
            (3, 64, 64, 4, 32),
            (2, 5, 9, 3, 17),
            (1, 70, 70, 2, 16),
            (2, 1, 6, 4, 8),
        ] {
            let w = h * d;
            // q, k, v: thirds of fused [n, rows, 3·h·D] projections.
            let qbuf = HostData::F32(values(n * t * 3 * w, 1));
            let kvbuf = HostData::F32(values(n * s * 3 * w, 2));
            let ql = contiguous(&[n, t, 3 * w]).narrow(2, 0, w)?;
            let kl = contiguous(&[n, s, 3 * w]).narrow(2, w, w)?;
            let vl = contiguous(&[n, s, 3 * w]).narrow(2, 2 * w, w)?;
            let dyv = HostData::F32(values(n * t * w, 4));
            let dyl = contiguous(&[n, t, w]);
            for dropout in [None, Some(AttentionDropout::new(0.25, 7, 3)?)] {
                let mut options = AttentionOptions::new(0.2).with_heads(h);
                options.dropout = dropout;
                let in_place = run(
                    &b,
                    [(&qbuf, &ql), (&kvbuf, &kl), (&kvbuf, &vl), (&dyv, &dyl)],
                    &options,
                )?;
                // The same problems, each head's rows copied out first.
                let [fq, fk, fv, fdy] = [(&qbuf, &ql), (&kvbuf, &kl), (&kvbuf, &vl), (&dyv, &dyl)]
                    .map(|(x, l)| heads_folded(&b, View::new(x, l), h));
                let (fq, fk, fv, fdy) = (fq?, fk?, fv?, fdy?);
                let (lq, lk) = (contiguous(&[n * h, t, d]), contiguous(&[n * h, s, d]));
                let one = AttentionOptions {
                    heads: 1,
                    ..options
                };
                let [y, dq, dk, dv] = [(&fq, &lq), (&fk, &lk), (&fv, &lk), (&fdy, &lq)];
                let (fy, fg) = {
                    let [q, k, v, dy] = [y, dq, dk, dv].map(|(x, l)| View::new(x, l));
                    (
                        b.attention_causal(q, k, v, &one)?,
                        b.attention_causal_backward(q, k, v, dy, &one)?,
                    )
                };
                let unfold = |x: &HostData, rows: usize| -> Result<Vec<f32>> {
                    let u = heads_unfolded(&b, x, [n, h, rows, d])?;
                    Ok(u.to_f64_vec().into_iter().map(|x| x as f32).collect())
                };
                let folded = [
                    unfold(&fy, t)?,
                    unfold(&fg.dq, t)?,
                    unfold(&fg.dk, s)?,
                    unfold(&fg.dv, s)?,
                ];
                for (what, (x, y)) in ["y", "dq", "dk", "dv"]
                    .iter()
                    .zip(in_place.iter().zip(&folded))
                {
                    assert!(
                        same_bits(x, y),
                        "{set:?}, {threads} threads, {:?}, dropout {}: {what} of the heads in place differs from the folded heads'",
                        (n, t, s, h, d),
                        dropout.is_some()
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn a_lone_row_gives_the_blocks_bits() -> Result<()> {
    for (set, threads, b) in backends()? {
        // (rows with a lone last one, a longer problem, head width)
        for (t, long, d) in [(5, 8, 16), (9, 12, 33), (65, 68, 8), (13, 16, 1)] {
            let all = [1, 2, 3, 4].map(|seed| values(long * d, seed));
            // The first `rows` rows of every operand, row-major.
            let first = |rows: usize| -> Result<[Vec<f32>; 4]> {
                let layout = contiguous(&[1, rows, d]);
                let [q, k, v, dy] = all
                    .each_ref()
                    .map(|x| HostData::F32(x[..rows * d].to_vec()));
                let options = AttentionOptions::new(1.0 / (d as f32).sqrt());
                run(
                    &b,
                    [(&q, &layout), (&k, &layout), (&v, &layout), (&dy, &layout)],
                    &options,
                )
            };
            let (short, full) = (first(t)?, first(long)?);
            for (what, i) in [("y", 0), ("dq", 1)] {
                assert!(
                    same_bits(&short[i], &full[i][..t * d]),
                    "{set:?}, {threads} threads, T = {t} against {long}, D = {d}: {what} differs"
                );
            }
        }
    }
    Ok(())
}

/// A NaN key makes every query that sees it NaN and leaves the queries
/// before it as they were: the softmax's rows are worked on in whole
/// vectors, padded past the keys each query sees, and their maximum skips
/// NaN (the NaN reaches the sum instead), so a NaN must still spread to
/// exactly the rows it is in — forward and backward, at a key inside a
/// vector, at one that ends a vector and at the last key.
#[test]
fn a_nan_key_spreads_to_exactly_the_queries_that_see_it() -> Result<()> {
    for (set, threads, b) in backends()? {
        for (t, d, nan_key) in [(40, 8, 21), (40, 8, 15), (40, 8, 39), (70, 16, 64)] {
            let layout = contiguous(&[1, t, d]);
            let [q, mut k, v, dy] = [1, 2, 3, 4].map(|seed| values(t * d, seed));
            let run_with = |k: &[f32]| {
                let [q, k, v, dy] = [&q[..], k, &v, &dy].map(|x| HostData::F32(x.to_vec()));
                let options = AttentionOptions::new(0.5);
                run(
                    &b,
                    [(&q, &layout), (&k, &layout), (&v, &layout), (&dy, &layout)],
                    &options,
                )
            };
            let clean = run_with(&k)?;
            k[nan_key * d + d / 2] = f32::NAN;
            let [y, dq, _, _] = run_with(&k)?;
            for (what, got, want) in [("y", &y, &clean[0]), ("dq", &dq, &clean[1])] {
                for i in 0..t {
                    let row = &got[i * d..(i + 1) * d];
                    if i < nan_key {
                        assert!(
                            same_bits(row, &want[i * d..(i + 1) * d]),
                            "{set:?}, {threads} threads, T = {t}: {what} row {i} changed by NaN key {nan_key}"
                        );
                    } else {
                        assert!(
                            row.iter().all(|x| x.is_nan()),
                            "{set:?}, {threads} threads, T = {t}: {what} row {i} sees NaN key {nan_key}: {row:?}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// FNV-1a over the bits of `runs`' values, in order.
fn digest(runs: &[Vec<f32>]) -> u64 {
    runs.iter()
        .flatten()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, byte| {
            (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The forward output and the three gradients of two problems whose rows
/// cross the kernels' 4-row blocks and 16-key vectors (3 heads of 37 × 24;
/// one of 70 × 64 with a scale of 1/8), on the x86 SIMD sets, against a
/// digest pinned when it was last changed on purpose: a refactoring that
/// claims to keep attention's bits must keep it (on 1 thread and on 2).
/// AVX2 and AVX-512 give the same bits (both run rows in 16-float vectors
/// with the same exponential). The scalar set calls the C library's `expf`
/// and other processors have other kernels: those only check that 1 and 2
/// threads agree.
#[test]
fn attentions_bits_are_pinned() -> Result<()> {
    const PINNED: u64 = 0x8a70_0e7b_e590_9559;
    let mut seen = std::collections::BTreeMap::new();
    for (set, threads, b) in backends()? {
        let mut runs = Vec::new();
        for (heads, t, d, scale, seed) in [(3, 37, 24, 0.3, 11), (1, 70, 64, 0.125, 12)] {
            let layout = contiguous(&[heads, t, d]);
            let [q, k, v, dy] =
                [0, 1, 2, 3].map(|i| HostData::F32(values(heads * t * d, seed * 10 + i)));
            let options = AttentionOptions::new(scale);
            runs.extend(run(
                &b,
                [(&q, &layout), (&k, &layout), (&v, &layout), (&dy, &layout)],
                &options,
            )?);
        }
        let got = digest(&runs);
        if let Some(&(first_threads, first)) = seen.get(&set.name()) {
            assert_eq!(
                got, first,
                "{set:?}: {threads} threads gave other bits than {first_threads}"
            );
        }
        seen.insert(set.name(), (threads, got));
        if matches!(set, KernelSet::Avx2 | KernelSet::Avx512) {
            assert_eq!(
                got, PINNED,
                "{set:?}: attention's bits changed (digest {got:#018x}, pinned {PINNED:#018x}); \
                 if on purpose, say why in the commit and pin the new digest"
            );
        }
    }
    Ok(())
}

/// The gradient of a tensor whose slices are used (attention's query, key
/// and value: thirds of one projection): slices that do not overlap are
/// copied into their windows, overlapping ones and whole uses still add.
#[test]
fn slices_gradients_are_placed_or_added_as_their_windows_overlap() -> Result<()> {
    use kiln_core::{Tensor, Var};
    let b = CpuBackend::new()?;
    let (rows, cols) = (3, 12);
    let x = Var::from_tensor(&Tensor::from_slice(
        &values(rows * cols, 1),
        &[rows, cols],
        &b,
    )?)?;
    // (start, len) of each slice of the last axis, and whether x is also
    // used whole.
    let cases: [(&[(usize, usize)], bool); 4] = [
        (&[(0, 4), (4, 4), (8, 4)], false),
        (&[(8, 4), (0, 4)], false),
        (&[(0, 4), (2, 4), (8, 4)], false),
        (&[(0, 4), (4, 4)], true),
    ];
    for (case, (slices, whole)) in cases.into_iter().enumerate() {
        let mut want = vec![0f32; rows * cols];
        let mut loss: Option<Tensor<CpuBackend>> = None;
        let mut add = |t: Tensor<CpuBackend>| -> Result<()> {
            loss = Some(match loss.take() {
                Some(l) => l.add(&t)?,
                None => t,
            });
            Ok(())
        };
        for (i, &(start, len)) in slices.iter().enumerate() {
            let r = values(rows * len, 10 + i as u64);
            let part = x.as_tensor().narrow(1, start, len)?;
            add(part
                .mul(&Tensor::from_slice(&r, &[rows, len], &b)?)?
                .sum_all()?)?;
            for row in 0..rows {
                for j in 0..len {
                    want[row * cols + start + j] += r[row * len + j];
                }
            }
        }
        if whole {
            let r = values(rows * cols, 20);
            add(x
                .as_tensor()
                .mul(&Tensor::from_slice(&r, &[rows, cols], &b)?)?
                .sum_all()?)?;
            for (w, r) in want.iter_mut().zip(&r) {
                *w += r;
            }
        }
        let grads = loss.expect("a loss").backward()?;
        let got = grads.get_id(x.id()).expect("x's gradient").to_vec_f32()?;
        for (at, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "case {case}: element {at}: gradient {g}, expected {w}"
            );
        }
    }
    Ok(())
}

/// Heads that do not divide the operands' last axis — none, too many, or
/// more than can be counted over a last axis of 0 — are refused with an
/// error naming the op, on every kernel set.
#[test]
fn heads_that_do_not_divide_the_rows_are_refused() -> Result<()> {
    for (set, threads, b) in backends()? {
        for (width, heads) in [(4, 0), (4, 3), (4, 8), (0, usize::MAX)] {
            let data = HostData::F32(values(2 * 3 * width, 1));
            let l = contiguous(&[2, 3, width]);
            let x = View::new(&data, &l);
            let options = AttentionOptions::new(0.5).with_heads(heads);
            let e = b
                .attention_causal(x, x, x, &options)
                .expect_err("heads that do not divide the last axis");
            assert!(
                e.to_string().contains("attention_causal") && e.to_string().contains("heads"),
                "{set:?}, {threads} threads, width {width}, {heads} heads: {e}"
            );
        }
    }
    Ok(())
}
