//! Language-model training: it learns, it resumes bit for bit, it samples
//! the same text with and without the key/value cache.

use kiln_cpu::CpuBackend;
use kiln_data::text::TextCorpus;
use kiln_nn::{Adam, GptConfig, LrSchedule, Sequential};
use kiln_train::lm::{LmCheckpointPolicy, LmFitConfig, LmTrainer};
use kiln_train::{generate, SampleConfig, Verbosity};

fn corpus() -> TextCorpus {
    // A text with structure a tiny model learns in a few dozen steps.
    let verse =
        "the quick brown fox jumps over the lazy dog.\nsphinx of black quartz, judge my vow.\n";
    TextCorpus::from_text("pangrams", &verse.repeat(40)).unwrap()
}

fn cfg() -> GptConfig {
    GptConfig {
        name: "gpt-test".into(),
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        block_size: 16,
        dropout: 0.1,
        bias: false,
    }
}

fn fit_cfg(iters: u64) -> LmFitConfig {
    LmFitConfig {
        iters,
        batch_size: 8,
        accumulate: 2,
        seed: 3,
        eval_every: 50,
        eval_iters: 2,
        schedule: LrSchedule::WarmupCosine {
            peak: 3e-3,
            min: 3e-4,
            warmup: iters.min(5),
            decay: iters,
        },
        grad_clip: Some(1.0),
        verbosity: Verbosity::Silent,
        ..LmFitConfig::default()
    }
}

fn trainer(b: &CpuBackend, c: &TextCorpus) -> LmTrainer<CpuBackend> {
    let model = Sequential::from_spec(&cfg().spec(c.vocab().len()).unwrap(), 7, b).unwrap();
    let opt = Adam::pytorch_adamw(3e-3, 0.1)
        .unwrap()
        .with_betas(0.9, 0.99, 1e-8)
        .unwrap();
    LmTrainer::new(model, opt, c.vocab().clone(), b.clone()).unwrap()
}

fn weights(t: &LmTrainer<CpuBackend>) -> Vec<Vec<f32>> {
    t.model()
        .params()
        .iter()
        .map(|p| p.value().to_vec_f32().unwrap())
        .collect()
}

