//! Dropout inside the fused attention drops what `Tensor::dropout` drops
//! from the stored probabilities with the same stream: on every kernel set,
//! the fused op and the composed ops (scores, causal softmax, dropout,
//! weighted sum) agree forward and in all three gradients — with a
//! cached prefix of keys, rows past one 64-query pass and several problems,
//! whose factors come from their own places in `[batch, T, S]`.

use kiln_core::{AttentionDropout, AttentionOptions, Result, Tensor, Var};
use kiln_cpu::{CpuBackend, KernelSet};

mod common;
use common::values;

/// The output and the gradients of `Σ y∘w` with respect to q, k and v.
fn run(
    b: &CpuBackend,
    (n, t, s, d): (usize, usize, usize, usize),
    attend: impl Fn(
        &Tensor<CpuBackend>,
        &Tensor<CpuBackend>,
        &Tensor<CpuBackend>,
    ) -> Result<Tensor<CpuBackend>>,
) -> Result<[Vec<f32>; 4]> {
    let var = |len, seed| {
        Var::from_tensor(&Tensor::from_slice(
            &values(len, seed),
            &[n, len / n / d, d],
            b,
        )?)
    };
    let (q, k, v) = (var(n * t * d, 1)?, var(n * s * d, 2)?, var(n * s * d, 3)?);
    let w = Tensor::from_slice(&values(n * t * d, 4), &[n, t, d], b)?;
    let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    let y = attend(&q, &k, &v)?;
    let grads = y.mul(&w)?.sum_all()?.backward()?;
    let grad = |x: &Tensor<CpuBackend>| -> Result<Vec<f32>> {
        grads.get(x).expect("a gradient").to_vec_f32()
    };
    Ok([y.to_vec_f32()?, grad(&q)?, grad(&k)?, grad(&v)?])
}

#[test]
fn fused_dropout_matches_dropout_on_the_stored_probabilities() -> Result<()> {
    let sets = KernelSet::ALL
        .into_iter()
        .filter(|s| s.check_available().is_ok());
    for set in sets {
        let b = CpuBackend::with_kernels(set)?;
        for dims in [(3, 5, 7, 4), (2, 70, 73, 16), (1, 1, 9, 33)] {
            let (_, _, _, d) = dims;
            let scale = 1.0 / (d as f32).sqrt();
            let (rate, seed, offset) = (0.3, 17, 1 << 20);
            let options = AttentionOptions::new(scale)
                .with_dropout(AttentionDropout::new(rate, seed, offset)?);
            let fused = run(&b, dims, |q, k, v| q.attention_causal_with(k, v, &options))?;
            let composed = run(&b, dims, |q, k, v| {
                q.matmul(&k.transpose(1, 2)?)?
                    .affine(scale, 0.0)?
                    .softmax_causal()?
                    .dropout(rate, seed, offset)?
                    .matmul(v)
            })?;
            let undropped = run(&b, dims, |q, k, v| q.attention_causal(k, v, scale))?;
            for (what, (f, c)) in ["y", "dq", "dk", "dv"]
                .iter()
                .zip(fused.iter().zip(&composed))
            {
                for (i, (x, y)) in f.iter().zip(c).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "{set:?} {dims:?} {what}[{i}]: fused {x}, composed {y}"
                    );
                }
            }
            // And dropout changed something.
            assert_ne!(fused[0], undropped[0], "{set:?} {dims:?}");
        }
    }
    Ok(())
}
