//! Reference fused optimiser updates (f32 parameters and state).

use kiln_core::{flush_state, AdamStep, HostData, Result, SgdStep};

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

/// SGD with optional momentum (Nesterov or not) and L2 weight decay, the
/// velocity stored flushed ([`flush_state`]); inlined so
/// `vector::wide::run` can compile it for a SIMD set.
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
                *v = flush_state(s.momentum * *v + g);
                let d = if s.nesterov { g + s.momentum * *v } else { *v };
                *p -= s.lr * d;
            }
            Ok(())
        }
    }
}

/// Adam / AdamW (Keras' ε placement): one step's constants — the step's
/// hyper-parameters and the schedule derived from them (validated by
/// `kiln_core::OptimizerPlan`).
#[derive(Clone, Copy)]
pub(crate) struct AdamConstants {
    beta1: f32,
    beta2: f32,
    eps: f32,
    lr_t: f32,
    decay: f32,
    l2: f32,
}

/// The update's operands as f32 slices of one length, checked.
#[allow(clippy::type_complexity)]
pub(crate) fn adam_operands<'a>(
    param: &'a mut HostData,
    grad: &'a HostData,
    m: &'a mut HostData,
    v: &'a mut HostData,
    s: &AdamStep,
) -> Result<(
    &'a mut [f32],
    &'a [f32],
    &'a mut [f32],
    &'a mut [f32],
    AdamConstants,
)> {
    let (_, kiln_core::AdamSchedule { lr_t, decay, l2 }) =
        kiln_core::OptimizerPlan::adam(&*param, grad, &*m, &*v, s)?;
    let k = AdamConstants {
        beta1: s.beta1,
        beta2: s.beta2,
        eps: s.eps,
        lr_t,
        decay,
        l2,
    };
    Ok((
        f32_mut("adam_update", param)?,
        f32_ref("adam_update", grad)?,
        f32_mut("adam_update", m)?,
        f32_mut("adam_update", v)?,
        k,
    ))
}

/// The update over slices of one length (each element on its own, so any
/// split of the slices gives the same bits), the moments stored flushed
/// ([`flush_state`]): a subnormal moment would send every later step on
/// it through the processor's slow path.
#[inline(always)]
pub(crate) fn adam_slices(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    k: &AdamConstants,
) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *p -= k.decay * *p;
        let g = g + k.l2 * *p;
        *m = flush_state(k.beta1 * *m + (1.0 - k.beta1) * g);
        *v = flush_state(k.beta2 * *v + (1.0 - k.beta2) * g * g);
        // lr_t·(m/(√v + ε)), not (lr_t·m)/(√v + ε): a small m would make
        // the product subnormal (a slow path on x86) for dozens of steps
        // before m itself falls below 2⁻¹²⁶.
        *p -= k.lr_t * (*m / (v.sqrt() + k.eps));
    }
}
