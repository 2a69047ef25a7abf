//! Gradient checks: autograd through each op, layer and loss, on a given
//! backend, against central finite differences computed in f64 from the
//! backend's own f32 forward passes.
//!
//! The checked scalar is `L = Σ wᵢ·yᵢ` with fixed random weights `w`, so
//! every output element's gradient matters. With step `h`, the central
//! difference carries `O(h²)` truncation and `O(u·|L|/h)` rounding error,
//! well inside the 2% tolerance, while a wrong derivative (sign, factor,
//! axis, broadcast) is not.

use kiln_core::{
    no_grad, rng, Activation, AttentionDropout, AttentionOptions, Backend, DType, HostData, Result,
    Tensor, UnaryOp, Var, Window2d,
};
use kiln_nn::{ActivationSpec, GptConfig, Initializer, LayerSpec, Loss, ModelSpec, Sequential};
use proptest::prelude::*;

use crate::{run_edge_cases as run_cases, CaseError, Config, Report};

type Input = (Vec<f32>, Vec<usize>);

/// A function of some tensors, differentiated by [`check`].
type TensorFn<'a, B> = &'a dyn Fn(&[Tensor<B>]) -> Result<Tensor<B>>;

/// `n` values of the Philox stream `seed` in `[lo, hi)`, kept `gap` away from 0.
fn values(seed: u64, n: usize, lo: f32, hi: f32, gap: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let v = lo + (hi - lo) * rng::uniform(seed, 0, i);
            if gap > 0.0 && v.abs() < gap {
                if v < 0.0 {
                    -gap
                } else {
                    gap
                }
            } else {
                v
            }
        })
        .collect()
}

fn input(seed: u64, dims: &[usize], lo: f32, hi: f32, gap: f32) -> Input {
    (
        values(seed, dims.iter().product(), lo, hi, gap),
        dims.to_vec(),
    )
}

/// Checks `d/dinputs Σ w·f(inputs)` against central differences.
pub(crate) fn check<B: Backend>(
    b: &B,
    inputs: &[Input],
    f: TensorFn<'_, B>,
) -> Result<(), CaseError> {
    let vars: Vec<Var<B>> = inputs
        .iter()
        .map(|(v, d)| Tensor::from_slice(v, d, b).and_then(|t| Var::from_tensor(&t)))
        .collect::<Result<_>>()?;
    let leaves: Vec<Tensor<B>> = vars.iter().map(Var::as_tensor).collect();
    let y = f(&leaves)?;
    let w = values(99, y.numel(), -1.0, 1.0, 0.0);
    let wt = Tensor::from_slice(&w, y.dims(), b)?;
    let grads = y.mul(&wt)?.sum_all()?.backward()?;
    let weighted = |t: &Tensor<B>| -> Result<f64> {
        Ok(t.to_vec_f32()?
            .iter()
            .zip(&w)
            .map(|(&a, &c)| f64::from(a) * f64::from(c))
            .sum())
    };
    for (i, (vals, dims)) in inputs.iter().enumerate() {
        let analytic = match grads.get_id(vars[i].id()) {
            Some(g) => g.to_vec_f32()?,
            None => vec![0.0; vals.len()],
        };
        if analytic.len() != vals.len() {
            return Err(CaseError::Fail(format!(
                "input {i}: gradient has {} elements, input {}",
                analytic.len(),
                vals.len()
            )));
        }
        for j in 0..vals.len() {
            let h = 1e-2 * vals[j].abs().max(0.1);
            let eval = |delta: f32| -> Result<f64> {
                no_grad(|| {
                    let ts: Vec<Tensor<B>> = inputs
                        .iter()
                        .enumerate()
                        .map(|(k, (v, d))| {
                            let mut v = v.clone();
                            if k == i {
                                v[j] += delta;
                            }
                            Tensor::from_slice(&v, d, b)
                        })
                        .collect::<Result<_>>()?;
                    weighted(&f(&ts)?)
                })
            };
            let numeric = (eval(h)? - eval(-h)?) / (2.0 * f64::from(h));
            let a = f64::from(analytic[j]);
            if (a - numeric).abs() > 2e-2 * (1.0 + numeric.abs().max(a.abs())) {
                return Err(CaseError::Fail(format!(
                    "input {i} {dims:?} element {j}: autograd {a} vs finite difference {numeric}"
                )));
            }
        }
    }
    Ok(())
}

