//! The fused optimiser updates, against the same formulas in f64.

use kiln_core::{AdamStep, Backend, DType, SgdStep};
use proptest::prelude::*;

use super::fetch_all;
use crate::values::{contiguous, Domain, Operand};
use crate::{compare, run_cases, Bound, Config, Report, Sizer};

const U: f64 = 1.0 / 16_777_216.0;

fn vectors(z: &Sizer, k: usize) -> impl Strategy<Value = Vec<Operand>> {
    z.elementwise(1, 70).prop_flat_map(move |d| {
        let n = d.iter().product();
        prop::collection::vec(contiguous(DType::F32, vec![n], Domain::Moderate(3.0)), k)
    })
}

pub(crate) fn sgd<B: Backend>(b: &B, cfg: &Config) -> Report {
    let hyper = (
        0.001f64..0.5,
        prop::sample::select(vec![0.0, 0.9, 0.5]),
        prop::sample::select(vec![0.0, 1e-2]),
        any::<bool>(),
    );
    run_cases(
        "sgd_update",
        DType::F32,
        cfg,
        move |z: &Sizer| (vectors(z, 3), hyper.clone()).boxed(),
        |(v, (lr, mu, wd, nesterov))| {
            let (p0, g, v0) = (v[0].logical(), v[1].logical(), v[2].logical());
            let n = p0.len();
            let step = SgdStep {
                lr: lr as f32,
                momentum: mu as f32,
                weight_decay: wd as f32,
                nesterov,
            };
            let (lr, mu, wd) = (
                f64::from(step.lr),
                f64::from(step.momentum),
                f64::from(step.weight_decay),
            );
            let mut p = v[0].upload(b)?;
            let gs = v[1].upload(b)?;
            let mut vel = v[2].upload(b)?;
            b.sgd_update(&mut p, &gs, (mu != 0.0).then_some(&mut vel), &step)?;
            let (mut want_p, mut want_v) = (Vec::new(), Vec::new());
            for i in 0..n {
                let gi = g[i] + wd * p0[i];
                let ge = (g[i].abs() + (wd * p0[i]).abs()) * 2.0 * U;
                if mu == 0.0 {
                    let d = lr * gi;
                    want_p.push((
                        p0[i] - d,
                        Bound::Abs(4.0 * U * (p0[i].abs() + d.abs()) + lr * ge),
                    ));
                } else {
                    let vi = mu * v0[i] + gi;
                    let ve = 3.0 * U * ((mu * v0[i]).abs() + gi.abs()) + ge;
                    want_v.push((vi, Bound::Abs(ve)));
                    let d = if nesterov { gi + mu * vi } else { vi };
                    let de = if nesterov {
                        ge + mu * ve + 3.0 * U * (gi.abs() + (mu * vi).abs())
                    } else {
                        ve
                    };
                    want_p.push((
                        p0[i] - lr * d,
                        Bound::Abs(4.0 * U * (p0[i].abs() + (lr * d).abs()) + lr * de),
                    ));
                }
            }
            let mut worst = compare(
                "sgd parameter",
                DType::F32,
                &[n],
                &fetch_all(b, &p, &[n])?,
                &want_p,
            )?;
            if mu != 0.0 {
                worst = worst.max(compare(
                    "sgd velocity",
                    DType::F32,
                    &[n],
                    &fetch_all(b, &vel, &[n])?,
                    &want_v,
                )?);
            }
            Ok(worst)
        },
    )
}

pub(crate) fn adam<B: Backend>(b: &B, cfg: &Config) -> Report {
    let hyper = (
        1e-4f64..0.1,
        1u64..2000,
        prop::sample::select(vec![0.0, 4e-3]),
        any::<bool>(),
    );
    run_cases(
        "adam_update",
        DType::F32,
        cfg,
        move |z: &Sizer| (vectors(z, 4), hyper.clone()).boxed(),
        |(v, (lr, t, wd, decoupled))| {
            let (p0, g, m0) = (v[0].logical(), v[1].logical(), v[2].logical());
            // The second moment is non-negative.
            let v0: Vec<f64> = v[3].logical().iter().map(|x| x.abs()).collect();
            let n = p0.len();
            let step = AdamStep {
                lr: lr as f32,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-7,
                weight_decay: wd as f32,
                decoupled,
                step: t,
            };
            let (lr, wd) = (f64::from(step.lr), f64::from(step.weight_decay));
            let (b1, b2, eps) = (
                f64::from(step.beta1),
                f64::from(step.beta2),
                f64::from(step.eps),
            );
            let mut p = v[0].upload(b)?;
            let gs = v[1].upload(b)?;
            let mut ms = v[2].upload(b)?;
            let mut vs = b.upload(&crate::values::to_host(DType::F32, &v0))?;
            b.adam_update(&mut p, &gs, &mut ms, &mut vs, &step)?;
            let lr_t = lr * (1.0 - b2.powi(t as i32)).sqrt() / (1.0 - b1.powi(t as i32));
            let (mut wp, mut wm, mut wv) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..n {
                let pd = if decoupled {
                    p0[i] - lr * wd * p0[i]
                } else {
                    p0[i]
                };
                let gi = g[i] + if decoupled { 0.0 } else { wd * pd };
                let mi = b1 * m0[i] + (1.0 - b1) * gi;
                let vi = b2 * v0[i] + (1.0 - b2) * gi * gi;
                let upd = lr_t * mi / (vi.sqrt() + eps);
                // Each moment: 3 roundings of its terms (β's themselves are f32 values).
                let me = 4.0 * U * ((b1 * m0[i]).abs() + ((1.0 - b1) * gi).abs() + gi.abs());
                let ve = 4.0 * U * ((b2 * v0[i]).abs() + ((1.0 - b2) * gi * gi).abs());
                wm.push((mi, Bound::Abs(me)));
                wv.push((vi, Bound::Abs(ve)));
                // The step: relative errors of m, √v and the ops, plus lr_t's f32 rounding.
                let rel = me / mi.abs().max(f64::MIN_POSITIVE)
                    + 0.5 * ve / vi.max(f64::MIN_POSITIVE)
                    + 8.0 * U;
                let pe = 4.0 * U * (p0[i].abs() + pd.abs())
                    + upd.abs() * rel.min(1.0)
                    + lr_t * me / (vi.sqrt() + eps);
                wp.push((pd - upd, Bound::Abs(pe)));
            }
            let w = compare(
                "adam parameter",
                DType::F32,
                &[n],
                &fetch_all(b, &p, &[n])?,
                &wp,
            )?;
            let w = w.max(compare(
                "adam first moment",
                DType::F32,
                &[n],
                &fetch_all(b, &ms, &[n])?,
                &wm,
            )?);
            Ok(w.max(compare(
                "adam second moment",
                DType::F32,
                &[n],
                &fetch_all(b, &vs, &[n])?,
                &wv,
            )?))
        },
    )
}
