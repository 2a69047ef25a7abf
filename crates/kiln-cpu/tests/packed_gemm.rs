//! The packed GEMM of each SIMD kernel set on shapes the conformance suite's
//! small extents do not reach: crossing the KC and NC blocks, many row
//! blocks, transposed and f16 operands; and its independence of the thread
//! count.

use kiln_core::{Activation, Backend, DType, GemmEpilogue, HostData, Layout, Shape, View};
use kiln_cpu::{CpuBackend, KernelSet};

mod common;
use common::values;

fn sets() -> Vec<KernelSet> {
    KernelSet::ALL
        .into_iter()
        .filter(|k| *k != KernelSet::Scalar && k.available())
        .collect()
}

fn layout(d: &[usize]) -> Layout {
    Layout::contiguous(Shape::new(d).unwrap())
}

/// Runs `[1, m, k] · [1, k, n]` (b transposed in storage when `bt`) and
/// checks every element against an f64 dot product within γₖ·Σ|aᵢbᵢ|.
fn check(b: &CpuBackend, m: usize, k: usize, n: usize, bt: bool, dtype: DType) -> Vec<f32> {
    check_t(b, (m, k, n), (false, bt), dtype)
}

/// [`check`] with A too stored transposed (`[k, m]`, viewed as `[m, k]`)
/// when `at`.
fn check_t(
    b: &CpuBackend,
    (m, k, n): (usize, usize, usize),
    (at, bt): (bool, bool),
    dtype: DType,
) -> Vec<f32> {
    let av = values(m * k, 1);
    let bv = values(k * n, 2);
    let cast = |v: &[f32]| match dtype {
        DType::F16 => HostData::F16(v.iter().map(|&x| kiln_core::f16::from_f32(x)).collect()),
        DType::BF16 => HostData::BF16(v.iter().map(|&x| kiln_core::bf16::from_f32(x)).collect()),
        _ => HostData::F32(v.to_vec()),
    };
    let (ah, bh) = (cast(&av), cast(&bv));
    let (a64, b64) = (ah.to_f64_vec(), bh.to_f64_vec());
    let a = b.upload(&ah).unwrap();
    let bs = b.upload(&bh).unwrap();
    // B stored as [n, k] and viewed transposed, or stored as [k, n].
    let bl = if bt {
        layout(&[1, n, k]).transpose(1, 2).unwrap()
    } else {
        layout(&[1, k, n])
    };
    let b_at = |p: usize, j: usize| if bt { b64[j * k + p] } else { b64[p * n + j] };
    let a_at = |i: usize, p: usize| if at { a64[p * m + i] } else { a64[i * k + p] };
    let al = if at {
        layout(&[1, k, m]).transpose(1, 2).unwrap()
    } else {
        layout(&[1, m, k])
    };
    let out = b
        .gemm(
            View::new(&a, &al),
            View::new(&bs, &bl),
            &GemmEpilogue {
                activation: Activation::None,
                ..Default::default()
            },
        )
        .unwrap();
    let got = out.to_f32_vec();
    let u = 2f64.powi(-24);
    for i in 0..m {
        for j in 0..n {
            let (mut dot, mut mass) = (0f64, 0f64);
            for p in 0..k {
                let t = a_at(i, p) * b_at(p, j);
                dot += t;
                mass += t.abs();
            }
            let gamma = k as f64 * u / (1.0 - k as f64 * u);
            let store = match dtype {
                DType::F16 => dot.abs() * 2f64.powi(-11),
                DType::BF16 => dot.abs() * 2f64.powi(-8),
                _ => 0.0,
            };
            let err = (f64::from(got[i * n + j]) - dot).abs();
            assert!(err <= gamma * mass + store + 1e-30, "{}: [{m}×{k}]·[{k}×{n}] element ({i}, {j}): {} vs {dot}, error {err:e} > bound {:e}", b.name(), got[i * n + j], gamma * mass + store);
        }
    }
    got
}