fn small_shape() -> BoxedStrategy<Vec<usize>> {
    prop::collection::vec(1usize..5, 1..4).boxed()
}

/// Runs the gradient check `op` (one of the `grad_*` entries of [`crate::CHECKS`]).
pub(crate) fn run<B: Backend>(b: &B, op: &str, cfg: &Config) -> Report {
    // Each case runs many forward passes: a quarter of the usual count suffices.
    let cfg = Config {
        cases: cfg.cases.div_ceil(4).max(2),
        ..cfg.clone()
    };
    let cfg = &cfg;
    let f32 = DType::F32;
    match op {
        "grad_unary" => run_cases(op, f32, cfg, (small_shape(), 0u64..1000), |(dims, seed)| {
            for u in UnaryOp::ALL {
                let (lo, hi, gap) = match u {
                    UnaryOp::Log | UnaryOp::Sqrt => (0.2, 3.0, 0.0),
                    UnaryOp::Recip => (-2.0, 2.0, 0.3),
                    UnaryOp::Abs | UnaryOp::Relu => (-2.0, 2.0, 0.1),
                    _ => (-2.0, 2.0, 0.0),
                };
                check(b, &[input(seed, &dims, lo, hi, gap)], &|t| t[0].unary(u))?;
            }
            Ok(0.0)
        }),
        "grad_binary" => run_cases(
            op,
            f32,
            cfg,
            (small_shape(), 0u32..8, 0usize..2, 0u64..1000),
            |(dims, mask, drop, seed)| {
                let other: Vec<usize> = dims
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| if mask & (1 << i) != 0 { 1 } else { x })
                    .collect();
                let other = other[drop.min(other.len() - 1)..].to_vec();
                let a = input(seed, &dims, -2.0, 2.0, 0.0);
                let c = input(seed + 1, &other, -2.0, 2.0, 0.3);
                check(b, &[a.clone(), c.clone()], &|t| t[0].add(&t[1]))?;
                check(b, &[a.clone(), c.clone()], &|t| t[0].sub(&t[1]))?;
                check(b, &[c.clone(), a.clone()], &|t| t[0].mul(&t[1]))?;
                check(b, &[a.clone(), c.clone()], &|t| t[0].div(&t[1]))?;
                let shifted = (c.0.iter().map(|v| v + 5.0).collect(), c.1.clone());
                check(b, &[a.clone(), shifted.clone()], &|t| t[0].maximum(&t[1]))?;
                check(b, &[shifted, a], &|t| t[0].minimum(&t[1]))?;
                Ok(0.0)
            },
        ),
        "grad_views" => run_cases(op, f32, cfg, (small_shape(), 0u64..1000), |(dims, seed)| {
            let a = [input(seed, &dims, -2.0, 2.0, 0.0)];
            let rank = dims.len();
            check(b, &a, &|t| t[0].affine(-1.5, 0.25))?;
            check(b, &a, &|t| t[0].transpose(0, rank - 1)?.contiguous())?;
            check(b, &a, &|t| t[0].reshape(&[t[0].numel()]))?;
            let perm: Vec<usize> = (0..rank).rev().collect();
            check(b, &a, &|t| t[0].permute(&perm))?;
            let last = dims[rank - 1];
            check(b, &a, &|t| t[0].narrow(rank - 1, last / 2, last - last / 2))?;
            if last >= 2 {
                // Three overlapping slices of one tensor: their gradients
                // share one buffer, each added into its window.
                let w = last - 1;
                check(b, &a, &|t| {
                    let (x, y) = (t[0].narrow(rank - 1, 0, w)?, t[0].narrow(rank - 1, 1, w)?);
                    x.mul(&y)?.add(&t[0].narrow(rank - 1, 0, w)?)
                })?;
            }
            check(b, &a, &|t| {
                let mut d = vec![2];
                d.extend_from_slice(t[0].dims());
                t[0].broadcast_as(&d)
            })?;
            check(b, &a, &|t| t[0].unsqueeze(0)?.flatten_from(1))?;
            check(b, &a, &|t| t[0].cast(DType::F32)?.cast(DType::F32))?;
            Ok(0.0)
        }),
        "grad_reduce" => run_cases(
            op,
            f32,
            cfg,
            (small_shape(), 1u32..8, 0u64..1000),
            |(dims, axis_mask, seed)| {
                let axes: Vec<usize> = (0..dims.len())
                    .filter(|i| axis_mask & (1 << i) != 0)
                    .collect();
                let axes = if axes.is_empty() { vec![0] } else { axes };
                // Distinct values keep max/min away from ties.
                let n: usize = dims.iter().product();
                let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.37 - 1.0).collect();
                rng::Philox::new(seed, 0).shuffle(&mut v);
                let a = [(v, dims.clone())];
                check(b, &a, &|t| t[0].sum(&axes, false))?;
                check(b, &a, &|t| t[0].mean(&axes, true))?;
                check(b, &a, &|t| t[0].max(&axes, false))?;
                check(b, &a, &|t| t[0].min(&axes, true))?;
                Ok(0.0)
            },
        ),
        "grad_softmax" => run_cases(
            op,
            f32,
            cfg,
            (1usize..5, 1usize..7, 0u64..1000),
            |(rows, cols, seed)| {
                let a = [input(seed, &[rows, cols], -3.0, 3.0, 0.0)];
                check(b, &a, &|t| t[0].softmax())?;
                check(b, &a, &|t| t[0].log_softmax())?;
                // Causal: `rows` queries over `cols + rows − 1` keys, so
                // every row sees a different number of them.
                let scores = [input(seed + 5, &[2, rows, cols + rows - 1], -3.0, 3.0, 0.0)];
                check(b, &scores, &|t| t[0].softmax_causal())?;
                // Fused causal attention: `rows` queries, `rows + 2` keys
                // and values (two from a cache), head width `cols`.
                let qkv = [
                    input(seed + 11, &[2, rows, cols], -1.5, 1.5, 0.0),
                    input(seed + 12, &[2, rows + 2, cols], -1.5, 1.5, 0.0),
                    input(seed + 13, &[2, rows + 2, cols], -1.5, 1.5, 0.0),
                ];
                check(b, &qkv, &|t| t[0].attention_causal(&t[1], &t[2], 0.6))?;
                // With dropout: the same factors drawn forward and backward.
                let dropout = AttentionDropout::new(0.3, seed, 5)?;
                let options = AttentionOptions::new(0.6).with_dropout(dropout);
                check(b, &qkv, &|t| {
                    t[0].attention_causal_with(&t[1], &t[2], &options)
                })?;
                // Two heads side by side, q, k and v the thirds of one
                // tensor (a GPT's fused projection): read where they lie,
                // their gradients placed in one buffer.
                let fused = [input(seed + 14, &[2, rows, 6 * cols], -1.5, 1.5, 0.0)];
                let two = AttentionOptions::new(0.6).with_heads(2);
                check(b, &fused, &|t| {
                    let part = |i: usize| t[0].narrow(2, i * 2 * cols, 2 * cols);
                    part(0)?.attention_causal_with(&part(1)?, &part(2)?, &two)
                })?;
                let labels: Vec<u32> = (0..rows as u64)
                    .map(|i| rng::Philox::new(seed, i).below(cols as u32))
                    .collect();
                check(b, &a, &|t| {
                    let l = Tensor::from_host(HostData::U32(labels.clone()), &[rows], b)?;
                    t[0].softmax_cross_entropy(&l)
                })?;
                let target = input(seed + 7, &[rows, cols], -1.0, 1.0, 0.0);
                check(b, &a, &|t| {
                    let y = Tensor::from_slice(&target.0, &target.1, b)?;
                    Loss::MeanSquaredError.compute(&t[0], &y)
                })?;
                Ok(0.0)
            },
        ),
        "grad_norm" => run_cases(
            op,
            f32,
            cfg,
            (1usize..5, 1usize..40, 0u64..1000),
            |(rows, cols, seed)| {
                let a = [
                    input(seed, &[rows, cols], -3.0, 3.0, 0.0),
                    input(seed + 1, &[cols], 0.5, 2.0, 0.0),
                    input(seed + 2, &[cols], -1.0, 1.0, 0.0),
                ];
                check(b, &a, &|t| t[0].layer_norm(&t[1], &t[2], 1e-3))?;
                // Through a 3-D input, as a transformer's [batch, time, width].
                let x3 = [
                    input(seed + 3, &[2, rows, cols], -3.0, 3.0, 0.0),
                    a[1].clone(),
                    a[2].clone(),
                ];
                check(b, &x3, &|t| t[0].layer_norm(&t[1], &t[2], 1e-3)?.gelu())?;
                Ok(0.0)
            },
        ),
        "grad_embedding" => run_cases(
            op,
            f32,
            cfg,
            (1usize..6, 1usize..9, 1usize..12, 0u64..1000),
            |(vocab, dim, n, seed)| {
                let ids: Vec<u32> = (0..n as u64)
                    .map(|i| rng::Philox::new(seed, i).below(vocab as u32))
                    .collect();
                let a = [input(seed, &[vocab, dim], -2.0, 2.0, 0.0)];
                // Repeated ids: their gradients add up in the table's row.
                check(b, &a, &|t| {
                    let ids = Tensor::from_host(HostData::U32(ids.clone()), &[n], b)?;
                    t[0].embedding(&ids)?.tanh()
                })?;
                Ok(0.0)
            },
        ),
        "grad_linear" => run_cases(
            op,
            f32,
            cfg,
            (1usize..6, 1usize..6, 1usize..6, 1usize..3, 0u64..1000),
            |(m, k, n, batch, seed)| {
                let a = input(seed, &[m, k], -1.0, 1.0, 0.0);
                let w = input(seed + 1, &[k, n], -1.0, 1.0, 0.0);
                let bias = input(seed + 2, &[n], -0.5, 0.5, 0.0);
                check(b, &[a.clone(), w.clone()], &|t| t[0].matmul(&t[1]))?;
                check(b, &[a.clone(), w.clone()], &|t| {
                    t[0].matmul(&t[1].t()?.contiguous()?.t()?)
                })?;
                for act in [Activation::None, Activation::Sigmoid, Activation::Tanh] {
                    check(b, &[a.clone(), w.clone(), bias.clone()], &|t| {
                        t[0].linear(&t[1], Some(&t[2]), act)
                    })?;
                }
                // ReLU: only where no pre-activation is near the kink at 0, so the
                // finite difference does not straddle it.
                let pre = no_grad(|| {
                    let t = |i: &Input| Tensor::from_slice(&i.0, &i.1, b);
                    t(&a)?
                        .linear(&t(&w)?, Some(&t(&bias)?), Activation::None)?
                        .to_vec_f32()
                })?;
                if pre.iter().all(|v| v.abs() > 0.1) {
                    check(b, &[a, w, bias], &|t| {
                        t[0].linear(&t[1], Some(&t[2]), Activation::Relu)
                    })?;
                }
                let x3 = input(seed + 3, &[batch, m, k], -1.0, 1.0, 0.0);
                let y3 = input(seed + 4, &[batch, k, n], -1.0, 1.0, 0.0);
                check(b, &[x3, y3], &|t| {
                    t[0].gemm(&t[1], 0.5, None, Activation::None)
                })?;
                Ok(0.0)
            },
        ),
        "grad_conv" => run_cases(
            op,
            f32,
            cfg,
            (
                1usize..3,
                1usize..3,
                1usize..3,
                3usize..7,
                1usize..3,
                1usize..3,
                0u64..1000,
            ),
            |(n, c, o, hw, k, stride, seed)| {
                let pad = (seed % k as u64) as usize;
                let win = Window2d {
                    kernel: [k, k + 1 - stride.min(k)],
                    stride: [stride, 1],
                    padding: [pad, 0, 0, 0],
                };
                let x = input(seed, &[n, c, hw, hw + 1], -1.0, 1.0, 0.0);
                let w = input(
                    seed + 1,
                    &[o, c, win.kernel[0], win.kernel[1]],
                    -1.0,
                    1.0,
                    0.0,
                );
                let bias = input(seed + 2, &[o], -0.5, 0.5, 0.0);
                for act in [Activation::None, Activation::Tanh] {
                    check(b, &[x.clone(), w.clone(), bias.clone()], &|t| {
                        t[0].conv2d(&t[1], Some(&t[2]), act, &win)
                    })?;
                }
                // Max-pooling: distinct values 5% apart (the finite difference
                // steps by 1%), so no step changes which cell wins.
                let cells = n * c * hw * (hw + 1);
                let mut order: Vec<usize> = (0..cells).collect();
                for i in (1..cells).rev() {
                    order.swap(
                        i,
                        rng::Philox::new(seed, i as u64).below(i as u32 + 1) as usize,
                    );
                }
                let distinct: Vec<f32> = order
                    .iter()
                    .map(|&v| 0.5 * 1.05f32.powi(v as i32))
                    .collect();
                let pool = Window2d {
                    kernel: [k + 1, 2],
                    stride: [stride, 2],
                    padding: [pad.min(k), 1, 0, 0],
                };
                check(b, &[(distinct, vec![n, c, hw, hw + 1])], &|t| {
                    t[0].max_pool2d(&pool)
                })?;
                // Dropout: a fixed mask for a fixed seed, so the gradient is it.
                check(b, &[x], &|t| t[0].dropout(0.3, seed, 7))?;
                Ok(0.0)
            },
        ),
        "grad_model" => run_cases(op, f32, cfg, 0u64..1000, |seed| {
            model_gradients(b, seed)?;
            Ok(0.0)
        }),
        _ => crate::checks::unknown(op, f32, cfg),
    }
}

