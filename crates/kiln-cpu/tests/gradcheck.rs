//! Every differentiable op's backward agrees with central finite differences.
//!
//! The checked scalar is `L = Σ wᵢ·yᵢ` with fixed random weights `w`, so every
//! output element's gradient matters. Function values are f32 (the backend's
//! precision), summed in f64; with step `h` the central difference carries
//! `O(h²)` truncation and `O(u·|L|/h)` rounding error, well inside the
//! tolerance, while a wrong derivative (sign, factor, axis, broadcast) is not.

use kiln_core::{no_grad, rng, Activation, Result, Tensor, UnaryOp, Var};
use kiln_cpu::CpuBackend;
use proptest::prelude::*;

type T = Tensor<CpuBackend>;

fn backend() -> CpuBackend {
    CpuBackend::reference().with_threads(1)
}

/// Values of `n` elements from the seeded stream, spread over `[lo, hi)`, kept
/// at least `gap` away from zero when `gap > 0` (kinks and poles).
fn values(seed: u64, n: usize, lo: f32, hi: f32, gap: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut v = lo + (hi - lo) * rng::uniform(seed, 0, i);
            if gap > 0.0 && v.abs() < gap {
                v = if v < 0.0 { -gap } else { gap };
            }
            v
        })
        .collect()
}

fn weighted_sum(y: &T, w: &[f32]) -> Result<f64> {
    Ok(y.to_vec_f32()?
        .iter()
        .zip(w)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum())
}

/// Checks d/dinputs of `Σ w·f(inputs)` against central differences.
fn gradcheck(
    inputs: &[(Vec<f32>, Vec<usize>)],
    f: &dyn Fn(&[T]) -> Result<T>,
) -> std::result::Result<(), TestCaseError> {
    let b = backend();
    let vars: Vec<Var<CpuBackend>> = inputs
        .iter()
        .map(|(v, d)| Var::from_tensor(&Tensor::from_slice(v, d, &b).unwrap()).unwrap())
        .collect();
    let leaves: Vec<T> = vars.iter().map(Var::as_tensor).collect();
    let y = f(&leaves).unwrap();
    let w = values(99, y.numel(), -1.0, 1.0, 0.0);
    let wt = Tensor::from_slice(&w, y.dims(), &b).unwrap();
    let loss = y.mul(&wt).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (i, (vals, dims)) in inputs.iter().enumerate() {
        let analytic = match grads.get_id(vars[i].id()) {
            Some(g) => g.to_vec_f32().unwrap(),
            None => vec![0.0; vals.len()],
        };
        prop_assert_eq!(analytic.len(), vals.len());
        for j in 0..vals.len() {
            let h = 1e-2 * vals[j].abs().max(0.1);
            let eval = |delta: f32| -> f64 {
                no_grad(|| {
                    let ts: Vec<T> = inputs
                        .iter()
                        .enumerate()
                        .map(|(k, (v, d))| {
                            let mut v = v.clone();
                            if k == i {
                                v[j] += delta;
                            }
                            Tensor::from_slice(&v, d, &b).unwrap()
                        })
                        .collect();
                    weighted_sum(&f(&ts).unwrap(), &w).unwrap()
                })
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * f64::from(h));
            let a = f64::from(analytic[j]);
            let tol = 2e-2 * (1.0 + numeric.abs().max(a.abs()));
            prop_assert!(
                (a - numeric).abs() <= tol,
                "input {i} {dims:?} element {j}: autograd {a} vs finite difference {numeric}"
            );
        }
    }
    Ok(())
}

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..5, 1..4)
}

fn input(seed: u64, dims: &[usize], lo: f32, hi: f32, gap: f32) -> (Vec<f32>, Vec<usize>) {
    (
        values(seed, dims.iter().product(), lo, hi, gap),
        dims.to_vec(),
    )
}

