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
/// that every kind of boundary is crossed in a few dozen cases: k across
/// one and two `KC` blocks, whole tiles with a short k (where an error of
/// 1e-3 stands out of the bound), m across micro-tiles and row blocks, and
/// n across micro-tiles and `NC` — all at the backend's switch points ± 1,
/// within [`BLOCKED_WORK`]. Each family's corners ([`Family::corners`]:
/// one past every point on its axis) come first, the families taking
/// turns; random draws from all four follow.
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
            let big =
                |v: &[usize], lo: usize| v.iter().copied().filter(|&d| d >= lo).collect::<Vec<_>>();
            let small =
                |v: &[usize], hi: usize| v.iter().copied().filter(|&d| d <= hi).collect::<Vec<_>>();
            let families = [
                // k across the k blocks.
                Family::new([small(&m, 130), k.clone(), small(&n, 130)], K, &p.gemm_k),
                // Whole tiles, short k.
                Family::new([big(&m, 63), small(&k, 17), big(&n, 63)], N, &p.gemm_n),
                // m across the micro-tiles and row blocks.
                Family::new([m.clone(), small(&k, 65), small(&n, 65)], M, &p.gemm_m),
                // n across the micro-tiles and column blocks.
                Family::new([small(&m, 9), small(&k, 33), n.clone()], N, &p.gemm_n),
            ];
            let corners = Sizer::take_turns(families.iter().map(Family::corners).collect());
            let random: Vec<BoxedStrategy<(usize, usize, usize)>> = families
                .into_iter()
                .filter(|f| !f.combos.is_empty())
                .map(|f| prop::sample::select(f.combos).boxed())
                .collect();
            let shapes = z.corners_first(corners, prop::strategy::Union::new(random).boxed());
            (1usize..=2, shapes)
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

/// The axes of a `(m, k, n)` shape.
const M: usize = 0;
const K: usize = 1;
const N: usize = 2;

/// One family of blocked-tier shapes: every `(m, k, n)` it draws from
/// within [`BLOCKED_WORK`], the axis whose switch points it is there to
/// cross, and those points.
struct Family {
    combos: Vec<(usize, usize, usize)>,
    axis: usize,
    points: Vec<usize>,
}

impl Family {
    /// The family of the extents `[ms, ks, ns]`, crossing `points` on `axis`.
    fn new(extents: [Vec<usize>; 3], axis: usize, points: &[usize]) -> Self {
        let [ms, ks, ns] = &extents;
        let mut combos = Vec::new();
        for &m in ms {
            for &k in ks {
                for &n in ns {
                    if m * k * n <= BLOCKED_WORK {
                        combos.push((m, k, n));
                    }
                }
            }
        }
        Family {
            combos,
            axis,
            points: points.to_vec(),
        }
    }

    /// The shapes it must not miss: for each extent on its axis one past a
    /// switch point (the first to take the next block, tile or thread's
    /// share) or the largest on that axis, the shape with the most work
    /// that fits.
    fn corners(&self) -> Vec<(usize, usize, usize)> {
        let on_axis = |&(m, k, n): &(usize, usize, usize)| [m, k, n][self.axis];
        let largest = self.combos.iter().map(on_axis).max();
        let mut wanted = Sizer::past(&self.points);
        wanted.extend(largest);
        wanted.sort_unstable();
        wanted.dedup();
        wanted
            .into_iter()
            .filter_map(|d| {
                self.combos
                    .iter()
                    .filter(|c| on_axis(c) == d)
                    .max_by_key(|&&(m, k, n)| (m * k * n, m))
                    .copied()
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::SwitchPoints;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    /// The corners `points` give, in the order they are drawn (the draws
    /// that follow them are random).
    fn corners(points: SwitchPoints) -> Vec<(usize, usize, usize)> {
        let z = Sizer::new(Tier::Blocked, points);
        let s = dims(&z);
        let mut runner = TestRunner::deterministic();
        (0..z.pinned())
            .map(|_| {
                let (_, m, k, n) = s.new_tree(&mut runner).unwrap().current();
                (m, k, n)
            })
            .collect()
    }

    #[test]
    fn the_blocked_tier_starts_at_every_family_corner() {
        // In turns: k one past 8, 256 and 512, and 2·512 + 1; whole tiles
        // one past n = 128 and 2048; m one past 6, 8, 128 and 192; n one
        // past 8, 16, 32, 128 and 2048 — each with the most work that fits.
        assert_eq!(
            corners(SwitchPoints::default()),
            [
                (129, 9, 129),
                (193, 9, 129),
                (7, 9, 64),
                (9, 9, 9),
                (129, 257, 129),
                (193, 9, 2049),
                (9, 9, 64),
                (9, 9, 17),
                (129, 513, 129),
                (129, 9, 64),
                (9, 9, 33),
                (129, 1025, 64),
                (193, 9, 64),
                (9, 9, 129),
                (9, 9, 2049),
            ]
        );
    }

    #[test]
    fn a_new_switch_point_adds_corners_and_keeps_the_others() {
        // The vendor example's 48-wide tiles, and the row block of 96 that
        // once reshuffled the seeded draws so that none went past k = 256.
        let mut points = SwitchPoints::default();
        points.gemm_m.extend([48, 96]);
        points.gemm_n.push(48);
        let c = corners(points);
        let any = |f: &dyn Fn(usize, usize, usize) -> bool| c.iter().any(|&(m, k, n)| f(m, k, n));
        for deep in [9, 257, 513, 1025] {
            assert!(any(&|_, k, _| k == deep), "k = {deep} missing: {c:?}");
        }
        for tall in [7, 9, 49, 97, 129, 193] {
            assert!(
                any(&|m, k, _| m == tall && k <= 65),
                "m = {tall} missing: {c:?}"
            );
        }
        for wide in [9, 17, 33, 49, 129, 2049] {
            assert!(
                any(&|m, _, n| n == wide && m <= 9),
                "n = {wide} missing: {c:?}"
            );
        }
    }
}
