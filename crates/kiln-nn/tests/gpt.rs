//! The GPT decoder built from a spec: shapes, spec round trips, the KV
//! cache against full recomputation, and clear errors.

use kiln_core::{no_grad, HostData, Tensor};
use kiln_cpu::CpuBackend;
use kiln_nn::{DecodeState, GptConfig, ModelSpec, Sequential};

fn tiny(bias: bool, dropout: f32) -> GptConfig {
    GptConfig {
        name: "tiny".into(),
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        block_size: 12,
        dropout,
        bias,
    }
}

fn ids(b: &CpuBackend, n: usize, t: usize, vocab: u32) -> Tensor<CpuBackend> {
    let v: Vec<u32> = (0..(n * t) as u32).map(|i| (i * 7 + 3) % vocab).collect();
    Tensor::from_host(HostData::U32(v), &[n, t], b).unwrap()
}

#[test]
fn the_spec_expands_round_trips_and_summarises() {
    let b = CpuBackend::reference();
    let cfg = tiny(true, 0.1);
    let again = GptConfig::from_toml(&cfg.to_toml()).unwrap();
    assert_eq!(again, cfg);
    let spec = cfg.spec(11).unwrap();
    // The expanded layer list is an ordinary spec: TOML and JSON round trips.
    assert_eq!(ModelSpec::from_toml(&spec.to_toml()).unwrap(), spec);
    assert_eq!(ModelSpec::from_json(&spec.to_json()).unwrap(), spec);
    let m = Sequential::from_spec(&spec, 1, &b).unwrap();
    assert_eq!(m.output_shape().unwrap(), [12, 11]);
    assert_eq!(m.spec(), spec);
    let (_, planned) = spec.plan().unwrap();
    assert_eq!(m.num_params(), planned);
    let summary = m.summary();
    assert!(
        summary.contains("residual (Residual)") && summary.contains("lm_head (LmHead)"),
        "{summary}"
    );
    // The tied head owns nothing: the token table appears once.
    let names: Vec<String> = m.named_params().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names.iter().filter(|n| n.contains("table")).count(),
        2,
        "{names:?}"
    );
    assert!(
        names.contains(&"3.residual.1.attention.qkv_weight".to_string()),
        "{names:?}"
    );
    // Two attention streams and four residual dropouts plus the embedding's.
    assert_eq!(m.rng_positions().len(), 2 + 4 + 1);
}

#[test]
fn the_kv_cache_matches_recomputing_the_context() {
    for backend in [CpuBackend::reference(), CpuBackend::new().unwrap()] {
        let cfg = tiny(false, 0.0);
        let m = Sequential::from_spec(&cfg.spec(13).unwrap(), 5, &backend).unwrap();
        let (n, t) = (2, 10);
        let x = ids(&backend, n, t, 13);
        let full = no_grad(|| m.forward(&x)).unwrap().to_vec_f32().unwrap();
        let mut state = DecodeState::new(cfg.block_size);
        // A prompt of 4 positions, then one position at a time.
        m.decode(&x.narrow(1, 0, 4).unwrap(), &mut state).unwrap();
        for p in 4..t {
            let step = m.decode(&x.narrow(1, p, 1).unwrap(), &mut state).unwrap();
            let want: Vec<f32> = (0..n)
                .flat_map(|e| full[(e * t + p) * 13..(e * t + p + 1) * 13].to_vec())
                .collect();
            let step = step.to_vec_f32().unwrap();
            for (a, w) in step.iter().zip(&want) {
                assert!(
                    (a - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "position {p}: {a} vs {w}"
                );
            }
        }
        assert_eq!(state.position(), t);
        let e = m
            .decode(&ids(&backend, n, 3, 13), &mut state)
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit the context of 12"), "{e}");
        state.reset();
        assert!(m.decode(&ids(&backend, n, 3, 13), &mut state).is_ok());
        let e = m
            .decode(&ids(&backend, 3, 1, 13), &mut state)
            .unwrap_err()
            .to_string();
        assert!(e.contains("new batch size"), "{e}");
    }
}

#[test]
fn bad_gpt_specs_and_inputs_are_clear_errors() {
    let b = CpuBackend::reference();
    let mut cfg = tiny(false, 0.0);
    cfg.n_head = 3;
    assert!(cfg
        .spec(5)
        .unwrap_err()
        .to_string()
        .contains("must divide n_embd"));
    let e = GptConfig::from_toml("name = \"x\"\n[gpt]\nn_layer = 1\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing field"), "{e}");
    assert!(
        GptConfig::from_toml("[gpt]\nn_layer=1\nn_head=1\nn_embd=4\nblock_size=4\nwidth=3\n")
            .is_err()
    );
    let m = Sequential::from_spec(&tiny(false, 0.0).spec(5).unwrap(), 0, &b).unwrap();
    // Too long a context, floats instead of ids, an id outside the vocabulary.
    let e = m.forward(&ids(&b, 1, 13, 5)).unwrap_err().to_string();
    assert!(e.contains("positions ≤ 12"), "{e}");
    let e = m
        .forward(&Tensor::zeros(&[1, 4], kiln_core::DType::F32, &b).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("u32"), "{e}");
    let bad = Tensor::from_host(HostData::U32(vec![0, 9]), &[1, 2], &b).unwrap();
    assert!(m.forward(&bad).is_err());
    // A head with no table before it, a residual that changes the shape.
    let e = ModelSpec::from_toml("name = \"h\"\ninput = [4]\n[[layers]]\ntype = \"lm_head\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no Embedding") || e.contains("has none"), "{e}");
    let e = ModelSpec::from_toml(
        "name = \"r\"\ninput = [4, 8]\n[[layers]]\ntype = \"residual\"\n[[layers.layers]]\ntype = \"dense\"\nunits = 3\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("must keep the shape") && e.contains("layer 0"),
        "{e}"
    );
    // Residuals nested past the limit are refused, not recursed into.
    let mut layer = serde_json::json!({"type": "relu"});
    for _ in 0..20 {
        layer = serde_json::json!({"type": "residual", "layers": [layer]});
    }
    let spec = serde_json::json!({"name": "deep", "input": [4], "layers": [layer]}).to_string();
    let e = ModelSpec::from_json(&spec)
        .unwrap()
        .plan()
        .unwrap_err()
        .to_string();
    assert!(e.contains("nest at most 16"), "{e}");
}

#[test]
fn a_gpt_step_takes_no_slow_path() {
    let b = CpuBackend::new().unwrap();
    let m = Sequential::from_spec(&tiny(true, 0.0).spec(13).unwrap(), 5, &b).unwrap();
    let before = kiln_core::Backend::slow_paths(&b);
    let labels = Tensor::from_host(HostData::U32(vec![1; 24]), &[24], &b).unwrap();
    let loss = m
        .forward(&ids(&b, 2, 12, 13))
        .unwrap()
        .reshape(&[24, 13])
        .unwrap()
        .softmax_cross_entropy(&labels)
        .unwrap();
    loss.backward().unwrap();
    let after = kiln_core::Backend::slow_paths(&b);
    assert_eq!(kiln_core::slow_path::since(&before, &after), vec![]);
}