/// Every layer kind in one model; each parameter's gradient of the
/// cross-entropy loss against central differences.
fn model_gradients<B: Backend>(b: &B, seed: u64) -> Result<(), CaseError> {
    let dense = |units, activation, kernel_init| LayerSpec::Dense {
        units,
        activation,
        kernel_init,
        bias: true,
    };
    let spec = ModelSpec {
        name: "all-layers".into(),
        input: vec![2, 3],
        layers: vec![
            LayerSpec::Flatten,
            dense(5, ActivationSpec::Tanh, Initializer::HeNormal),
            LayerSpec::Sigmoid,
            dense(4, ActivationSpec::Linear, Initializer::HeUniform),
            LayerSpec::LayerNorm {
                eps: 1e-3,
                bias: true,
            },
            LayerSpec::Gelu,
            LayerSpec::Tanh,
            dense(3, ActivationSpec::Sigmoid, Initializer::GlorotUniform),
            LayerSpec::Relu,
            dense(4, ActivationSpec::Softmax, Initializer::GlorotUniform),
        ],
    };
    let model = Sequential::from_spec(&spec, seed, b)?;
    let n = 5;
    let x = Tensor::from_slice(&values(seed + 11, n * 6, -1.0, 1.0, 0.0), &[n, 2, 3], b)?;
    let labels: Vec<u32> = (0..n as u64)
        .map(|i| rng::Philox::new(seed, i).below(4))
        .collect();
    let y = Tensor::from_host(HostData::U32(labels), &[n], b)?;
    check_model(model, 1e-2, seed, |m| {
        Loss::CategoricalCrossEntropy.compute(&m.forward_logits(&x)?, &y)
    })?;

    // A one-block GPT with biases (embeddings, position table, residuals,
    // attention, the tied head): the next-token loss over every position.
    let gpt = GptConfig {
        name: "gpt-gradcheck".into(),
        n_layer: 1,
        n_head: 2,
        n_embd: 8,
        block_size: 5,
        dropout: 0.0,
        bias: true,
    };
    let vocab = 7;
    let model = Sequential::from_spec(&gpt.spec(vocab)?, seed, b)?;
    let (n, t) = (2, 5);
    let draw = |stream: u64| -> Vec<u32> {
        (0..(n * t) as u64)
            .map(|i| rng::Philox::new(seed ^ stream, i).below(vocab as u32))
            .collect()
    };
    let ids = Tensor::from_host(HostData::U32(draw(1)), &[n, t], b)?;
    let next = Tensor::from_host(HostData::U32(draw(2)), &[n * t], b)?;
    // Its weights are N(0, 0.02²) under layer norms: a smaller step.
    check_model(model, 1e-3, seed, |m| {
        m.forward_logits(&ids)?
            .reshape(&[n * t, vocab])?
            .softmax_cross_entropy(&next)
    })
}

