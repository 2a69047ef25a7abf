//! Reference causal attention: for each problem and query, the scores over
//! the keys it sees, their softmax (the reference softmax's row
//! statistics), their dropout factors if any, then the weighted sum of the
//! values; backward, the same probabilities and factors recomputed, then
//! `dP`, `δ`, `dS` and the three gradients. Plain loops, every sum in index
//! order; heads side by side in a row are addressed where they lie
//! ([`AttentionPlan::row_start`]).

use kiln_core::plan::AttentionPlan;
use kiln_core::{AttentionGrads, AttentionOptions, HostData, Result, View};

use super::softmax::row_stats;
use crate::storage::{read_f32, store_f32};

/// The f32 operands of every problem, row-major, and their plan.
struct Problems<'a> {
    plan: &'a AttentionPlan,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

impl<'a> Problems<'a> {
    /// The problems of `plan` over q, k and v read as f32.
    fn new(plan: &'a AttentionPlan, [q, k, v]: &'a [std::borrow::Cow<'_, [f32]>; 3]) -> Self {
        Problems { plan, q, k, v }
    }

    /// Row `i` of problem `b` of a row-major operand of `rows` rows per
    /// problem (heads side by side: [`AttentionPlan::row_start`]).
    fn row<'x>(&self, x: &'x [f32], b: usize, rows: usize, i: usize) -> &'x [f32] {
        &x[self.at(b, rows, i)]
    }

    /// The span of that row.
    fn at(&self, b: usize, rows: usize, i: usize) -> std::ops::Range<usize> {
        let start = self.plan.row_start(b, rows, i);
        start..start + self.plan.dim
    }

    /// Query `i` of problem `b`: its probabilities over the keys it sees.
    fn probabilities(&self, b: usize, i: usize) -> Vec<f32> {
        let (t, s) = (self.plan.queries, self.plan.keys);
        let qi = self.row(self.q, b, t, i);
        let scores: Vec<f32> = (0..self.plan.visible(i))
            .map(|j| {
                let kj = self.row(self.k, b, s, j);
                qi.iter().zip(kj).fold(0.0f32, |acc, (x, y)| acc + x * y) * self.plan.scale
            })
            .collect();
        let (max, sum) = row_stats(&scores);
        scores.iter().map(|&x| (x - max).exp() / sum).collect()
    }

    /// Query `i` of problem `b`: the dropout factors of the keys it sees.
    fn factors(&self, b: usize, i: usize) -> Vec<f32> {
        let mut m = vec![1f32; self.plan.visible(i)];
        self.plan.row_factors(b, i, &mut m);
        m
    }
}

pub(crate) fn attention_causal(
    q: View<'_, HostData>,
    k: View<'_, HostData>,
    v: View<'_, HostData>,
    options: &AttentionOptions,
) -> Result<HostData> {
    let op = "attention_causal";
    let plan = AttentionPlan::new(q, k, v, options)?;
    let operands = crate::attention::operands(crate::KernelSet::Scalar, None, op, [q, k, v])?;
    let pr = Problems::new(&plan, &operands);
    let (t, s, d) = (plan.queries, plan.keys, plan.dim);
    let mut y = vec![0f32; plan.batch * t * d];
    for b in 0..plan.batch {
        for i in 0..t {
            let out = &mut y[pr.at(b, t, i)];
            let kept = pr.probabilities(b, i).into_iter().zip(pr.factors(b, i));
            for (j, p) in kept.map(|(p, m)| p * m).enumerate() {
                for (o, &x) in out.iter_mut().zip(pr.row(pr.v, b, s, j)) {
                    *o += p * x;
                }
            }
        }
    }
    store_f32(op, plan.dtype, y)
}

pub(crate) fn attention_causal_backward(
    q: View<'_, HostData>,
    k: View<'_, HostData>,
    v: View<'_, HostData>,
    dy: View<'_, HostData>,
    options: &AttentionOptions,
) -> Result<AttentionGrads<HostData>> {
    let op = "attention_causal_backward";
    let plan = AttentionPlan::backward(q, k, v, dy, options)?;
    let operands = crate::attention::operands(crate::KernelSet::Scalar, None, op, [q, k, v])?;
    let dys = read_f32(op, dy)?;
    let pr = Problems::new(&plan, &operands);
    let (t, s, d) = (plan.queries, plan.keys, plan.dim);
    let mut dq = vec![0f32; plan.batch * t * d];
    let (mut dk, mut dv) = (
        vec![0f32; plan.batch * s * d],
        vec![0f32; plan.batch * s * d],
    );
    for b in 0..plan.batch {
        for i in 0..t {
            let (p, m) = (pr.probabilities(b, i), pr.factors(b, i));
            let g = pr.row(&dys, b, t, i);
            // dPⱼ = (dy·vⱼ)·Mⱼ, δ = Σⱼ PⱼdPⱼ, dSⱼ = Pⱼ(dPⱼ − δ).
            let dp: Vec<f32> = (0..p.len())
                .map(|j| {
                    // (Without dropout every factor is 1: exact.)
                    g.iter()
                        .zip(pr.row(pr.v, b, s, j))
                        .fold(0.0f32, |a, (x, y)| a + x * y)
                        * m[j]
                })
                .collect();
            let delta = p.iter().zip(&dp).fold(0.0f32, |a, (x, y)| a + x * y);
            let qi = pr.row(pr.q, b, t, i);
            for (j, (&pj, &dpj)) in p.iter().zip(&dp).enumerate() {
                let ds = pj * (dpj - delta);
                for (o, &x) in dq[pr.at(b, t, i)].iter_mut().zip(pr.row(pr.k, b, s, j)) {
                    *o += ds * x;
                }
                for (o, &x) in dk[pr.at(b, s, j)].iter_mut().zip(qi) {
                    *o += ds * x;
                }
                let kept = pj * m[j];
                for (o, &x) in dv[pr.at(b, s, j)].iter_mut().zip(g) {
                    *o += kept * x;
                }
            }
        }
    }
    for x in dq.iter_mut().chain(dk.iter_mut()) {
        *x *= plan.scale;
    }
    Ok(AttentionGrads {
        dq: store_f32(op, plan.dtype, dq)?,
        dk: store_f32(op, plan.dtype, dk)?,
        dv: store_f32(op, plan.dtype, dv)?,
    })
}
