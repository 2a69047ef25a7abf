//! Layers, models and optimisers on the reference CPU backend.

use kiln_core::{no_grad, rng, HostData, Tensor, Var};
use kiln_cpu::CpuBackend;
use kiln_nn::{
    ActivationSpec, Adam, Initializer, LayerSpec, Loss, ModelSpec, Optimizer, Sequential, Sgd,
};

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

/// Every layer kind in one model; every parameter's gradient of the loss
/// checked against central differences.
#[test]
fn model_gradients_match_finite_differences() {
    let b = backend();
    let spec = ModelSpec {
        name: "all-layers".into(),
        input: vec![2, 3],
        layers: vec![
            LayerSpec::Flatten,
            LayerSpec::Dense {
                units: 5,
                activation: ActivationSpec::Tanh,
                kernel_init: Initializer::HeNormal,
            },
            LayerSpec::Sigmoid,
            LayerSpec::Dense {
                units: 4,
                activation: ActivationSpec::Linear,
                kernel_init: Initializer::HeUniform,
            },
            LayerSpec::Tanh,
            LayerSpec::Dense {
                units: 3,
                activation: ActivationSpec::Sigmoid,
                kernel_init: Initializer::GlorotUniform,
            },
            LayerSpec::Relu,
            LayerSpec::Dense {
                units: 4,
                activation: ActivationSpec::Softmax,
                kernel_init: Initializer::GlorotUniform,
            },
        ],
    };
    let mut model = Sequential::from_spec(&spec, 3, &b).unwrap();
    let n = 5;
    let x: Vec<f32> = (0..n * 6)
        .map(|i| rng::uniform(11, 0, i as u64) * 2.0 - 1.0)
        .collect();
    let x = Tensor::from_slice(&x, &[n, 2, 3], &b).unwrap();
    let y = Tensor::from_host(HostData::U32(vec![0, 3, 1, 2, 3]), &[n], &b).unwrap();
    let loss_of = |m: &Sequential<CpuBackend>| -> f64 {
        no_grad(|| {
            f64::from(
                Loss::CategoricalCrossEntropy
                    .compute(&m.forward_logits(&x).unwrap(), &y)
                    .unwrap()
                    .to_scalar_f32()
                    .unwrap(),
            )
        })
    };
    // The probabilities path agrees with the logits path.
    let p = model.forward(&x).unwrap().to_vec_f32().unwrap();
    let direct: f64 = (0..n)
        .map(|i| -f64::from(p[i * 4 + [0, 3, 1, 2, 3][i]]).ln())
        .sum::<f64>()
        / n as f64;
    assert!((direct - loss_of(&model)).abs() < 1e-5);

    let loss = Loss::CategoricalCrossEntropy
        .compute(&model.forward_logits(&x).unwrap(), &y)
        .unwrap();
    let grads = loss.backward().unwrap();
    let analytic: Vec<Vec<f32>> = model
        .params()
        .iter()
        .map(|p| {
            grads
                .get_id(p.id())
                .expect("every parameter gets a gradient")
                .to_vec_f32()
                .unwrap()
        })
        .collect();
    for (pi, ga) in analytic.iter().enumerate() {
        for j in 0..ga.len() {
            let original = model.params()[pi].value();
            let values = original.to_vec_f32().unwrap();
            let h = 1e-2f32;
            let mut eval = |d: f32| {
                let mut v = values.clone();
                v[j] += d;
                let t = Tensor::from_slice(&v, original.dims(), &b).unwrap();
                model.params_mut()[pi].set(&t).unwrap();
                loss_of(&model)
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * f64::from(h));
            model.params_mut()[pi].set(&original).unwrap();
            let a = f64::from(ga[j]);
            assert!(
                (a - numeric).abs() <= 1e-2 * (1.0 + numeric.abs()),
                "param {pi} element {j}: {a} vs {numeric}"
            );
        }
    }
}

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