#[test]
fn large_and_awkward_shapes_within_the_bound() {
    for set in sets() {
        let b = CpuBackend::with_kernels(set)
            .unwrap()
            .with_threads(2)
            .expect("worker threads");
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 300, 33),
            (200, 513, 70),
            (13, 257, 2100),
            (128, 784, 64),
            (784, 128, 64),
        ] {
            check(&b, m, k, n, false, DType::F32);
            check(&b, m, k, n, true, DType::F32);
        }
        check(&b, 37, 300, 45, true, DType::F16);
        // bf16 (AVX-512 BF16's pair instruction where the CPU has it): odd
        // k, k across the 512-element block, partial tiles, A and B each
        // stored transposed or not;
        // A read in place (even k, whole 12-row tiles) and packed (the rows
        // after them), the 16 × 16 tile of outputs 16 wide or less (over
        // several k blocks too), and row blocks of 96 over two threads.
        for &(m, k, n) in &[
            (1, 1, 1),
            (9, 3, 33),
            (17, 1025, 40),
            (64, 784, 64),
            (25, 64, 10),
            (33, 130, 16),
            (200, 1026, 17),
            (300, 784, 64),
            (40, 1030, 16),
            (40, 1030, 10),
        ] {
            for at in [false, true] {
                for bt in [false, true] {
                    check_t(&b, (m, k, n), (at, bt), DType::BF16);
                }
            }
        }
    }
}

/// The same bits on 1, 2 and 3 threads, whichever way the product is split:
/// one row's columns (1 × 128 × 300), f32 row blocks (300 × 600 × 90), all k blocks packed at once (the same
/// with 2 and 3 threads), panels of columns over few rows (128 × 300 × 700,
/// 60 × 70 × 1000: a wide layer's `dy·Wᵀ`, B stored transposed too; 150 ×
/// 400 × 64: two panels over several k blocks, A read in place); ten-wide
/// outputs split by rows (1000 × 64 × 10, 301 × 97 × 10); bf16 row blocks
/// sized by the thread count.
#[test]
fn results_do_not_depend_on_the_thread_count() {
    for set in sets() {
        let backend = |threads| {
            CpuBackend::with_kernels(set)
                .unwrap()
                .with_threads(threads)
                .expect("worker threads")
        };
        let teams = [backend(1), backend(2), backend(3)];
        for (m, k, n, bt, dtype) in [
            // One row split by columns: 128 + 128 + 44 on 3 threads.
            (1, 128, 300, false, DType::F32),
            (300, 600, 90, false, DType::F32),
            (128, 300, 700, false, DType::F32),
            (128, 300, 700, true, DType::F32),
            (60, 70, 1000, true, DType::F32),
            (150, 400, 64, false, DType::F32),
            // Few rows and several k blocks, split by k: 4 blocks over 2 or
            // 3 threads (the MLP's forward product; 2 with a Zen 4's KC
            // 512), 11 (6) with the partial sums added on the team, and 22
            // (11) — 11 blocks in row parts on 2 threads; 1100 deep in 5
            // (3) blocks, in row parts on 2 threads and on 3 (5 blocks).
            (128, 784, 64, false, DType::F32),
            (128, 2600, 64, false, DType::F32),
            (128, 5400, 64, false, DType::F32),
            (128, 784, 32, false, DType::F32),
            (128, 1100, 16, false, DType::F32),
            // Ten-wide outputs (the narrow path on AVX-512), split by rows:
            // an MLP head on a batch of 1,000, and rows not in whole tiles.
            (1000, 64, 10, false, DType::F32),
            (301, 97, 10, false, DType::F32),
            // bf16 (AVX-512 BF16's kernel where the CPU has it): row blocks
            // sized by the thread count, A read in place and packed.
            (128, 700, 200, false, DType::BF16),
            (301, 129, 40, true, DType::BF16),
            // The last k block too small to split: row blocks change size
            // between k blocks (and the 16 × 16 tile).
            (128, 514, 64, false, DType::BF16),
            (160, 1030, 16, false, DType::BF16),
        ] {
            let runs: Vec<Vec<f32>> = teams.iter().map(|b| check(b, m, k, n, bt, dtype)).collect();
            assert!(
                runs[0] == runs[1] && runs[1] == runs[2],
                "{set:?}, {m}×{k}×{n}: results differ with the thread count"
            );
        }
    }
}

