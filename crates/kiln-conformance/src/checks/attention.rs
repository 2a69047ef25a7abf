//! Causal scaled-dot-product attention, forward and backward.
//!
//! Bounds: [`kiln_core::bounds::attention`] and
//! [`kiln_core::bounds::attention_backward`]. Operands come in every
//! arrangement the other checks use (strided, offset, broadcast views),
//! with more keys than queries (a cache's earlier keys), head widths
//! around the vector widths, one to three heads side by side in each row
//! ([`AttentionOptions::with_heads`]), and — at the `large` tier — rows of
//! 250 and more keys. Half the cases drop probabilities
//! ([`kiln_core::AttentionDropout`], rates 0.1 to 0.5, any seed and
//! stream offset), the oracle applying the same factors.

use kiln_core::bounds::{self, AttentionDims};
use kiln_core::{AttentionDropout, AttentionOptions, Backend, DType, View};
use proptest::prelude::*;

use super::fetch_all;
use crate::values::{operand, Domain, Operand};
use crate::{compare, run_cases, Bound, CaseError, Config, Report, Sizer, Tier};

#[derive(Clone, Debug)]
struct Case {
    q: Operand,
    k: Operand,
    v: Operand,
    dy: Operand,
    options: AttentionOptions,
}

impl Case {
    /// `(n, T, S, D)`: examples, queries, keys, head width.
    fn extents(&self) -> (usize, usize, usize, usize) {
        let (q, k) = (self.q.dims(), self.k.dims());
        (q[0], q[1], k[1], q[2] / self.options.heads)
    }

    /// Where problem `b`'s row `i` starts in a row-major operand of `rows`
    /// rows per example.
    fn row_start(&self, b: usize, rows: usize, i: usize) -> usize {
        let (h, d) = (self.options.heads, self.extents().3);
        ((b / h) * rows + i) * h * d + (b % h) * d
    }

    /// Each problem's row-major `[rows, D]` values (`per_problem`, in
    /// problem order) in the row-major order of an `[n, rows, heads·D]`
    /// result.
    fn interleaved<T: Clone>(&self, rows: usize, per_problem: Vec<Vec<T>>) -> Vec<T> {
        let d = self.extents().3;
        let mut out: Vec<Option<T>> = vec![None; per_problem.iter().map(Vec::len).sum()];
        for (b, values) in per_problem.into_iter().enumerate() {
            for (at, x) in values.into_iter().enumerate() {
                out[self.row_start(b, rows, at / d) + at % d] = Some(x);
            }
        }
        out.into_iter().flatten().collect()
    }

    /// Problem `b`'s extents, scale and dropout.
    fn dims(&self, b: usize) -> AttentionDims {
        let (_, t, s, d) = self.extents();
        AttentionDims {
            queries: t,
            keys: s,
            dim: d,
            scale: f64::from(self.options.scale),
            dropout: self.options.dropout.map(|d| (d, (b * t * s) as u64)),
        }
    }
}

fn strategy(z: &Sizer, dtype: DType) -> BoxedStrategy<Case> {
    let extents = match z.tier {
        Tier::Edge => (1usize..4, 0usize..9, 0usize..5, 0usize..9, 1usize..4).boxed(),
        // Queries across a 64-row pass and past a second one.
        Tier::Blocked => (
            1usize..3,
            1usize..140,
            0usize..40,
            prop::sample::select(vec![1usize, 15, 16, 17, 31, 32, 33, 64]),
            1usize..4,
        )
            .boxed(),
        Tier::Large => (
            Just(1usize),
            250usize..260,
            0usize..8,
            31usize..34,
            Just(1usize),
        )
            .boxed(),
    };
    let scale = prop::sample::select(vec![1.0f32, 0.125, 0.176_776_7]);
    let dropout = prop_oneof![
        Just(None),
        (
            prop::sample::select(vec![0.1f32, 0.2, 0.5]),
            any::<u64>(),
            0u64..1 << 40,
        )
            .prop_map(|(rate, seed, offset)| AttentionDropout::new(rate, seed, offset).ok()),
    ];
    (extents, scale, dropout)
        .prop_flat_map(move |((n, t, extra, d, heads), scale, dropout)| {
            let s = t + extra;
            let arg = |rows| operand(dtype, vec![n, rows, heads * d], Domain::Moderate(2.0), true);
            let mut options = AttentionOptions::new(scale).with_heads(heads);
            options.dropout = dropout;
            (arg(t), arg(s), arg(s), arg(t)).prop_map(move |(q, k, v, dy)| Case {
                q,
                k,
                v,
                dy,
                options,
            })
        })
        .boxed()
}

