//! Reference fused optimiser updates (f32 parameters and state).

use kiln_core::{AdamStep, HostData, Result, SgdStep};

use crate::unsupported;

fn f32_mut<'a>(op: &'static str, s: &'a mut HostData) -> Result<&'a mut Vec<f32>> {
    match s {
        HostData::F32(v) => Ok(v),
        other => Err(unsupported(op, other.dtype())),
    }
}

fn f32_ref<'a>(op: &'static str, s: &'a HostData) -> Result<&'a [f32]> {
    match s {
        HostData::F32(v) => Ok(v),
        other => Err(unsupported(op, other.dtype())),
    }
}

/// SGD with optional momentum (Nesterov or not) and L2 weight decay;
/// inlined so `vector::wide::run` can compile it for a SIMD set.
#[inline(always)]
pub(crate) fn sgd(
    param: &mut HostData,
    grad: &HostData,
    velocity: Option<&mut HostData>,
    s: &SgdStep,
) -> Result<()> {
    kiln_core::OptimizerPlan::sgd(&*param, grad, velocity.as_deref(), s)?;
    let p = f32_mut("sgd_update", param)?;
    let g = f32_ref("sgd_update", grad)?;
    match velocity {
        None => {
            for (p, &g) in p.iter_mut().zip(g) {
                let g = g + s.weight_decay * *p;
                *p -= s.lr * g;
            }
            Ok(())
        }
        Some(v) => {
            let v = f32_mut("sgd_update", v)?;
            for ((p, &g), v) in p.iter_mut().zip(g).zip(v.iter_mut()) {
                let g = g + s.weight_decay * *p;
                *v = s.momentum * *v + g;
                let d = if s.nesterov { g + s.momentum * *v } else { *v };
                *p -= s.lr * d;
            }
            Ok(())
        }
    }
}

/// Adam / AdamW (Keras' ε placement); inlined so `vector::wide::run` can
/// compile it for a SIMD set.
#[inline(always)]
pub(crate) fn adam(
    param: &mut HostData,
    grad: &HostData,
    m: &mut HostData,
    v: &mut HostData,
    s: &AdamStep,
) -> Result<()> {
    let (_, kiln_core::AdamSchedule { lr_t, decay, l2 }) =
        kiln_core::OptimizerPlan::adam(&*param, grad, &*m, &*v, s)?;
    let p = f32_mut("adam_update", param)?;
    let g = f32_ref("adam_update", grad)?;
    let m = f32_mut("adam_update", m)?;
    let v = f32_mut("adam_update", v)?;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *p -= decay * *p;
        let g = g + l2 * *p;
        *m = s.beta1 * *m + (1.0 - s.beta1) * g;
        *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
        *p -= lr_t * *m / (v.sqrt() + s.eps);
    }
    Ok(())
}
