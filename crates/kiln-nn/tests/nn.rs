//! Layers, models and optimisers on the reference CPU backend.

use kiln_core::{Tensor, Var};
use kiln_cpu::CpuBackend;
use kiln_nn::{Adam, Initializer, ModelSpec, Optimizer, Sequential, Sgd};

fn backend() -> CpuBackend {
    CpuBackend::reference()
        .with_threads(1)
        .expect("worker threads")
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

#[test]
fn cnn_summary_matches_keras() {
    let m = Sequential::from_spec(&ModelSpec::cnn(), 0, &backend()).unwrap();
    let s = m.summary();
    for want in [
        "conv2d (Conv2D)",
        "(None, 32, 26, 26)",
        "max_pooling2d (MaxPooling2D)",
        "(None, 32, 13, 13)",
        "(None, 5408)",
        "346,176",
        "Total params: 347,146",
    ] {
        assert!(s.contains(want), "missing {want:?} in\n{s}");
    }
}

#[test]
fn the_shipped_model_files_are_the_builtin_models() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models");
    for (file, builtin) in [
        ("mlp.toml", ModelSpec::mlp()),
        ("cnn.toml", ModelSpec::cnn()),
    ] {
        let text = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        assert_eq!(ModelSpec::from_toml(&text).unwrap(), builtin, "{file}");
    }
    // And a spec survives TOML both ways.
    let cnn = ModelSpec::cnn();
    assert_eq!(ModelSpec::from_toml(&cnn.to_toml()).unwrap(), cnn);
}

#[test]
fn toml_specs_with_mistakes_are_clear_errors() {
    let spec = |layers: &str| format!("name = \"t\"\ninput = [1, 28, 28]\n{layers}");
    let err = |layers: &str| ModelSpec::from_toml(&spec(layers)).unwrap_err().to_string();

    let e = err("[[layers]]\ntype = \"conv3d\"\nfilters = 4\n");
    assert!(
        e.contains("conv3d") && e.contains("conv2d"),
        "unknown layer: {e}"
    );

    let e = err("[[layers]]\ntype = \"conv2d\"\nkernel_size = 3\n");
    assert!(e.contains("missing field `filters`"), "missing field: {e}");

    let e = err("[[layers]]\ntype = \"conv2d\"\nfilters = 4\nkernel_size = 3\nstride = 2\n");
    assert!(e.contains("unknown field `stride`"), "misspelt field: {e}");

    let e = err("[[layers]]\ntype = \"conv2d\"\nfilters = 4\nkernel_size = 30\n");
    assert!(
        e.contains("layer 0") && e.contains("smaller than the window"),
        "window too big: {e}"
    );

    let e = err("[[layers]]\ntype = \"dense\"\nunits = 4\n");
    assert!(e.contains("add a Flatten layer"), "dense on an image: {e}");

    let e =
        err("[[layers]]\ntype = \"flatten\"\n[[layers]]\ntype = \"maxpool2d\"\npool_size = 2\n");
    assert!(
        e.contains("layer 1") && e.contains("[channels, height, width]"),
        "pool on flat: {e}"
    );

    let e = err("[[layers]]\ntype = \"dropout\"\nrate = 1.5\n");
    assert!(e.contains("Dropout rate 1.5"), "bad rate: {e}");

    // `same` padding keeps the size; a rectangular window is a pair.
    let ok = ModelSpec::from_toml(&spec(
        "[[layers]]\ntype = \"conv2d\"\nfilters = 8\nkernel_size = [3, 5]\npadding = \"same\"\n",
    ))
    .unwrap();
    assert_eq!(ok.plan().unwrap().0, vec![8, 28, 28]);
}

#[test]
fn dropout_is_active_only_while_training_and_reproducible() {
    let b = backend();
    let spec = ModelSpec {
        name: "d".into(),
        input: vec![1000],
        layers: vec![kiln_nn::LayerSpec::Dropout { rate: 0.25 }],
    };
    let m = Sequential::from_spec(&spec, 3, &b).unwrap();
    let x = Tensor::ones(&[1, 1000], kiln_core::DType::F32, &b).unwrap();
    assert_eq!(
        m.forward(&x).unwrap().to_vec_f32().unwrap(),
        vec![1.0; 1000]
    );
    m.set_training(true);
    let y = m.forward(&x).unwrap().to_vec_f32().unwrap();
    let kept = y.iter().filter(|&&v| v != 0.0).count();
    assert!(
        (700..800).contains(&kept),
        "kept {kept} of 1000 at rate 0.25"
    );
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    // A new draw each call, the same sequence for the same seed.
    let y2 = m.forward(&x).unwrap().to_vec_f32().unwrap();
    assert_ne!(y, y2);
    let again = Sequential::from_spec(&spec, 3, &b).unwrap();
    again.set_training(true);
    assert_eq!(again.forward(&x).unwrap().to_vec_f32().unwrap(), y);
}