/// The `(value, bound)` lists as the comparison wants them.
fn abs(v: Vec<(f64, f64)>) -> impl Iterator<Item = (f64, Bound)> {
    v.into_iter().map(|(y, e)| (y, Bound::Abs(e)))
}

impl Case {
    /// Each problem's q, k, v and dy, logical values row-major.
    fn problems(&self) -> Vec<[Vec<f64>; 4]> {
        let (n, t, s, d) = self.extents();
        let h = self.options.heads;
        let all = [
            self.q.logical(),
            self.k.logical(),
            self.v.logical(),
            self.dy.logical(),
        ];
        let rows = [t, s, s, t];
        (0..n * h)
            .map(|p| {
                std::array::from_fn(|i| {
                    (0..rows[i])
                        .flat_map(|r| {
                            let at = self.row_start(p, rows[i], r);
                            all[i][at..at + d].iter().copied()
                        })
                        .collect()
                })
            })
            .collect()
    }
}

pub(crate) fn attention_causal<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    let op = "attention_causal";
    run_cases(
        op,
        dtype,
        cfg,
        move |z: &Sizer| strategy(z, dtype),
        |c| {
            let (q, k, v) = (c.q.upload(b)?, c.k.upload(b)?, c.v.upload(b)?);
            let y = b.attention_causal(
                View::new(&q, &c.q.layout),
                View::new(&k, &c.k.layout),
                View::new(&v, &c.v.layout),
                &c.options,
            )?;
            let dims = c.q.dims().to_vec();
            let got = fetch_all(b, &y, &dims)?;
            let per_problem = c
                .problems()
                .into_iter()
                .enumerate()
                .map(|(p, [q, k, v, _])| abs(bounds::attention(&q, &k, &v, c.dims(p))).collect())
                .collect();
            let want = c.interleaved(c.extents().1, per_problem);
            compare(op, dtype, &dims, &got, &want)
        },
    )
}

pub(crate) fn attention_causal_backward<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    let op = "attention_causal_backward";
    run_cases(
        op,
        dtype,
        cfg,
        move |z: &Sizer| strategy(z, dtype),
        |c| {
            let (q, k, v) = (c.q.upload(b)?, c.k.upload(b)?, c.v.upload(b)?);
            let dy = c.dy.upload(b)?;
            let grads = b.attention_causal_backward(
                View::new(&q, &c.q.layout),
                View::new(&k, &c.k.layout),
                View::new(&v, &c.v.layout),
                View::new(&dy, &c.dy.layout),
                &c.options,
            )?;
            let (n, t, s, d) = c.extents();
            let w = c.options.heads * d;
            let mut per_problem: [Vec<Vec<(f64, Bound)>>; 3] = Default::default();
            for (p, [q, k, v, dy]) in c.problems().into_iter().enumerate() {
                let grads = bounds::attention_backward(&q, &k, &v, &dy, c.dims(p));
                for (w, g) in per_problem.iter_mut().zip(grads) {
                    w.push(abs(g).collect());
                }
            }
            let [wq, wk, wv] = per_problem;
            let want = [
                c.interleaved(t, wq),
                c.interleaved(s, wk),
                c.interleaved(s, wv),
            ];
            let mut worst = 0f64;
            for ((name, got, dims), want) in [
                ("dq", &grads.dq, [n, t, w]),
                ("dk", &grads.dk, [n, s, w]),
                ("dv", &grads.dv, [n, s, w]),
            ]
            .into_iter()
            .zip(&want)
            {
                let got = fetch_all(b, got, &dims)?;
                let what = format!("{op} ({name})");
                worst = worst.max(compare(&what, dtype, &dims, &got, want)?);
            }
            Ok::<f64, CaseError>(worst)
        },
    )
}
