//! Causal scaled-dot-product attention, forward and backward.
//!
//! Bounds: [`kiln_core::bounds::attention`] and
//! [`kiln_core::bounds::attention_backward`]. Operands come in every
//! arrangement the other checks use (strided, offset, broadcast views),
//! with more keys than queries (a cache's earlier keys), head widths
//! around the vector widths, and — at the `large` tier — rows of 250 and
//! more keys. Half the cases drop probabilities
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
    /// `(batch, T, S, D)`.
    fn extents(&self) -> (usize, usize, usize, usize) {
        let (q, k) = (self.q.dims(), self.k.dims());
        (q[0], q[1], k[1], q[2])
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
        Tier::Edge => (1usize..4, 0usize..9, 0usize..5, 0usize..9).boxed(),
        // Queries across a 64-row pass and past a second one.
        Tier::Blocked => (
            1usize..3,
            1usize..140,
            0usize..40,
            prop::sample::select(vec![1usize, 15, 16, 17, 31, 32, 33, 64]),
        )
            .boxed(),
        Tier::Large => (Just(1usize), 250usize..260, 0usize..8, 31usize..34).boxed(),
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
        .prop_flat_map(move |((n, t, extra, d), scale, dropout)| {
            let s = t + extra;
            let arg = |rows| operand(dtype, vec![n, rows, d], Domain::Moderate(2.0), true);
            let options = AttentionOptions { scale, dropout };
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
        let all = [
            self.q.logical(),
            self.k.logical(),
            self.v.logical(),
            self.dy.logical(),
        ];
        let rows = [t, s, s, t];
        (0..n)
            .map(|p| {
                std::array::from_fn(|i| all[i][p * rows[i] * d..(p + 1) * rows[i] * d].to_vec())
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
            let mut want = Vec::with_capacity(got.len());
            for (p, [q, k, v, _]) in c.problems().into_iter().enumerate() {
                want.extend(abs(bounds::attention(&q, &k, &v, c.dims(p))));
            }
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
            let mut want: [Vec<(f64, Bound)>; 3] = Default::default();
            for (p, [q, k, v, dy]) in c.problems().into_iter().enumerate() {
                let grads = bounds::attention_backward(&q, &k, &v, &dy, c.dims(p));
                for (w, g) in want.iter_mut().zip(grads) {
                    w.extend(abs(g));
                }
            }
            let mut worst = 0f64;
            for ((name, got, dims), want) in [
                ("dq", &grads.dq, [n, t, d]),
                ("dk", &grads.dk, [n, s, d]),
                ("dv", &grads.dv, [n, s, d]),
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
