//! The whole CUDA backend — its typed launchers, grids, views and dtype
//! plumbing, not only the kernels — on the host emulation of a GPU
//! (`kiln_cuda::emulator`): the conformance suite at the suite's own
//! bounds, and training against the CPU backend.
//!
//! Skipped (with a note) where g++ cannot build the emulation, unless
//! `KILN_REQUIRE_HOST_EMULATION=1`.

use std::sync::OnceLock;

use kiln_cuda::CudaBackend;

/// A fresh emulated device (the library is built once): each test has its
/// own, since a device reports a bad softmax-CE label to whichever caller
/// synchronises it next.
fn emulated() -> Option<CudaBackend> {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    let available = AVAILABLE.get_or_init(|| match CudaBackend::emulated() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("KILN_REQUIRE_HOST_EMULATION").is_err(),
                "the CUDA host emulation is required here: {e}"
            );
            eprintln!("skipped: {e}");
            false
        }
    });
    available.then(|| CudaBackend::emulated().expect("built before"))
}

#[test]
fn the_emulated_device_describes_itself() {
    let Some(b) = emulated() else { return };
    let info = b.info();
    assert_eq!(info.compute_capability, (8, 0));
    assert!(info.name.contains("emulation"), "{info}");
    assert!(b.stream().is_none());
}

kiln_conformance::suite!(optional: crate::emulated);

/// The emulation runs exactly the kernels the typed launchers launch, and
/// refuses a launch with the wrong number of parameters or a bad grid.
#[test]
fn the_emulation_holds_every_kernel_and_checks_launches() {
    use kiln_cuda::launcher::Launcher;
    let Some(b) = emulated() else { return };
    drop(b);
    let e = kiln_cuda::emulator::Emulator::build().unwrap();
    let mut held: Vec<&str> = e.kernels().iter().map(String::as_str).collect();
    let mut launched: Vec<&str> = kiln_cuda::launchers::SIGNATURES
        .iter()
        .map(|(k, _)| *k)
        .collect();
    held.sort();
    launched.sort();
    assert_eq!(held, launched);
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n = 0i64;
    let mut args = [std::ptr::from_ref(&n).cast_mut().cast()];
    // SAFETY: refused before any parameter is read.
    let err = unsafe { e.launch("test", "kiln_unary", &cfg, &mut args) }
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("takes 4 parameters") && err.contains("passed 1"),
        "{err}"
    );
    let bad = cudarc::driver::LaunchConfig {
        grid_dim: (0, 1, 1),
        ..cfg
    };
    let mut none: [*mut std::ffi::c_void; 0] = [];
    // SAFETY: refused before anything runs.
    let err = unsafe { e.launch("test", "kiln_missing", &bad, &mut none) }
        .unwrap_err()
        .to_string();
    assert!(err.contains("no kernel `kiln_missing`"), "{err}");
}

/// The seed's MLP and CNN train three SGD steps on the emulated device and
/// on the CPU: the same losses and weights, within float rounding.
#[test]
fn the_mlp_and_the_cnn_train_as_on_the_cpu() {
    use kiln_core::Backend;
    use kiln_data::{Dataset, Split};
    use kiln_nn::{Loss, ModelSpec, Sequential, Sgd};
    use kiln_train::{FitConfig, Trainer, Verbosity};
    let Some(gpu) = emulated() else { return };
    let cpu = kiln_cpu::CpuBackend::reference();
    let train = Dataset::load("mnist-sample", Split::Train, None)
        .unwrap()
        .take(96);
    let cfg = FitConfig {
        epochs: 1,
        batch_size: 32,
        seed: 5,
        verbosity: Verbosity::Silent,
        ..FitConfig::default()
    };
    fn fit<B: Backend>(
        spec: &ModelSpec,
        b: B,
        train: &Dataset,
        cfg: &FitConfig,
    ) -> (f64, Vec<Vec<f32>>) {
        let model = Sequential::from_spec(spec, 3, &b).unwrap();
        let sgd = Box::new(Sgd::new(0.05, 0.9).unwrap());
        let mut t = Trainer::new(model, sgd, Loss::CategoricalCrossEntropy, b);
        let h = t.fit(train, None, cfg).unwrap();
        let w = t
            .model()
            .params()
            .iter()
            .map(|p| p.value().to_vec_f32().unwrap())
            .collect();
        (h.epochs[0].loss, w)
    }
    for spec in [ModelSpec::mlp(), ModelSpec::cnn()] {
        let (gl, gw) = fit(&spec, gpu.clone(), &train, &cfg);
        let (cl, cw) = fit(&spec, cpu.clone(), &train, &cfg);
        assert!(
            (gl - cl).abs() <= 1e-5 * cl.abs(),
            "{}: loss {gl} on the emulated device, {cl} on the CPU",
            spec.name
        );
        for (i, (g, c)) in gw.iter().zip(&cw).enumerate() {
            let worst = g
                .iter()
                .zip(c)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-5,
                "{}: parameter {i} differs by {worst}",
                spec.name
            );
        }
    }
}