#[test]
fn forcing_a_missing_kernel_set_is_a_clear_error() {
    #[cfg(target_arch = "x86_64")]
    let missing = KernelSet::Neon;
    #[cfg(target_arch = "aarch64")]
    let missing = KernelSet::Avx512;
    let e = CpuBackend::with_kernels(missing).unwrap_err().to_string();
    assert!(e.contains("needs") && e.contains(missing.name()), "{e}");
}

/// A few rows of A (decoding a token) skip packing and read B's rows in
/// place; they must give the packed driver's bits: the first rows of a
/// product with more rows, across the KC block, narrow and wide, and a
/// transposed B (which stays on the packed path). Widths cross the path's
/// register blocks (128 and 64 columns: 320; then a narrower tail: 65,
/// 200), and one row of a wide enough product is split by columns over
/// the two threads (parts of 192 and 108 columns at n = 300).
#[test]
fn few_row_products_give_the_packed_bits() {
    for set in sets() {
        let b = CpuBackend::with_kernels(set)
            .unwrap()
            .with_threads(2)
            .expect("worker threads");
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 128, 384),
            (1, 128, 65),
            (1, 64, 128),
            (2, 40, 200),
            (1, 513, 300),
            (4, 130, 320),
            (3, 300, 33),
            (4, 513, 70),
            (2, 64, 5),
        ] {
            for bt in [false, true] {
                let few = check(&b, m, k, n, bt, DType::F32);
                let many = check(&b, 12, k, n, bt, DType::F32);
                // `check` draws A from one stream: the first m rows are shared.
                assert_eq!(
                    few[..],
                    many[..m * n],
                    "{set:?} [{m}×{k}]·[{k}×{n}] bt={bt}"
                );
            }
        }
    }
}

