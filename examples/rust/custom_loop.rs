//! A training loop written by hand: parameters as `Var`s, a forward pass
//! of tensor ops, `backward`, and an optimiser step — fitting
//! y = 3·x₀ − 2·x₁ + 1 by linear regression. Then the same step with
//! gradients computed elsewhere and handed to the optimiser.
//!
//! `cargo run -p kiln-examples --example custom_loop`

use kiln_core::{GradStore, Result, Tensor, Var};
use kiln_cpu::CpuBackend;
use kiln_nn::{Adam, Optimizer};

fn main() -> Result<()> {
    let b = CpuBackend::new()?;
    // 64 examples of two features, and their targets.
    let xs: Vec<f32> = (0..128)
        .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
        .collect();
    let ys: Vec<f32> = xs
        .chunks(2)
        .map(|x| 3.0 * x[0] - 2.0 * x[1] + 1.0)
        .collect();
    let x = Tensor::from_slice(&xs, &[64, 2], &b)?;
    let y = Tensor::from_slice(&ys, &[64, 1], &b)?;

    // Parameters: leaves autograd tracks.
    let mut w = Var::from_tensor(&Tensor::from_slice(&[0.0, 0.0], &[2, 1], &b)?)?;
    let mut bias = Var::from_tensor(&Tensor::from_slice(&[0.0], &[1], &b)?)?;
    let mut opt = Adam::new(0.1)?;

    let mut loss_value = f32::INFINITY;
    for step in 0..300 {
        // Forward: mean squared error of x·w + b.
        let pred = x.matmul(&w.as_tensor())?.add(&bias.as_tensor())?;
        let loss = pred.sub(&y)?.square()?.mean_all()?;
        loss_value = loss.to_scalar_f32()?;
        // Backward: the gradient of every Var the loss depends on.
        let grads = loss.backward()?;
        opt.step(&mut [&mut w, &mut bias], &grads)?;
        if step % 100 == 0 {
            println!("step {step:3}: loss {loss_value:.6}");
        }
    }
    let (wv, bv) = (w.value().to_vec_f32()?, bias.value().to_vec_f32()?);
    println!("w = {wv:?}, b = {bv:?}, loss {loss_value:.2e}");
    assert!(
        loss_value < 1e-4,
        "the fit did not converge: loss {loss_value}"
    );
    assert!((wv[0] - 3.0).abs() < 0.01 && (wv[1] + 2.0).abs() < 0.01 && (bv[0] - 1.0).abs() < 0.01);

    // Gradients from elsewhere (another process's average, a hand-written
    // derivative): put them in a GradStore under each Var's id.
    let before = w.value().to_vec_f32()?;
    let mut known = GradStore::default();
    known.insert(w.id(), Tensor::from_slice(&[1.0, -1.0], &[2, 1], &b)?);
    known.insert(bias.id(), Tensor::from_slice(&[0.0], &[1], &b)?);
    opt.step(&mut [&mut w, &mut bias], &known)?;
    let after = w.value().to_vec_f32()?;
    assert!(
        after[0] < before[0] && after[1] > before[1],
        "a step against the given gradient"
    );

    // And a backward pass seeded with an upstream gradient (a loss
    // computed outside kiln): d(pred)/d(w) contracted with it.
    let pred = x.matmul(&w.as_tensor())?;
    let upstream = Tensor::from_slice(&vec![1.0 / 64.0; 64], &[64, 1], &b)?;
    let grads = pred.backward_from(&upstream)?;
    let gw = grads.get_id(w.id()).expect("w was reached").to_vec_f32()?;
    let mean_x0 = xs.chunks(2).map(|x| x[0]).sum::<f32>() / 64.0;
    assert!((gw[0] - mean_x0).abs() < 1e-5, "{gw:?} vs {mean_x0}");
    println!("ok");
    Ok(())
}
