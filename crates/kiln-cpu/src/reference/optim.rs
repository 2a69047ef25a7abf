//! Reference fused optimiser updates (f32 parameters and state).

use kiln_core::{AdamStep, Error, HostData, Result, SgdStep};

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

fn check_len(op: &'static str, want: usize, got: usize, what: &str) -> Result<()> {
    if want != got {
        return Err(Error::shape(
            op,
            format!("{what} has {got} elements, the parameter {want}"),
        ));
    }
    Ok(())
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
    let p = f32_mut("sgd_update", param)?;
    let g = f32_ref("sgd_update", grad)?;
    check_len("sgd_update", p.len(), g.len(), "gradient")?;
    match velocity {
        None if s.momentum != 0.0 => Err(Error::invalid(
            "sgd_update: momentum needs a velocity buffer",
        )),
        None => {
            for (p, &g) in p.iter_mut().zip(g) {
                let g = g + s.weight_decay * *p;
                *p -= s.lr * g;
            }
            Ok(())
        }
        Some(v) => {
            let v = f32_mut("sgd_update", v)?;
            check_len("sgd_update", p.len(), v.len(), "velocity")?;
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
    let kiln_core::AdamSchedule { lr_t, decay, l2 } = s.schedule()?;
    let p = f32_mut("adam_update", param)?;
    let g = f32_ref("adam_update", grad)?;
    let m = f32_mut("adam_update", m)?;
    let v = f32_mut("adam_update", v)?;
    check_len("adam_update", p.len(), g.len(), "gradient")?;
    check_len("adam_update", p.len(), m.len(), "first moment")?;
    check_len("adam_update", p.len(), v.len(), "second moment")?;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *p -= decay * *p;
        let g = g + l2 * *p;
        *m = s.beta1 * *m + (1.0 - s.beta1) * g;
        *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
        *p -= lr_t * *m / (v.sqrt() + s.eps);
    }
    Ok(())
}
