//! Layers, models and optimisers on the reference CPU backend.

use kiln_core::{Tensor, Var};
use kiln_cpu::CpuBackend;
use kiln_nn::{Adam, Initializer, ModelSpec, Optimizer, Sequential, Sgd};

fn backend() -> CpuBackend {
    CpuBackend::reference().with_threads(1)
}

#[test]
fn mlp_summary_matches_keras() {
    let m = Sequential::from_spec(&ModelSpec::mlp(), 0, &backend()).unwrap();
    let s = m.summary();
    assert_eq!(m.num_params(), 784 * 64 + 64 + 64 * 10 + 10);
    for needle in [
        "flatten (Flatten)",
        "(None, 784)",
        "dense (Dense)",
        "(None, 64)",
        "50,240",
        "dense_1 (Dense)",
        "(None, 10)",
        "650",
        "Total params: 50,890",
    ] {
        assert!(s.contains(needle), "summary lacks {needle:?}:\n{s}");
    }
}

#[test]
fn glorot_uniform_respects_its_limit_and_seed() {
    let b = backend();
    let a = Initializer::GlorotUniform
        .init(&[784, 64], 784, 64, 7, 0, &b)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let again = Initializer::GlorotUniform
        .init(&[784, 64], 784, 64, 7, 0, &b)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert_eq!(a, again);
    let limit = (6.0f32 / (784.0 + 64.0)).sqrt();
    assert!(a.iter().all(|v| v.abs() <= limit));
    let var = a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32;
    assert!(
        (var - limit * limit / 3.0).abs() < 0.05 * limit * limit / 3.0,
        "{var}"
    );
}

// Gradients of every layer and loss against finite differences are checked
// by kiln-conformance (`grad_model` and friends), on every backend.

#[test]
fn adam_matches_the_keras_formula() {
    let b = backend();
    let p0 = [0.5f32, -1.0, 2.0];
    let grads_seq = [[0.1f32, -0.2, 0.3], [0.05, 0.4, -0.1]];
    let mut var = Var::from_tensor(&Tensor::from_slice(&p0, &[3], &b).unwrap()).unwrap();
    let mut adam = Adam::new(1e-3).unwrap();
    // f64 reference.
    let (mut p, mut m, mut v) = (p0.map(f64::from), [0f64; 3], [0f64; 3]);
    for (t, g) in grads_seq.iter().enumerate() {
        let gt = Tensor::from_slice(g, &[3], &b).unwrap();
        let loss = var.as_tensor().mul(&gt).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        adam.step(&mut [&mut var], &grads).unwrap();
        let t = (t + 1) as i32;
        let lr_t = 1e-3 * (1.0 - 0.999f64.powi(t)).sqrt() / (1.0 - 0.9f64.powi(t));
        for i in 0..3 {
            let gi = f64::from(g[i]);
            m[i] = 0.9 * m[i] + 0.1 * gi;
            v[i] = 0.999 * v[i] + 0.001 * gi * gi;
            p[i] -= lr_t * m[i] / (v[i].sqrt() + 1e-7);
        }
    }
    let got = var.value().to_vec_f32().unwrap();
    for i in 0..3 {
        assert!((f64::from(got[i]) - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
    }
    assert_eq!(adam.steps(), 2);
}

#[test]
fn sgd_momentum_two_steps() {
    let b = backend();
    let mut var = Var::from_tensor(&Tensor::from_slice(&[1.0], &[1], &b).unwrap()).unwrap();
    let mut sgd = Sgd::new(0.1, 0.9).unwrap();
    for _ in 0..2 {
        // d/dp of p² is 2p.
        let loss = var.as_tensor().square().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        sgd.step(&mut [&mut var], &g).unwrap();
    }
    // v1 = 2, p1 = 0.8; v2 = 0.9·2 + 1.6 = 3.4, p2 = 0.8 − 0.34 = 0.46
    assert!((var.value().to_scalar_f32().unwrap() - 0.46).abs() < 1e-6);
}

#[test]
fn bad_specs_and_inputs_are_clear_errors() {
    let b = backend();
    let mut spec = ModelSpec::mlp();
    spec.layers.remove(0);
    let e = Sequential::from_spec(&spec, 0, &b)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("add a Flatten layer"), "{e}");
    assert!(ModelSpec::builtin("resnet").is_err());
    assert!(
        ModelSpec::from_json(r#"{"name":"x","input":[4],"layers":[{"type":"conv9"}]}"#).is_err()
    );
    let m = Sequential::from_spec(&ModelSpec::mlp(), 0, &b).unwrap();
    let x = Tensor::zeros(&[2, 28, 28], kiln_core::DType::F32, &b).unwrap();
    let e = m.forward(&x).unwrap_err().to_string();
    assert!(e.contains("[n, 1, 28, 28]"), "{e}");
    assert!(Adam::<CpuBackend>::new(-1.0).is_err());
    let spec_json = ModelSpec::mlp().to_json();
    assert_eq!(ModelSpec::from_json(&spec_json).unwrap(), ModelSpec::mlp());
}
