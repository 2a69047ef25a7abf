//! The fused optimiser updates, against the same formulas in f64.

use kiln_core::{bounds, AdamStep, Backend, DType, SgdStep};
use proptest::prelude::*;

use super::fetch_all;
use crate::values::{contiguous, to_host, Domain, Operand};
use crate::{compare, run_cases, Bound, CaseError, Config, Report, Sizer};

/// The scale that puts operands of a few units just above the smallest
/// normal f32 (2⁻¹²⁶): state that a stopped gradient has decayed to, whose
/// next step may round it into the subnormal range (stored as zero,
/// [`kiln_core::flush_state`]).
const NEAR_SUBNORMAL: f64 = 1.0 / (1u128 << 125) as f64;

/// The parameters' scale beside [`NEAR_SUBNORMAL`] state: small enough
/// that a step from that state shows in their bits (a step with the state
/// as stored, or not, or with the state a flush would have left), normal
/// all the same.
const TINY_PARAMS: f64 = 1.0 / (1u128 << 110) as f64;

/// `x`'s values scaled by `scale` when `tiny`, as the f32 values the
/// backend is given (those that land among the subnormals are rounded).
fn scaled(x: &Operand, tiny: bool, scale: f64) -> Vec<f64> {
    let s = if tiny { scale } else { 1.0 };
    x.logical()
        .iter()
        .map(|x| f64::from((x * s) as f32))
        .collect()
}

/// Optimiser state is stored flushed ([`kiln_core::flush_state`]): a
/// subnormal value stored is a failure, whatever the bound says.
fn no_subnormals(what: &str, got: &[f64]) -> Result<(), CaseError> {
    match got.iter().position(|&x| (x as f32).is_subnormal()) {
        None => Ok(()),
        Some(i) => Err(CaseError::Fail(format!(
            "{what}: element {i} is stored subnormal ({:e}); optimiser state below 2⁻¹²⁶ \
             must be stored as zero (kiln_core::flush_state), whatever its bound allows",
            got[i]
        ))),
    }
}

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
        // The velocity and gradient near the subnormal range.
        any::<bool>(),
    );
    run_cases(
        "sgd_update",
        DType::F32,
        cfg,
        move |z: &Sizer| (vectors(z, 3), hyper.clone()).boxed(),
        |(v, (lr, mu, wd, nesterov, tiny))| {
            let p0 = scaled(&v[0], tiny, TINY_PARAMS);
            let g = scaled(&v[1], tiny, NEAR_SUBNORMAL);
            let v0 = scaled(&v[2], tiny, NEAR_SUBNORMAL);
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
            let mut p = b.upload(&to_host(DType::F32, &p0))?;
            let gs = b.upload(&to_host(DType::F32, &g))?;
            let mut vel = b.upload(&to_host(DType::F32, &v0))?;
            b.sgd_update(&mut p, &gs, (mu != 0.0).then_some(&mut vel), &step)?;
            let (mut want_p, mut want_v) = (Vec::new(), Vec::new());
            for i in 0..n {
                let [p, pe, v, ve] = bounds::sgd(p0[i], g[i], v0[i], lr, mu, wd, nesterov);
                want_p.push((p, Bound::Abs(pe)));
                want_v.push((v, Bound::Abs(ve)));
            }
            let mut worst = compare(
                "sgd parameter",
                DType::F32,
                &[n],
                &fetch_all(b, &p, &[n])?,
                &want_p,
            )?;
            if mu != 0.0 {
                let got = fetch_all(b, &vel, &[n])?;
                no_subnormals("sgd velocity", &got)?;
                worst = worst.max(compare("sgd velocity", DType::F32, &[n], &got, &want_v)?);
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
        // The moments and gradient near the subnormal range.
        any::<bool>(),
    );
    run_cases(
        "adam_update",
        DType::F32,
        cfg,
        move |z: &Sizer| (vectors(z, 4), hyper.clone()).boxed(),
        |(v, (lr, t, wd, decoupled, tiny))| {
            let p0 = scaled(&v[0], tiny, TINY_PARAMS);
            let g = scaled(&v[1], tiny, NEAR_SUBNORMAL);
            let m0 = scaled(&v[2], tiny, NEAR_SUBNORMAL);
            // The second moment is non-negative.
            let v0: Vec<f64> = scaled(&v[3], tiny, NEAR_SUBNORMAL)
                .iter()
                .map(|x| x.abs())
                .collect();
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
            let mut p = b.upload(&to_host(DType::F32, &p0))?;
            let gs = b.upload(&to_host(DType::F32, &g))?;
            let mut ms = b.upload(&to_host(DType::F32, &m0))?;
            let mut vs = b.upload(&to_host(DType::F32, &v0))?;
            b.adam_update(&mut p, &gs, &mut ms, &mut vs, &step)?;
            let h = bounds::AdamHyper {
                lr,
                beta1: b1,
                beta2: b2,
                eps,
                weight_decay: wd,
                decoupled,
                step: t,
            };
            let (mut wp, mut wm, mut wv) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..n {
                let [p, pe, m, me, v, ve] = bounds::adam(p0[i], g[i], m0[i], v0[i], &h);
                wp.push((p, Bound::Abs(pe)));
                wm.push((m, Bound::Abs(me)));
                wv.push((v, Bound::Abs(ve)));
            }
            let w = compare(
                "adam parameter",
                DType::F32,
                &[n],
                &fetch_all(b, &p, &[n])?,
                &wp,
            )?;
            let (got_m, got_v) = (fetch_all(b, &ms, &[n])?, fetch_all(b, &vs, &[n])?);
            no_subnormals("adam first moment", &got_m)?;
            no_subnormals("adam second moment", &got_v)?;
            let w = w.max(compare("adam first moment", DType::F32, &[n], &got_m, &wm)?);
            Ok(w.max(compare(
                "adam second moment",
                DType::F32,
                &[n],
                &got_v,
                &wv,
            )?))
        },
    )
}