/// `dims` with some extents set to 1 (a broadcast partner), maybe with leading dims dropped.
fn broadcast_partner(dims: &[usize], mask: u32, drop: usize) -> Vec<usize> {
    let d: Vec<usize> = dims
        .iter()
        .enumerate()
        .map(|(i, &x)| if mask & (1 << i) != 0 { 1 } else { x })
        .collect();
    d[drop.min(d.len().saturating_sub(1))..].to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn unary_ops(dims in shape(), seed in 0u64..1000) {
        for op in UnaryOp::ALL {
            let (lo, hi, gap) = match op {
                UnaryOp::Log | UnaryOp::Sqrt => (0.2, 3.0, 0.0),
                UnaryOp::Recip => (-2.0, 2.0, 0.3),
                UnaryOp::Abs | UnaryOp::Relu => (-2.0, 2.0, 0.1),
                _ => (-2.0, 2.0, 0.0),
            };
            gradcheck(&[input(seed, &dims, lo, hi, gap)], &|t| t[0].unary(op))?;
        }
    }

    #[test]
    fn binary_ops_with_broadcasting(dims in shape(), mask in 0u32..8, drop in 0usize..2, seed in 0u64..1000) {
        let other = broadcast_partner(&dims, mask, drop);
        let a = input(seed, &dims, -2.0, 2.0, 0.0);
        let bb = input(seed + 1, &other, -2.0, 2.0, 0.3);
        gradcheck(&[a.clone(), bb.clone()], &|t| t[0].add(&t[1]))?;
        gradcheck(&[a.clone(), bb.clone()], &|t| t[0].sub(&t[1]))?;
        gradcheck(&[bb.clone(), a.clone()], &|t| t[0].mul(&t[1]))?;
        gradcheck(&[a.clone(), bb.clone()], &|t| t[0].div(&t[1]))?;
        // Keep operands apart so max/min have no ties within the step.
        let shifted = (bb.0.iter().map(|v| v + 5.0).collect(), bb.1.clone());
        gradcheck(&[a.clone(), shifted.clone()], &|t| t[0].maximum(&t[1]))?;
        gradcheck(&[shifted, a], &|t| t[0].minimum(&t[1]))?;
    }

    #[test]
    fn affine_and_views(dims in shape(), seed in 0u64..1000) {
        let a = input(seed, &dims, -2.0, 2.0, 0.0);
        gradcheck(std::slice::from_ref(&a), &|t| t[0].affine(-1.5, 0.25))?;
        let rank = dims.len();
        gradcheck(std::slice::from_ref(&a), &|t| t[0].transpose(0, rank - 1)?.contiguous())?;
        gradcheck(std::slice::from_ref(&a), &|t| t[0].reshape(&[t[0].numel()]))?;
        let perm: Vec<usize> = (0..rank).rev().collect();
        gradcheck(std::slice::from_ref(&a), &|t| t[0].permute(&perm))?;
        let last = dims[rank - 1];
        gradcheck(std::slice::from_ref(&a), &|t| t[0].narrow(rank - 1, last / 2, last - last / 2))?;
        gradcheck(std::slice::from_ref(&a), &|t| {
            let mut d = vec![2];
            d.extend_from_slice(t[0].dims());
            t[0].broadcast_as(&d)
        })?;
        gradcheck(&[a], &|t| t[0].unsqueeze(0)?.flatten_from(1))?;
    }

    #[test]
    fn reductions(dims in shape(), axis_mask in 1u32..8, seed in 0u64..1000) {
        let axes: Vec<usize> = (0..dims.len()).filter(|i| axis_mask & (1 << i) != 0).collect();
        let axes = if axes.is_empty() { vec![0] } else { axes };
        // Distinct values keep max/min away from ties.
        let n: usize = dims.iter().product();
        let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.37 - 1.0).collect();
        kiln_core::rng::Philox::new(seed, 0).shuffle(&mut v);
        let a = (v, dims.clone());
        gradcheck(std::slice::from_ref(&a), &|t| t[0].sum(&axes, false))?;
        gradcheck(std::slice::from_ref(&a), &|t| t[0].mean(&axes, true))?;
        gradcheck(std::slice::from_ref(&a), &|t| t[0].max(&axes, false))?;
        gradcheck(&[a], &|t| t[0].min(&axes, true))?;
    }

    #[test]
    fn softmax_family(rows in 1usize..5, cols in 1usize..7, seed in 0u64..1000) {
        let a = input(seed, &[rows, cols], -3.0, 3.0, 0.0);
        gradcheck(std::slice::from_ref(&a), &|t| t[0].softmax())?;
        gradcheck(std::slice::from_ref(&a), &|t| t[0].log_softmax())?;
        let labels: Vec<u32> = (0..rows as u64).map(|i| rng::Philox::new(seed, i).below(cols as u32)).collect();
        let b = backend();
        gradcheck(&[a], &|t| {
            let l = Tensor::from_host(kiln_core::HostData::U32(labels.clone()), &[rows], &b)?;
            t[0].softmax_cross_entropy(&l)
        })?;
    }

    #[test]
    fn matmul_and_fused_linear(m in 1usize..6, k in 1usize..6, n in 1usize..6, seed in 0u64..1000) {
        let a = input(seed, &[m, k], -1.0, 1.0, 0.0);
        let w = input(seed + 1, &[k, n], -1.0, 1.0, 0.0);
        let bias = input(seed + 2, &[n], -0.5, 0.5, 0.0);
        gradcheck(&[a.clone(), w.clone()], &|t| t[0].matmul(&t[1]))?;
        gradcheck(&[a.clone(), w.clone()], &|t| t[0].matmul(&t[1].t()?.contiguous()?.t()?))?;
        for act in [Activation::None, Activation::Sigmoid, Activation::Tanh] {
            gradcheck(&[a.clone(), w.clone(), bias.clone()], &|t| t[0].linear(&t[1], Some(&t[2]), act))?;
        }
        // ReLU: shift the bias away from the kink at 0.
        let wide_bias = (bias.0.iter().map(|v| v * 4.0 + if *v < 0.0 { -0.5 } else { 0.5 }).collect(), bias.1.clone());
        gradcheck(&[a, w, wide_bias], &|t| t[0].linear(&t[1], Some(&t[2]), Activation::Relu))?;
    }

    #[test]
    fn batched_gemm_with_alpha(batch in 1usize..3, m in 1usize..4, k in 1usize..4, n in 1usize..4, seed in 0u64..1000) {
        let a = input(seed, &[batch, m, k], -1.0, 1.0, 0.0);
        let b = input(seed + 1, &[batch, k, n], -1.0, 1.0, 0.0);
        gradcheck(&[a, b], &|t| t[0].gemm(&t[1], 0.5, None, Activation::None))?;
    }
}

#[test]
fn shared_subexpressions_accumulate() {
    // y = x·x + x uses x three times: dy/dx = 2x + 1.
    let b = backend();
    let x = Var::from_tensor(&Tensor::from_slice(&[1.5, -2.0], &[2], &b).unwrap()).unwrap();
    let t = x.as_tensor();
    let y = t.mul(&t).unwrap().add(&t).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap();
    assert_eq!(
        g.get_id(x.id()).unwrap().to_vec_f32().unwrap(),
        vec![4.0, -3.0]
    );
}

#[test]
fn no_graph_is_kept_without_gradients() {
    let b = backend();
    let x = Var::from_tensor(&Tensor::from_slice(&[1.0, 2.0], &[2], &b).unwrap()).unwrap();
    let y = no_grad(|| x.as_tensor().exp().unwrap().sum_all().unwrap());
    assert!(!y.requires_grad());
    assert!(y.backward().is_err());
}