#[test]
fn a_gpt_trains_and_generates_as_on_the_cpu() {
    use kiln_core::Backend;
    use kiln_data::text::TextCorpus;
    use kiln_nn::{Adam, GptConfig, LrSchedule, Sequential};
    use kiln_train::lm::{LmFitConfig, LmTrainer};
    use kiln_train::{generate, SampleConfig, Verbosity};
    let Some(gpu) = emulated() else { return };
    let cpu = kiln_cpu::CpuBackend::reference();
    let corpus = TextCorpus::from_text(
        "pangram",
        &"the quick brown fox jumps over the lazy dog. ".repeat(8),
    )
    .unwrap();
    let gpt = GptConfig {
        name: "gpt-emulated".into(),
        n_layer: 1,
        n_head: 2,
        n_embd: 16,
        block_size: 8,
        dropout: 0.1,
        bias: true,
    };
    let cfg = LmFitConfig {
        iters: 6,
        batch_size: 3,
        accumulate: 2,
        eval_every: 3,
        eval_iters: 1,
        schedule: LrSchedule::WarmupCosine {
            peak: 3e-3,
            min: 3e-4,
            warmup: 2,
            decay: 6,
        },
        verbosity: Verbosity::Silent,
        ..LmFitConfig::default()
    };
    fn fit<B: Backend>(
        gpt: &GptConfig,
        b: B,
        corpus: &TextCorpus,
        cfg: &LmFitConfig,
    ) -> (f64, Vec<Vec<f32>>, String) {
        let model = Sequential::from_spec(&gpt.spec(corpus.vocab().len()).unwrap(), 4, &b).unwrap();
        let opt = Adam::pytorch_adamw(3e-3, 0.1).unwrap();
        let mut t = LmTrainer::new(model, opt, corpus.vocab().clone(), b).unwrap();
        let h = t.fit(corpus, cfg).unwrap();
        let w = t
            .model()
            .params()
            .iter()
            .map(|p| p.value().to_vec_f32().unwrap())
            .collect();
        let greedy = SampleConfig {
            tokens: 12,
            temperature: 0.0,
            ..SampleConfig::default()
        };
        let text = generate(t.model(), t.vocab(), "the ", &greedy)
            .unwrap()
            .text;
        (h.last().unwrap().val_loss, w, text)
    }
    let (gl, gw, gtext) = fit(&gpt, gpu, &corpus, &cfg);
    let (cl, cw, ctext) = fit(&gpt, cpu, &corpus, &cfg);
    assert!(
        (gl - cl).abs() <= 1e-4 * cl.abs(),
        "loss {gl} on the emulated device, {cl} on the CPU"
    );
    for (i, (g, c)) in gw.iter().zip(&cw).enumerate() {
        let worst = g
            .iter()
            .zip(c)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-4, "parameter {i} differs by {worst}");
    }
    assert_eq!(gtext, ctext, "greedy samples differ");
}

/// Softmax-CE checks labels on the device, without copying them to the
/// host: a label out of range is reported by the next download (or
/// synchronisation), once, and the device goes on working.
#[test]
fn a_bad_label_is_reported_at_the_next_synchronisation() {
    use kiln_core::{Backend, HostData, Layout, Shape, View};
    let Some(b) = emulated() else { return };
    let logits = b.upload(&HostData::F32(vec![0.5; 6])).unwrap();
    let labels = b.upload(&HostData::U32(vec![1, 3])).unwrap();
    let (lx, ly) = (
        Layout::contiguous(Shape::new(&[2, 3]).unwrap()),
        Layout::contiguous(Shape::new(&[2]).unwrap()),
    );
    let (loss, _grad) = b
        .softmax_cross_entropy(View::new(&logits, &lx), View::new(&labels, &ly))
        .unwrap();
    let e = b.download(View::new(&loss, &ly)).unwrap_err().to_string();
    assert!(e.contains("row 1") && e.contains("outside 0..3"), "{e}");
    // Reported once; good labels work again.
    b.synchronize().unwrap();
    let good = b.upload(&HostData::U32(vec![1, 2])).unwrap();
    let (loss, _) = b
        .softmax_cross_entropy(View::new(&logits, &lx), View::new(&good, &ly))
        .unwrap();
    let l = b.download(View::new(&loss, &ly)).unwrap();
    assert!(
        l.to_f32_vec().iter().all(|v| (v - 3f32.ln()).abs() < 1e-6),
        "{l:?}"
    );
}