/// A forward or backward pass asked to stop is abandoned where it stands —
/// between layers, between graph nodes — and one never asked to stop is the
/// plain pass, bit for bit.
#[test]
fn forward_and_backward_stop_between_ops_when_asked() {
    use std::cell::Cell;
    let b = backend();
    let m = Sequential::from_spec(&ModelSpec::cnn(), 1, &b).unwrap();
    let x = Tensor::random(
        &[2, 1, 28, 28],
        kiln_core::Distribution::Uniform {
            low: 0.0,
            high: 1.0,
        },
        kiln_core::DType::F32,
        3,
        0,
        &b,
    )
    .unwrap();
    let plain = m.forward(&x).unwrap().to_vec_f32().unwrap();
    let never = m.forward_until(&x, || false).unwrap().unwrap();
    assert_eq!(never.to_vec_f32().unwrap(), plain);

    // Asked before each layer: stopping at the third runs two.
    let asked = &Cell::new(0);
    let stop_at = |n: usize| {
        asked.set(0);
        move || {
            asked.set(asked.get() + 1);
            asked.get() > n
        }
    };
    assert!(m.forward_until(&x, stop_at(2)).unwrap().is_none());
    assert_eq!(asked.get(), 3);
    assert!(m.forward_logits_until(&x, stop_at(2)).unwrap().is_none());
    assert_eq!(asked.get(), 3);

    // Backward: asked once per node with a gradient; a stop at any of them
    // returns nothing.
    let loss = m.forward(&x).unwrap().sum_all().unwrap();
    let all = loss.backward_until(stop_at(usize::MAX)).unwrap().unwrap();
    let nodes = asked.get();
    assert!(nodes > 5, "{nodes} nodes");
    assert!(loss.backward_until(stop_at(nodes / 2)).unwrap().is_none());
    assert_eq!(asked.get(), nodes / 2 + 1);
    let again = loss.backward().unwrap();
    for p in m.params() {
        let (a, g) = (all.get_id(p.id()).unwrap(), again.get_id(p.id()).unwrap());
        assert_eq!(a.to_vec_f32().unwrap(), g.to_vec_f32().unwrap());
    }
}

#[test]
fn a_layernorm_gelu_block_normalises_and_counts_its_parameters() {
    let toml = "name = \"block\"\ninput = [12]\n\
        [[layers]]\ntype = \"dense\"\nunits = 16\n\
        [[layers]]\ntype = \"layernorm\"\n\
        [[layers]]\ntype = \"gelu\"\n\
        [[layers]]\ntype = \"layernorm\"\neps = 1e-3\n";
    let spec = ModelSpec::from_toml(toml).unwrap();
    let m = Sequential::from_spec(&spec, 7, &backend()).unwrap();
    assert_eq!(m.num_params(), 12 * 16 + 16 + 2 * 16 + 2 * 16);
    let s = m.summary();
    assert!(s.contains("(LayerNorm)") && s.contains("(GELU)"), "{s}");
    // The spec round-trips, eps included.
    let again = ModelSpec::from_toml(&spec.to_toml()).unwrap();
    assert_eq!(again.to_toml(), spec.to_toml());
    // γ = 1 and β = 0 at first: every output row has mean 0 and variance
    // σ²/(σ² + eps), just under 1.
    let x: Vec<f32> = (0..3 * 12).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let y = m
        .forward(&Tensor::from_slice(&x, &[3, 12], &backend()).unwrap())
        .unwrap()
        .to_vec_f32()
        .unwrap();
    for row in y.chunks(16) {
        let mean = row.iter().sum::<f32>() / 16.0;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 16.0;
        assert!(mean.abs() < 1e-5 && var < 1.0 && var > 0.9, "{mean} {var}");
    }
    // Absurd eps values are refused when the spec is read.
    for eps in ["0.0", "-1e-5", "nan"] {
        let bad = toml.replace("eps = 1e-3", &format!("eps = {eps}"));
        let e = ModelSpec::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("LayerNorm eps"), "{eps}: {e}");
    }
}

