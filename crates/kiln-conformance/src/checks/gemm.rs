//! GEMM: `C := act(α·A·B + β·C₀ + bias)`, batched, any strides.
//!
//! Bound per element: the dot product within γₖ·Σ|aᵢbᵢ| (f32 accumulation,
//! u = 2⁻²⁴, whatever the storage type), carried through the epilogue: α
//! scales it, each of the three epilogue additions adds a rounding, and the
//! activation multiplies it by its Lipschitz constant and adds its own few
//! ulps. For bf16, whose fast CPU and GPU paths (AVX-512 BF16's
//! `vdpbf16ps`, tensor cores) flush subnormal intermediate sums, each of
//! the k steps may also lose up to 2⁻¹²⁶.

use kiln_core::{Activation, Backend, DType, GemmEpilogue, View};
use proptest::prelude::*;

use super::fetch_all;
use crate::bound::{gamma, ETA_F32};
use crate::values::{contiguous, extent, operand, value, Domain, Operand};
use crate::{compare, run_cases, Bound, Config, Report};

const U: f64 = 1.0 / 16_777_216.0; // 2⁻²⁴
const U64: f64 = 1.0 / 9_007_199_254_740_992.0; // 2⁻⁵³, the oracle's own rounding

#[derive(Debug, Clone)]
struct Case {
    a: Operand,
    b: Operand,
    alpha: f64,
    c0: Option<(f64, Operand)>,
    bias: Option<Operand>,
    activation: Activation,
}

fn strategy(dtype: DType, epilogue: bool) -> impl Strategy<Value = Case> {
    let dims = (1usize..=3, extent(40), extent(40), extent(40));
    dims.prop_flat_map(move |(batch, m, k, n)| {
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
}

fn activate(act: Activation, x: f64) -> f64 {
    act.as_unary().map_or(x, |u| u.eval_f64(x))
}

pub(crate) fn gemm<B: Backend>(backend: &B, dtype: DType, cfg: &Config, epilogue: bool) -> Report {
    let name = if epilogue { "gemm_epilogue" } else { "gemm" };
    run_cases(name, dtype, cfg, strategy(dtype, epilogue), |c| {
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
        let (lipschitz, act_ulps) = match c.activation {
            Activation::None => (1.0, 0.0),
            Activation::Relu => (1.0, 0.0),
            Activation::Sigmoid => (0.25, 4.0),
            Activation::Tanh => (1.0, 4.0),
        };
        let mut want = Vec::with_capacity(batch * m * n);
        for p in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let (mut dot, mut mass) = (0f64, 0f64);
                    for kk in 0..k {
                        let prod = av[(p * m + i) * k + kk] * bv[(p * k + kk) * n + j];
                        dot += prod;
                        mass += prod.abs();
                    }
                    let mut pre = c.alpha * dot;
                    let flush = if dtype == DType::BF16 {
                        k as f64 * 2f64.powi(-126)
                    } else {
                        0.0
                    };
                    let mut err = c.alpha.abs()
                        * ((gamma(k, U) + k as f64 * U64) * mass + k as f64 * ETA_F32 + flush);
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
                        err += gamma(3, U) * (terms + err) + 3.0 * ETA_F32;
                    }
                    let y = activate(c.activation, pre);
                    let e = lipschitz * err
                        + if act_ulps > 0.0 {
                            act_ulps * 2.0 * U * y.abs()
                        } else {
                            0.0
                        };
                    want.push((y, Bound::Abs(e)));
                }
            }
        }
        compare(name, dtype, &[batch, m, n], &got, &want)
    })
}
