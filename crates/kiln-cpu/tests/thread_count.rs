//! The ops the worker threads split — elementwise maps over many tasks,
//! broadcast rows and columns cut at whole rows, gradients, batches of
//! small products, fused attention, Adam's update — give the same bits on 1, 2 and 3 threads, on every
//! SIMD set this processor has.

use kiln_core::{Activation, Backend, ReduceOp, Result, Tensor, UnaryOp, View};
use kiln_cpu::{CpuBackend, KernelSet};

fn sets() -> Vec<KernelSet> {
    KernelSet::ALL
        .into_iter()
        .filter(|s| *s != KernelSet::Scalar && s.check_available().is_ok())
        .collect()
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (h >> 8) as f32 / (1u32 << 24) as f32 * 6.0 - 3.0
        })
        .collect()
}

/// Three AdamW steps on `n` parameters (split over the workers past 32k):
/// the parameters and both moments afterwards.
fn adam_steps(b: &CpuBackend, n: usize) -> Result<[Vec<f32>; 3]> {
    let up = |v: Vec<f32>| b.upload(&kiln_core::HostData::F32(v));
    let (mut p, mut m, mut v) = (up(values(n, 9))?, up(vec![0.0; n])?, up(vec![0.0; n])?);
    for step in 1..=3 {
        let g = up(values(n, 10 + step as u32))?;
        let s = kiln_core::AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            decoupled: true,
            step,
        };
        b.adam_update(&mut p, &g, &mut m, &mut v, &s)?;
    }
    Ok([p.to_f32_vec(), m.to_f32_vec(), v.to_f32_vec()])
}

/// Every split op's output on backend `b`, as bits.
fn outputs(b: &CpuBackend) -> Result<Vec<Vec<u32>>> {
    // 301 rows of 331: about three tasks' worth, rows not a power of two.
    let (rows, cols) = (301, 331);
    let x = Tensor::from_slice(&values(rows * cols, 1), &[rows, cols], b)?;
    let y = Tensor::from_slice(&values(rows * cols, 2), &[rows, cols], b)?;
    let row = Tensor::from_slice(&values(cols, 3), &[cols], b)?;
    let col = Tensor::from_slice(&values(rows, 4), &[rows, 1], b)?;
    let gelu = x.gelu()?;
    let dgelu = b.unary_backward(UnaryOp::Gelu, x.view(), gelu.view(), y.view())?;
    let dtanh = {
        let t = x.tanh()?;
        b.unary_backward(UnaryOp::Tanh, x.view(), t.view(), y.view())?
    };
    let stored = |s: <CpuBackend as Backend>::Storage| -> Result<Vec<f32>> {
        let layout = kiln_core::Layout::contiguous(x.shape().clone());
        Ok(b.download(View::new(&s, &layout))?.to_f32_vec())
    };
    // 48 products of [64, 32] · [32, 64]: one attention layer's heads.
    let q = Tensor::from_slice(&values(48 * 64 * 32, 5), &[48, 64, 32], b)?;
    let k = Tensor::from_slice(&values(48 * 64 * 32, 6), &[48, 64, 32], b)?;
    let scores = q.gemm(&k.transpose(1, 2)?, 0.125, None, Activation::None)?;
    // The fused causal attention and its gradients, with dropout on the
    // probabilities: one problem per task.
    let v = Tensor::from_slice(&values(48 * 64 * 32, 8), &[48, 64, 32], b)?;
    let options = kiln_core::AttentionOptions::new(0.125)
        .with_dropout(kiln_core::AttentionDropout::new(0.2, 11, 3)?);
    let attended = q.attention_causal_with(&k, &v, &options)?;
    let grads = b.attention_causal_backward(q.view(), k.view(), v.view(), v.view(), &options)?;
    let heads = |s: <CpuBackend as Backend>::Storage| -> Result<Vec<f32>> {
        let layout = kiln_core::Layout::contiguous(q.shape().clone());
        Ok(b.download(View::new(&s, &layout))?.to_f32_vec())
    };
    // Rows past the row-block height (split into blocks of even height per
    // thread count), k past one k block, a bias and ReLU epilogue.
    let a = Tensor::from_slice(&values(517 * 300, 7), &[517, 300], b)?;
    let product = a.linear(&x.narrow(0, 0, 300)?, Some(&row), Activation::Relu)?;
    let [p, m, v] = adam_steps(b, rows * cols)?;
    let all = [
        p,
        m,
        v,
        gelu.to_vec_f32()?,
        stored(dgelu)?,
        stored(dtanh)?,
        x.exp()?.to_vec_f32()?,
        x.relu()?.to_vec_f32()?,
        x.affine(0.5, -1.25)?.to_vec_f32()?,
        x.mul(&y)?.to_vec_f32()?,
        x.add(&row)?.to_vec_f32()?,
        row.broadcast_as(&[rows, cols])?.sub(&x)?.to_vec_f32()?,
        x.div(&col)?.to_vec_f32()?,
        col.broadcast_as(&[rows, cols])?.maximum(&x)?.to_vec_f32()?,
        x.reduce(ReduceOp::Sum, &[0, 1], false)?.to_vec_f32()?,
        scores.to_vec_f32()?,
        attended.to_vec_f32()?,
        heads(grads.dq)?,
        heads(grads.dk)?,
        heads(grads.dv)?,
        product.to_vec_f32()?,
        // A strided gather big enough to be split among threads.
        x.transpose(0, 1)?.contiguous()?.to_vec_f32()?,
    ];
    Ok(all
        .iter()
        .map(|v| v.iter().map(|f| f.to_bits()).collect())
        .collect())
}

#[test]
fn split_ops_give_the_same_bits_on_any_thread_count() {
    for set in sets() {
        let on = |threads: usize| {
            let b = CpuBackend::with_kernels(set)
                .unwrap()
                .with_threads(threads)
                .expect("worker threads");
            outputs(&b).unwrap()
        };
        let one = on(1);
        for threads in [2, 3] {
            let other = on(threads);
            for (i, (a, b)) in one.iter().zip(&other).enumerate() {
                assert!(a == b, "{set:?}: output {i} differs on {threads} threads");
            }
        }
        assert_eq!(one[0].len(), 301 * 331);
    }
}

#[test]
fn split_ops_match_the_reference_loops_in_f32() {
    // Exact ops are bitwise the reference's on every set and split.
    let reference = CpuBackend::reference();
    for set in sets() {
        let b = CpuBackend::with_kernels(set)
            .unwrap()
            .with_threads(3)
            .unwrap();
        let (rows, cols) = (301, 331);
        let data = values(rows * cols, 7);
        let r = values(cols, 8);
        let on = |be: &CpuBackend| -> Vec<f32> {
            let x = Tensor::from_slice(&data, &[rows, cols], be).unwrap();
            let row = Tensor::from_slice(&r, &[cols], be).unwrap();
            x.add(&row).unwrap().relu().unwrap().to_vec_f32().unwrap()
        };
        assert_eq!(on(&b), on(&reference), "{set:?}");
        // Adam's update, split over three threads: sqrt and division are
        // correctly rounded, so the set's loop is the reference's.
        let n = 100_003;
        assert_eq!(
            adam_steps(&b, n).unwrap(),
            adam_steps(&reference, n).unwrap(),
            "{set:?}: Adam"
        );
    }
}