#[test]
fn pytorch_adamw_matches_torch_formula_and_skips_masked_decay() {
    let b = backend();
    let p0 = [0.5f32, -1.0, 2.0];
    // Gradients near ε, where the Keras and PyTorch forms differ most.
    let grads_seq = [
        [1e-8f32, -2e-8, 3e-3],
        [5e-9, 4e-8, -1e-3],
        [1e-8, 1e-8, 1e-8],
    ];
    let mut decayed = Var::from_tensor(&Tensor::from_slice(&p0, &[3], &b).unwrap()).unwrap();
    let mut kept = Var::from_tensor(&Tensor::from_slice(&p0, &[3], &b).unwrap()).unwrap();
    let (lr, wd, b1, b2, eps) = (1e-3f64, 0.1f64, 0.9f64, 0.99f64, 1e-8f64);
    let mut opt = Adam::pytorch_adamw(lr as f32, wd as f32)
        .unwrap()
        .with_betas(b1 as f32, b2 as f32, eps as f32)
        .unwrap()
        .with_decay_mask(vec![true, false]);
    let mut keras = Adam::adamw(lr as f32, wd as f32)
        .unwrap()
        .with_betas(b1 as f32, b2 as f32, eps as f32)
        .unwrap();
    let mut keras_var = Var::from_tensor(&Tensor::from_slice(&p0, &[3], &b).unwrap()).unwrap();
    // torch.optim.AdamW, in f64.
    let mut want = [p0.map(f64::from), p0.map(f64::from)];
    let (mut m, mut v) = ([[0f64; 3]; 2], [[0f64; 3]; 2]);
    for (t, g) in grads_seq.iter().enumerate() {
        let gt = Tensor::from_slice(g, &[3], &b).unwrap();
        let loss = decayed
            .as_tensor()
            .mul(&gt)
            .unwrap()
            .add(&kept.as_tensor().mul(&gt).unwrap())
            .unwrap()
            .add(&keras_var.as_tensor().mul(&gt).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&mut [&mut decayed, &mut kept], &grads).unwrap();
        keras.step(&mut [&mut keras_var], &grads).unwrap();
        let t = (t + 1) as i32;
        for (k, p) in want.iter_mut().enumerate() {
            for i in 0..3 {
                let gi = f64::from(g[i]);
                if k == 0 {
                    p[i] *= 1.0 - lr * wd;
                }
                m[k][i] = b1 * m[k][i] + (1.0 - b1) * gi;
                v[k][i] = b2 * v[k][i] + (1.0 - b2) * gi * gi;
                let m_hat = m[k][i] / (1.0 - b1.powi(t));
                let v_hat = v[k][i] / (1.0 - b2.powi(t));
                p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
        }
    }
    for (var, want) in [(&decayed, want[0]), (&kept, want[1])] {
        let got = var.value().to_vec_f32().unwrap();
        for i in 0..3 {
            assert!(
                (f64::from(got[i]) - want[i]).abs() < 2e-6,
                "{got:?} vs {want:?}"
            );
        }
    }
    // The Keras form moves the tiny-gradient elements far less.
    let k = keras_var.value().to_vec_f32().unwrap();
    let moved =
        |x: f32, i: usize| (f64::from(x) - f64::from(p0[i]) * (1.0 - lr * wd).powi(3)).abs();
    assert!(moved(k[0], 0) * 3.0 < (want[0][0] - f64::from(p0[0]) * (1.0 - lr * wd).powi(3)).abs());
    assert_eq!(opt.state(&b).unwrap().kind, "adamw_torch");
    let e = opt
        .step(&mut [&mut decayed], &kiln_core::GradStore::default())
        .unwrap_err();
    assert!(e.to_string().contains("mask covers 2 parameters"), "{e}");
}

#[test]
fn clipping_by_global_norm_and_accumulating_gradients() {
    let b = backend();
    let a = Var::from_tensor(&Tensor::from_slice(&[1.0, 2.0], &[2], &b).unwrap()).unwrap();
    let c = Var::from_tensor(&Tensor::from_slice(&[3.0], &[1], &b).unwrap()).unwrap();
    let grads_of = |ga: [f32; 2], gc: f32| {
        let ta = Tensor::from_slice(&ga, &[2], &b).unwrap();
        let tc = Tensor::from_slice(&[gc], &[1], &b).unwrap();
        a.as_tensor()
            .mul(&ta)
            .unwrap()
            .sum_all()
            .unwrap()
            .add(&c.as_tensor().mul(&tc).unwrap().sum_all().unwrap())
            .unwrap()
            .backward()
            .unwrap()
    };
    let mut g = grads_of([3.0, 0.0], 2.0);
    g.accumulate(grads_of([0.0, 0.0], 2.0)).unwrap(); // [3, 0], [4]: norm 5
    let norm = kiln_nn::clip_grad_norm(&mut g, &[&a, &c], 1.0).unwrap();
    assert_eq!(norm, 5.0);
    let ga = g.get_id(a.id()).unwrap().to_vec_f32().unwrap();
    assert!((ga[0] - 0.6).abs() < 1e-6 && ga[1] == 0.0, "{ga:?}");
    // Under the limit nothing changes.
    let mut g = grads_of([0.3, 0.0], 0.4);
    assert!((kiln_nn::clip_grad_norm(&mut g, &[&a, &c], 1.0).unwrap() - 0.5).abs() < 1e-6);
    assert_eq!(g.get_id(c.id()).unwrap().to_vec_f32().unwrap(), [0.4]);
    assert!(kiln_nn::clip_grad_norm(&mut g, &[&a], f32::NAN).is_err());
}

#[test]
fn explicit_padding_equals_a_valid_convolution_of_the_zero_padded_image() {
    use kiln_core::HostData;
    use kiln_nn::{ActivationSpec::Relu, Padding};
    let b = backend();
    // A PyTorch-style Conv2d(2, 4, 3, stride=2, padding=1) on 2×9×9 images…
    let padded = ModelSpec::new("p", [2, 9, 9])
        .conv2d_padded(4, 3, 2, Padding::Explicit([1, 1]), Relu)
        .build(5, &b)
        .unwrap();
    // …is the same filters (same seed, same shape) on the image padded by hand.
    let valid = ModelSpec::new("v", [2, 11, 11])
        .conv2d_padded(4, 3, 2, Padding::Valid, Relu)
        .build(5, &b)
        .unwrap();
    let image: Vec<f32> = (0..2 * 81)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
        .collect();
    let mut by_hand = vec![0f32; 2 * 121];
    for c in 0..2 {
        for y in 0..9 {
            for x in 0..9 {
                by_hand[c * 121 + (y + 1) * 11 + x + 1] = image[c * 81 + y * 9 + x];
            }
        }
    }
    let run = |m: &Sequential<CpuBackend>, data: Vec<f32>, side: usize| {
        let x = Tensor::from_host(HostData::F32(data), &[1, 2, side, side], &b).unwrap();
        let y = m.forward(&x).unwrap();
        (y.dims().to_vec(), y.to_vec_f32().unwrap())
    };
    let (dims, got) = run(&padded, image, 9);
    assert_eq!(dims, [1, 4, 5, 5]);
    assert_eq!((dims, got), run(&valid, by_hand, 11));
}

#[test]
fn a_state_dict_loads_all_or_nothing_and_names_what_is_wrong() {
    let b = backend();
    let source = ModelSpec::cnn().build(1, &b).unwrap();
    let mut target = ModelSpec::cnn().build(2, &b).unwrap();
    let before = target.state_dict();
    let bias = |m: &Sequential<CpuBackend>| {
        m.param("4.dense.bias")
            .unwrap()
            .value()
            .to_vec_f32()
            .unwrap()
    };

    let mut missing = source.state_dict();
    missing.remove("0.conv2d.bias");
    let e = target.load_state_dict(&missing).unwrap_err().to_string();
    assert!(e.contains("no `0.conv2d.bias`"), "{e}");

    let mut wrong = source.state_dict();
    let cut = wrong["4.dense.bias"].narrow(0, 0, 5).unwrap();
    wrong.insert("4.dense.bias".into(), cut);
    let e = target.load_state_dict(&wrong).unwrap_err().to_string();
    assert!(
        e.contains("`4.dense.bias` is [5]") && e.contains("[10]"),
        "{e}"
    );

    let mut unknown = source.state_dict();
    unknown.insert("9.dense.weight".into(), before["4.dense.bias"].clone());
    let e = target.load_state_dict(&unknown).unwrap_err().to_string();
    assert!(
        e.contains("no parameter `9.dense.weight`") && e.contains("0.conv2d.weight"),
        "{e}"
    );
    // Nothing changed on any failure.
    assert_eq!(bias(&target), before["4.dense.bias"].to_vec_f32().unwrap());

    target.load_state_dict(&source.state_dict()).unwrap();
    assert_eq!(bias(&target), bias(&source));
    let e = target
        .set_param("4.dense.bias", &before["0.conv2d.bias"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("parameter `4.dense.bias`"), "{e}");
}