/// Outputs 1–16 columns wide (a classifier's head: the narrow path for
/// widths 1, 2, 4, 8, 9, 10 and 12, the packed driver for the others):
/// within the bound, and bit-identical to the packed driver, which a B
/// stored transposed always takes. Row counts with and without a partial
/// 8-row tile, k across the KC block, A transposed (a weight gradient's
/// `hᵀ·dy`) and B a column slice of a wider matrix (rows not `n` apart);
/// 300 × 600 rows are split over two threads.
#[test]
fn narrow_outputs_match_the_oracle_and_the_packed_bits() {
    let oracle = |a: &[f32], b: &[f32], m: usize, k: usize, n: usize| -> Vec<(f64, f64)> {
        let mut out = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let (mut dot, mut mass) = (0f64, 0f64);
                for p in 0..k {
                    let t = f64::from(a[i * k + p]) * f64::from(b[p * n + j]);
                    dot += t;
                    mass += t.abs();
                }
                out.push((dot, mass));
            }
        }
        out
    };
    for set in sets() {
        let be = CpuBackend::with_kernels(set)
            .unwrap()
            .with_threads(2)
            .expect("worker threads");
        for &(m, k) in &[(8, 1), (13, 64), (69, 300), (300, 600)] {
            for n in 1..=16 {
                let (av, bv) = (values(m * k, 3), values(k * n, 4));
                let expect = oracle(&av, &bv, m, k, n);
                // A row-major, and the same A stored [k, m] and viewed transposed.
                let a_rows = be.upload(&HostData::F32(av.clone())).unwrap();
                let at: Vec<f32> = (0..k * m).map(|x| av[(x % m) * k + x / m]).collect();
                let a_cols = be.upload(&HostData::F32(at)).unwrap();
                let a_views = [
                    (&a_rows, layout(&[1, m, k])),
                    (&a_cols, layout(&[1, k, m]).transpose(1, 2).unwrap()),
                ];
                // B row-major; columns 3..3+n of a [k, n + 5] matrix; and
                // stored [n, k], viewed transposed (the packed driver).
                let b_rows = be.upload(&HostData::F32(bv.clone())).unwrap();
                let wide: Vec<f32> = (0..k * (n + 5))
                    .map(|x| {
                        let (p, j) = (x / (n + 5), x % (n + 5));
                        if (3..3 + n).contains(&j) {
                            bv[p * n + j - 3]
                        } else {
                            f32::NAN
                        }
                    })
                    .collect();
                let b_wide = be.upload(&HostData::F32(wide)).unwrap();
                let bt: Vec<f32> = (0..n * k).map(|x| bv[(x % k) * n + x / k]).collect();
                let b_t = be.upload(&HostData::F32(bt)).unwrap();
                let b_views = [
                    (&b_rows, layout(&[1, k, n])),
                    (&b_wide, layout(&[1, k, n + 5]).narrow(2, 3, n).unwrap()),
                    (&b_t, layout(&[1, n, k]).transpose(1, 2).unwrap()),
                ];
                let mut results = Vec::new();
                for (a, la) in &a_views {
                    for (b, lb) in &b_views {
                        let got = be
                            .gemm(View::new(a, la), View::new(b, lb), &GemmEpilogue::default())
                            .unwrap()
                            .to_f32_vec();
                        let u = 2f64.powi(-24);
                        let gamma = k as f64 * u / (1.0 - k as f64 * u);
                        for (e, (&g, &(dot, mass))) in got.iter().zip(&expect).enumerate() {
                            let err = (f64::from(g) - dot).abs();
                            assert!(
                                err <= gamma * mass + 1e-30,
                                "{set:?} [{m}×{k}]·[{k}×{n}] element {e}: {g} vs {dot}"
                            );
                        }
                        results.push(got);
                    }
                }
                assert!(
                    results.windows(2).all(|w| w[0] == w[1]),
                    "{set:?} [{m}×{k}]·[{k}×{n}]: the layouts give different bits"
                );
            }
        }
    }
}

/// A bf16 product with nothing after it is rounded to bf16 by the GEMM's
/// own tasks, each row tile while it is in cache; it must give the bits of
/// the separate rounding pass an epilogue takes (here a bias of zeros):
/// wide (AMX or `vdpbf16ps`) and narrow tiles, edge tiles, two k blocks
/// (k = 1030), a batch of two, 1 and 2 threads.
#[test]
fn bf16_results_rounded_in_the_gemm_give_the_separate_pass_bits() {
    let bf = |v: Vec<f32>| HostData::BF16(v.into_iter().map(kiln_core::bf16::from_f32).collect());
    for set in sets() {
        for threads in [1, 2] {
            let b = CpuBackend::with_kernels(set)
                .unwrap()
                .with_threads(threads)
                .expect("worker threads");
            for (batch, m, k, n) in [
                (1, 96, 128, 384),
                (1, 37, 1030, 70),
                (2, 40, 64, 16),
                (1, 300, 130, 9),
                (2, 64, 256, 96),
            ] {
                let (a, w) = (bf(values(batch * m * k, 5)), bf(values(batch * k * n, 6)));
                let zeros = bf(vec![0.0; n]);
                let (la, lw, lz) = (layout(&[batch, m, k]), layout(&[batch, k, n]), layout(&[n]));
                let run = |bias: Option<View<'_, HostData>>| {
                    let ep = GemmEpilogue {
                        bias,
                        ..Default::default()
                    };
                    b.gemm(View::new(&a, &la), View::new(&w, &lw), &ep)
                        .unwrap()
                        .to_f32_vec()
                };
                let (fused, pass) = (run(None), run(Some(View::new(&zeros, &lz))));
                assert!(
                    fused.iter().map(|x| x.to_bits()).eq(pass.iter().map(|x| x.to_bits())),
                    "{set:?}, {threads} threads, {batch}×[{m}×{k}]·[{k}×{n}]: the fused rounding differs"
                );
            }
        }
    }
}