/// Elements of each parameter [`check_model`] differentiates numerically
/// per case: every parameter's gradient path is checked in every case, and
/// the cases' seeds pick different elements. (Every element of a GPT costs
/// two forward passes each: thousands of passes a case, minutes on the CUDA
/// host emulation.)
const ELEMENTS_PER_PARAM: usize = 6;

/// Each parameter's gradient of `loss(model)` (a scalar) by autograd
/// against central differences of step `h`, at up to
/// [`ELEMENTS_PER_PARAM`] elements of each parameter drawn from `seed`.
fn check_model<B: Backend>(
    mut model: Sequential<B>,
    h: f32,
    seed: u64,
    loss: impl Fn(&Sequential<B>) -> Result<Tensor<B>>,
) -> Result<(), CaseError> {
    let b = model.params()[0].backend().clone();
    let b = &b;
    let loss_of =
        |m: &Sequential<B>| -> Result<f64> { no_grad(|| Ok(f64::from(loss(m)?.to_scalar_f32()?))) };
    let grads = loss(&model)?.backward()?;
    let analytic: Vec<Vec<f32>> = model
        .params()
        .iter()
        .map(|p| {
            grads
                .get_id(p.id())
                .map(|g| g.to_vec_f32())
                .unwrap_or_else(|| Ok(vec![0.0; p.numel()]))
        })
        .collect::<Result<_>>()?;
    for (pi, ga) in analytic.iter().enumerate() {
        let original = model.params()[pi].value();
        let vals = original.to_vec_f32()?;
        // A partial Fisher–Yates shuffle: distinct elements, the first few.
        let mut order: Vec<usize> = (0..ga.len()).collect();
        let picked = ELEMENTS_PER_PARAM.min(order.len());
        for i in 0..picked {
            let left = (order.len() - i) as u32;
            let r = rng::Philox::new(seed ^ 0x6d6f_64656c, (pi * 64 + i) as u64).below(left);
            order.swap(i, i + r as usize);
        }
        for &j in &order[..picked] {
            let mut eval = |d: f32| -> Result<f64> {
                let mut v = vals.clone();
                v[j] += d;
                model.params_mut()[pi].set(&Tensor::from_slice(&v, original.dims(), b)?)?;
                loss_of(&model)
            };
            let numeric = (eval(h)? - eval(-h)?) / (2.0 * f64::from(h));
            model.params_mut()[pi].set(&original)?;
            let a = f64::from(ga[j]);
            if (a - numeric).abs() > 1e-2 * (1.0 + numeric.abs()) {
                return Err(CaseError::Fail(format!(
                    "parameter {pi} element {j}: autograd {a} vs finite difference {numeric}"
                )));
            }
        }
    }
    Ok(())
}
