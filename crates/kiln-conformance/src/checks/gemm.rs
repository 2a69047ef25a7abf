//! GEMM: `C := act(α·A·B + β·C₀ + bias)`, batched, any strides.
//!
//! Bound per element: the dot product within γₖ·Σ|aᵢbᵢ| (f32 accumulation,
//! u = 2⁻²⁴, whatever the storage type), carried through the epilogue: α
//! scales it, each of the three epilogue additions adds a rounding, and the
//! activation multiplies it by its Lipschitz constant and adds its own few
//! ulps. For bf16, whose fast CPU and GPU paths (AVX-512 BF16's
//! `vdpbf16ps`, tensor cores) flush subnormal intermediate sums, each of
//! the k steps may also lose up to 2⁻¹²⁶.

use kiln_core::{bounds, Activation, Backend, DType, GemmEpilogue, View};
use proptest::prelude::*;

use super::fetch_all;
use crate::values::{contiguous, extent, operand, value, Domain, Operand};
use crate::{compare, run_cases, Config, Report, Sizer, Tier};

#[derive(Debug, Clone)]
struct Case {
    a: Operand,
    b: Operand,
    alpha: f64,
    c0: Option<(f64, Operand)>,
    bias: Option<Operand>,
    activation: Activation,
}

/// Multiply-adds per blocked-tier case, at most.
const BLOCKED_WORK: usize = 16_000_000;

/// `(batch, m, k, n)` for a tier. Blocked cases come in four families, so
/// that every kind of boundary is crossed in a dozen cases: whole tiles with
/// a short k (where an error of 1e-3 stands out of the bound), k across one
/// and two `KC` blocks, wide n across `NC`, and tall m across row blocks —
/// all at the backend's switch points ± 1, within [`BLOCKED_WORK`].
fn dims(z: &Sizer) -> BoxedStrategy<(usize, usize, usize, usize)> {
    let p = &z.points;
    match z.tier {
        Tier::Edge => (1usize..=3, extent(40), extent(40), extent(40)).boxed(),
        Tier::Blocked => {
            let m = Sizer::near(&p.gemm_m, &[1, 2, 64]);
            let n = Sizer::near(&p.gemm_n, &[1, 64]);
            let k = Sizer::near(
                &p.gemm_k,
                &[1, 2, 2 * p.gemm_k.iter().max().copied().unwrap_or(256) + 1],
            );
            let fits = |m: usize, k: usize, n: usize| m * k * n <= BLOCKED_WORK;
            let combos = |ms: &[usize], ks: &[usize], ns: &[usize]| -> Vec<(usize, usize, usize)> {
                let mut v = Vec::new();
                for &mm in ms {
                    for &kk in ks {
                        for &nn in ns {
                            if fits(mm, kk, nn) {
                                v.push((mm, kk, nn));
                            }
                        }
                    }
                }
                v
            };
            let big =
                |v: &[usize], lo: usize| v.iter().copied().filter(|&d| d >= lo).collect::<Vec<_>>();
            let small =
                |v: &[usize], hi: usize| v.iter().copied().filter(|&d| d <= hi).collect::<Vec<_>>();
            let families = [
                // Whole tiles, short k.
                combos(&big(&m, 63), &small(&k, 17), &big(&n, 63)),
                // k across the k blocks.
                combos(&small(&m, 130), &big(&k, 200), &small(&n, 130)),
                // n across the column blocks.
                combos(&small(&m, 9), &small(&k, 33), &big(&n, 100)),
                // m across the row blocks.
                combos(&big(&m, 100), &small(&k, 65), &small(&n, 65)),
            ];
            let families: Vec<BoxedStrategy<(usize, usize, usize)>> = families
                .into_iter()
                .filter(|f| !f.is_empty())
                .map(|f| prop::sample::select(f).boxed())
                .collect();
            (1usize..=2, prop::strategy::Union::new(families))
                .prop_map(|(batch, (m, k, n))| {
                    // A second batch only where it stays within the budget.
                    let batch = if batch * m * k * n <= BLOCKED_WORK {
                        batch
                    } else {
                        1
                    };
                    (batch, m, k, n)
                })
                .boxed()
        }
        Tier::Large => prop_oneof![
            // Long dot products: the accumulated error of k ≥ 4096.
            (1024usize..=2048, 4096usize..=4100, 1usize..=3).prop_map(|(m, k, n)| (1, m, k, n)),
            (1usize..=3, 4096usize..=4100, 1024usize..=2048).prop_map(|(m, k, n)| (1, m, k, n)),
            // Large outputs: every block boundary at once.
            (1024usize..=1030, 1024usize..=1030, 1024usize..=1030)
                .prop_map(|(m, k, n)| (1, m, k, n)),
        ]
        .boxed(),
    }
}