/// A strided operand is compacted by a copy kernel before the op runs: an
/// extra pass over memory that the backend counts as a slow path.
#[test]
fn a_strided_operand_is_counted_as_a_slow_path() {
    use kiln_core::{Backend, HostData, Layout, Shape, UnaryOp, View};
    let Some(b) = emulated() else { return };
    let x = b.upload(&HostData::F32(vec![0.25; 12])).unwrap();
    let l = Layout::contiguous(Shape::new(&[3, 4]).unwrap());
    b.unary(UnaryOp::Exp, View::new(&x, &l)).unwrap();
    assert_eq!(b.slow_paths(), vec![]);
    let t = l.transpose(0, 1).unwrap();
    b.unary(UnaryOp::Exp, View::new(&x, &t)).unwrap();
    let seen = b.slow_paths();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((seen[0].op.as_str(), seen[0].calls), ("exp", 1));
    assert!(seen[0].reason.contains("strided"), "{seen:?}");
}

/// Attention reads heads side by side where a fused projection puts them
/// — q, k and v thirds of one `[n, rows, 3·h·D]` tensor — with no copy
/// kernel (no slow path counted), and computes the bits of the same
/// problems with their heads first copied into the batch.
#[test]
fn attention_reads_heads_in_place_with_the_bits_of_heads_folded() {
    use kiln_core::attention::{attention_backward_heads_folded, attention_heads_folded};
    use kiln_core::{AttentionDropout, AttentionOptions, Backend, HostData, Layout, Shape, View};
    let Some(b) = emulated() else { return };
    let layout = |dims: &[usize]| Layout::contiguous(Shape::new(dims).unwrap());
    let values = |n: usize, salt: usize| -> HostData {
        HostData::F32(
            (0..n)
                .map(|i| ((i * 37 + salt * 11) % 23) as f32 / 11.0 - 1.0)
                .collect(),
        )
    };
    // (examples, queries, keys, heads, head width)
    for (n, t, s, h, d) in [(2, 5, 7, 3, 4), (1, 9, 9, 2, 8), (3, 1, 4, 4, 2)] {
        let w = h * d;
        let qbuf = b.upload(&values(n * t * 3 * w, 1)).unwrap();
        let kvbuf = b.upload(&values(n * s * 3 * w, 2)).unwrap();
        let dybuf = b.upload(&values(n * t * w, 3)).unwrap();
        let ql = layout(&[n, t, 3 * w]).narrow(2, 0, w).unwrap();
        let kl = layout(&[n, s, 3 * w]).narrow(2, w, w).unwrap();
        let vl = layout(&[n, s, 3 * w]).narrow(2, 2 * w, w).unwrap();
        let dyl = layout(&[n, t, w]);
        let (q, k, v, dy) = (
            View::new(&qbuf, &ql),
            View::new(&kvbuf, &kl),
            View::new(&kvbuf, &vl),
            View::new(&dybuf, &dyl),
        );
        for dropout in [None, Some(AttentionDropout::new(0.25, 7, 3).unwrap())] {
            let mut options = AttentionOptions::new(0.3).with_heads(h);
            options.dropout = dropout;
            let before = b.slow_paths();
            let y = b.attention_causal(q, k, v, &options).unwrap();
            let g = b.attention_causal_backward(q, k, v, dy, &options).unwrap();
            assert_eq!(
                b.slow_paths(),
                before,
                "heads read in place: no copy kernel"
            );
            let fy = attention_heads_folded(&b, [q, k, v], &options, |[q, k, v], o| {
                b.attention_causal(q, k, v, o)
            })
            .unwrap();
            let fg = attention_backward_heads_folded(&b, [q, k, v, dy], &options, |x, o| {
                let [q, k, v, dy] = x;
                b.attention_causal_backward(q, k, v, dy, o)
            })
            .unwrap();
            let (yl, kl) = (layout(&[n, t, w]), layout(&[n, s, w]));
            for (what, x, fx, l) in [
                ("y", &y, &fy, &yl),
                ("dq", &g.dq, &fg.dq, &yl),
                ("dk", &g.dk, &fg.dk, &kl),
                ("dv", &g.dv, &fg.dv, &kl),
            ] {
                let bits = |x| -> Vec<u32> {
                    let x = b.download(View::new(x, l)).unwrap().to_f32_vec();
                    x.iter().map(|v| v.to_bits()).collect()
                };
                assert_eq!(
                    bits(x),
                    bits(fx),
                    "{what} of n {n} t {t} s {s} heads {h} d {d}, dropout {dropout:?}"
                );
            }
        }
    }
}