#[test]
fn a_tiny_gpt_learns_and_resumes_bit_for_bit() {
    let b = CpuBackend::new().unwrap();
    let c = corpus();
    let dir = tempfile::tempdir().unwrap();
    let mut whole = trainer(&b, &c);
    let mut fc = fit_cfg(100);
    fc.checkpoint = Some(LmCheckpointPolicy {
        dir: dir.path().to_path_buf(),
        every: 50,
        keep: 5,
    });
    let history = whole.fit(&c, &fc).unwrap();
    assert_eq!(history.len(), 2);
    let ln_vocab = (c.vocab().len() as f64).ln();
    assert!(history[1].val_loss < 0.5 * ln_vocab, "{history:?}");
    assert!(history[1].tokens_per_sec > 0.0 && history[1].step_loss.is_finite());

    // Resume from step 50 and finish: the same weights, bit for bit.
    let ckpt = dir.path().join("ckpt-000000050.safetensors");
    let opt = Adam::pytorch_adamw(3e-3, 0.1)
        .unwrap()
        .with_betas(0.9, 0.99, 1e-8)
        .unwrap();
    let mut resumed = LmTrainer::resume(&ckpt, opt, b.clone()).unwrap();
    assert_eq!(resumed.progress().unwrap().iter, 50);
    let again = resumed.fit(&c, &fc).unwrap();
    assert_eq!(weights(&resumed), weights(&whole));
    assert_eq!(again.len(), 2);
    assert_eq!(again[1].val_loss, history[1].val_loss);

    // Other settings on resume are refused, not silently used.
    let opt = Adam::pytorch_adamw(3e-3, 0.1).unwrap();
    let mut other = LmTrainer::resume(&ckpt, opt, b.clone()).unwrap();
    let mut changed = fc.clone();
    changed.batch_size = 4;
    let e = other.fit(&c, &changed).unwrap_err().to_string();
    assert!(e.contains("resume with the same settings"), "{e}");
    // A truncated checkpoint is a clear error.
    let bytes = std::fs::read(&ckpt).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let opt = Adam::pytorch_adamw(3e-3, 0.1).unwrap();
    let e = LmTrainer::resume(&cut, opt, b.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("cut.safetensors") && e.contains("truncated"),
        "{e}"
    );

    // Sampling: the cache picks what recomputation picks, within a block.
    let greedy = SampleConfig {
        tokens: 12,
        temperature: 0.0,
        ..SampleConfig::default()
    };
    let fast = generate(whole.model(), whole.vocab(), "the ", &greedy).unwrap();
    let slow = generate(
        whole.model(),
        whole.vocab(),
        "the ",
        &SampleConfig {
            cache: false,
            ..greedy.clone()
        },
    )
    .unwrap();
    assert_eq!(fast.completion, slow.completion);
    assert_eq!(fast.completion.chars().count(), 12);
    // Past the block, and sampled: reproducible from the seed.
    let sampled = SampleConfig {
        tokens: 40,
        ..SampleConfig::default()
    };
    let one = generate(whole.model(), whole.vocab(), "sphinx", &sampled).unwrap();
    let two = generate(whole.model(), whole.vocab(), "sphinx", &sampled).unwrap();
    assert_eq!(one.text, two.text);
    assert!(one.text.starts_with("sphinx") && one.new_tokens == 40);
    // Characters the model never saw, an empty prompt, absurd settings.
    let e = generate(whole.model(), whole.vocab(), "ZEBRA", &sampled)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'Z'") && e.contains("vocabulary"), "{e}");
    assert!(generate(whole.model(), whole.vocab(), "", &sampled).is_err());
    let bad = SampleConfig {
        temperature: f32::NAN,
        ..sampled.clone()
    };
    assert!(generate(whole.model(), whole.vocab(), "the", &bad).is_err());
    let bad = SampleConfig {
        top_k: Some(0),
        ..sampled.clone()
    };
    assert!(generate(whole.model(), whole.vocab(), "the", &bad).is_err());
    // A model whose logits overflow (every token vector at 1e38: the
    // first layer norm's sums are ∞) is an error, not a run of whatever
    // token wins among NaNs — with and without the cache.
    let vocab = whole.vocab().len();
    let mut broken = Sequential::from_spec(&cfg().spec(vocab).unwrap(), 1, &b).unwrap();
    let table = broken
        .param("0.embedding.table")
        .unwrap()
        .value()
        .dims()
        .to_vec();
    let huge = kiln_core::Tensor::full(&table, 1e38, kiln_core::DType::F32, &b).unwrap();
    broken.set_param("0.embedding.table", &huge).unwrap();
    for cache in [true, false] {
        let e = generate(
            &broken,
            whole.vocab(),
            "the",
            &SampleConfig {
                cache,
                ..sampled.clone()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(kiln_train::generate::NOT_FINITE)
                && e.contains("after 0 generated tokens"),
            "{e}"
        );
    }
}

#[test]
fn bad_runs_are_clear_errors() {
    let b = CpuBackend::reference();
    let c = corpus();
    let mut t = trainer(&b, &c);
    let mut fc = fit_cfg(4);
    fc.eval_every = 0;
    assert!(t
        .fit(&c, &fc)
        .unwrap_err()
        .to_string()
        .contains("--eval-every"));
    // A corpus with another vocabulary.
    let other = TextCorpus::from_text("digits", &"0123456789".repeat(50)).unwrap();
    let e = t.fit(&other, &fit_cfg(4)).unwrap_err().to_string();
    assert!(e.contains("vocabulary"), "{e}");
    // A text shorter than a block.
    let short = TextCorpus::from_text("short", "abc").unwrap();
    let m = Sequential::from_spec(&cfg().spec(3).unwrap(), 0, &b).unwrap();
    let mut t = LmTrainer::new(
        m,
        Adam::new(1e-3).unwrap(),
        short.vocab().clone(),
        b.clone(),
    )
    .unwrap();
    let e = t.fit(&short, &fit_cfg(4)).unwrap_err().to_string();
    assert!(e.contains("at least 17"), "{e}");
    // A model that does not read tokens.
    let mlp = Sequential::from_spec(&kiln_nn::ModelSpec::mlp(), 0, &b).unwrap();
    assert!(LmTrainer::new(mlp, Adam::new(1e-3).unwrap(), c.vocab().clone(), b).is_err());
}

/// A GPT (dropout off) on 2 in-process ranks, each with 4 of every
/// micro-batch's 8 sequences and 2 micro-batches a step: its replicas
/// stay bit-identical (checked after every step) and its losses follow one
/// process's within float rounding.
#[test]
fn a_gpt_trains_data_parallel_as_in_one_process() {
    use std::sync::Arc;
    let c = corpus();
    let mut g = cfg();
    g.dropout = 0.0;
    let make = |b: &CpuBackend| {
        let model = Sequential::from_spec(&g.spec(c.vocab().len()).unwrap(), 7, b).unwrap();
        let opt = Adam::pytorch_adamw(3e-3, 0.1).unwrap();
        LmTrainer::new(model, opt, c.vocab().clone(), b.clone()).unwrap()
    };
    let b = CpuBackend::reference().with_threads(1).unwrap();
    let mut alone = make(&b);
    let one = alone.fit(&c, &fit_cfg(12)).unwrap();
    let ranks = kiln_dist::InProcess::group(2);
    let runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                let (c, make) = (&c, &make);
                s.spawn(move || {
                    let mut cfg = fit_cfg(12);
                    cfg.distributed =
                        Some(kiln_train::DataParallel::new(Arc::new(rank)).verify_replicas(true));
                    let b = CpuBackend::reference().with_threads(1).unwrap();
                    let mut t = make(&b);
                    let h = t.fit(c, &cfg).unwrap();
                    (h, weights(&t))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(runs[0].1 == runs[1].1, "the replicas differ");
    let (two, _) = &runs[0];
    assert_eq!(two.len(), one.len());
    for (a, b) in two.iter().zip(&one) {
        assert!(
            (a.val_loss - b.val_loss).abs() <= 1e-4 * b.val_loss,
            "2 ranks {} / 1 process {}",
            a.val_loss,
            b.val_loss
        );
        assert_eq!(a.processes, Some(2));
    }
}