fn strategy(z: &Sizer, dtype: DType, epilogue: bool) -> BoxedStrategy<Case> {
    dims(z)
        .prop_flat_map(move |(batch, m, k, n)| {
            let a = operand(dtype, vec![batch, m, k], Domain::General, true);
            let b = operand(dtype, vec![batch, k, n], Domain::General, true);
            let alpha = if epilogue {
                value(Domain::Moderate(2.0), DType::F32)
            } else {
                Just(1.0).boxed()
            };
            let c0 = if epilogue {
                prop::option::of((
                    value(Domain::Moderate(2.0), DType::F32),
                    contiguous(dtype, vec![batch, m, n], Domain::Moderate(4.0)),
                ))
                .boxed()
            } else {
                Just(None).boxed()
            };
            let bias = if epilogue {
                prop::option::of(contiguous(dtype, vec![n], Domain::Moderate(4.0))).boxed()
            } else {
                Just(None).boxed()
            };
            let act = if epilogue {
                prop::sample::select(vec![
                    Activation::None,
                    Activation::Relu,
                    Activation::Sigmoid,
                    Activation::Tanh,
                ])
                .boxed()
            } else {
                Just(Activation::None).boxed()
            };
            (a, b, alpha, c0, bias, act).prop_map(|(a, b, alpha, c0, bias, activation)| Case {
                a,
                b,
                alpha,
                c0,
                bias,
                activation,
            })
        })
        .boxed()
}

fn activate(act: Activation, x: f64) -> f64 {
    act.as_unary().map_or(x, |u| u.eval_f64(x))
}

pub(crate) fn gemm<B: Backend>(backend: &B, dtype: DType, cfg: &Config, epilogue: bool) -> Report {
    let name = if epilogue { "gemm_epilogue" } else { "gemm" };
    run_cases(
        name,
        dtype,
        cfg,
        |z| strategy(z, dtype, epilogue),
        |c| {
            let (ad, bd) = (c.a.dims().to_vec(), c.b.dims().to_vec());
            let (batch, m, k, n) = (ad[0], ad[1], ad[2], bd[2]);
            let (sa, sb) = (c.a.upload(backend)?, c.b.upload(backend)?);
            let c0s = c.c0.as_ref().map(|(_, o)| o.upload(backend)).transpose()?;
            let bs = c.bias.as_ref().map(|o| o.upload(backend)).transpose()?;
            let ep = GemmEpilogue {
                alpha: c.alpha as f32,
                beta_c: c
                    .c0
                    .as_ref()
                    .zip(c0s.as_ref())
                    .map(|((beta, o), s)| (*beta as f32, View::new(s, &o.layout))),
                bias: c
                    .bias
                    .as_ref()
                    .zip(bs.as_ref())
                    .map(|(o, s)| View::new(s, &o.layout)),
                activation: c.activation,
            };
            let out = backend.gemm(
                View::new(&sa, &c.a.layout),
                View::new(&sb, &c.b.layout),
                &ep,
            )?;
            let got = fetch_all(backend, &out, &[batch, m, n])?;

            let (av, bv) = (c.a.logical(), c.b.logical());
            let c0v = c.c0.as_ref().map(|(beta, o)| (*beta, o.logical()));
            let biasv = c.bias.as_ref().map(|o| o.logical());
            // B transposed, so the oracle's dot products read both rows in order.
            let mut bt = vec![0f64; bv.len()];
            for p in 0..batch {
                for kk in 0..k {
                    for j in 0..n {
                        bt[(p * n + j) * k + kk] = bv[(p * k + kk) * n + j];
                    }
                }
            }
            let mut want = Vec::with_capacity(batch * m * n);
            for p in 0..batch {
                for i in 0..m {
                    let arow = &av[(p * m + i) * k..(p * m + i + 1) * k];
                    for j in 0..n {
                        let brow = &bt[(p * n + j) * k..(p * n + j + 1) * k];
                        let (mut dot, mut mass) = (0f64, 0f64);
                        for (&x, &y) in arow.iter().zip(brow) {
                            let prod = x * y;
                            dot += prod;
                            mass += prod.abs();
                        }
                        let mut pre = c.alpha * dot;
                        let mut err =
                            c.alpha.abs() * (bounds::dot(k, mass) + bounds::flush(dtype, k));
                        let mut terms = (c.alpha * dot).abs();
                        if let Some((beta, c0)) = &c0v {
                            let t = beta * c0[(p * m + i) * n + j];
                            pre += t;
                            terms += t.abs();
                        }
                        if let Some(bias) = &biasv {
                            pre += bias[j];
                            terms += bias[j].abs();
                        }
                        if epilogue {
                            err = bounds::epilogue(3, terms, err);
                        }
                        let y = activate(c.activation, pre);
                        want.push((y, bounds::activated(c.activation, y, err, mass, k)));
                    }
                }
            }
            compare(name, dtype, &[batch, m, n], &got, &want)
        },
    )
}
