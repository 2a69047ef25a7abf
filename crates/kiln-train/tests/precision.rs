//! Mixed-precision training: f32 master weights with bf16/f16 compute,
//! dynamic loss scaling for f16, and exact resume of both.

use kiln_core::{DType, Tensor};
use kiln_cpu::{CpuBackend, KernelSet};
use kiln_data::{Dataset, Split};
use kiln_nn::{Adam, Loss, ModelSpec, Precision, Sequential};
use kiln_train::{loss_scale, FitConfig, LossScaler, Trainer};

mod common;
use common::weights;

fn backend() -> CpuBackend {
    CpuBackend::with_kernels(KernelSet::best())
        .unwrap()
        .with_threads(2)
        .expect("worker threads")
}

fn trainer(spec: &ModelSpec, precision: Precision, seed: u64) -> Trainer<CpuBackend> {
    let b = backend();
    let mut model = Sequential::from_spec(spec, seed, &b).unwrap();
    model.set_precision(precision);
    Trainer::new(
        model,
        Box::new(Adam::new(1e-3).unwrap()),
        Loss::CategoricalCrossEntropy,
        b,
    )
}

/// The fits here order examples by seed 7.
fn cfg(epochs: usize) -> FitConfig {
    common::cfg(epochs, 7)
}

#[test]
fn reduced_precision_computes_in_the_reduced_type_and_keeps_f32_weights() {
    let b = backend();
    let mut model = Sequential::from_spec(&ModelSpec::cnn(), 3, &b).unwrap();
    let x = Tensor::random(
        &[4, 1, 28, 28],
        kiln_core::Distribution::Uniform {
            low: 0.0,
            high: 1.0,
        },
        DType::F32,
        1,
        0,
        &b,
    )
    .unwrap();
    let want = model.forward_logits(&x).unwrap().to_vec_f32().unwrap();
    for p in [Precision::Bf16, Precision::F16] {
        model.set_precision(p);
        let out = model.forward_logits(&x).unwrap();
        assert_eq!(out.dtype(), p.compute_dtype());
        // The logits agree with f32 to the reduced type's precision.
        let got = out.to_vec_f32().unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tol = if p == Precision::Bf16 { 0.05 } else { 0.01 } * scale;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= tol, "{p}: {g} vs {w} (tolerance {tol})");
        }
        // The loss's gradient reaches the f32 weights as f32.
        let y = Tensor::from_host(kiln_core::HostData::U32(vec![1, 2, 3, 4]), &[4], &b).unwrap();
        let loss = Loss::CategoricalCrossEntropy
            .compute(&out.cast(DType::F32).unwrap(), &y)
            .unwrap();
        let grads = loss.backward().unwrap();
        for v in model.params() {
            assert_eq!(v.dtype(), DType::F32);
            let g = grads.get_id(v.id()).expect("every weight gets a gradient");
            assert_eq!(g.dtype(), DType::F32, "{p}");
        }
    }
}

/// The seed CNN on the bundled sample, 3 epochs, in f32 and in bf16: the
/// same accuracy to within a point (the Fashion-MNIST comparison, 10 epochs
/// over 4 seeds, is in the README).
#[test]
fn bf16_training_tracks_f32() {
    let train = Dataset::load("mnist-sample", Split::Train, None).unwrap();
    let test = Dataset::load("mnist-sample", Split::Test, None).unwrap();
    let mut acc = Vec::new();
    for p in [Precision::F32, Precision::Bf16] {
        let mut t = trainer(&ModelSpec::cnn(), p, 42);
        let h = t.fit(&train, None, &cfg(3)).unwrap();
        assert!(h.epochs.iter().all(|e| e.precision == p.name()));
        assert!(h.epochs.iter().all(|e| e.loss_scale.is_none()));
        acc.push(t.evaluate(&test, 500).unwrap().accuracy);
    }
    eprintln!("cnn 3 epochs: f32 {:.4}, bf16 {:.4}", acc[0], acc[1]);
    assert!(acc[1] >= 0.93, "bf16 accuracy {:.4}", acc[1]);
    assert!(
        (acc[0] - acc[1]).abs() <= 0.01,
        "f32 {:.4} vs bf16 {:.4}",
        acc[0],
        acc[1]
    );
}

/// Too large a scale overflows f16: those steps are skipped (weights and
/// optimiser untouched), the scale halves until it fits, and the skips are
/// counted in the history.
#[test]
fn f16_overflow_skips_steps_and_backs_the_scale_off() {
    let train = Dataset::load("mnist-sample", Split::Train, None).unwrap();
    let test = Dataset::load("mnist-sample", Split::Test, None).unwrap();
    let huge = LossScaler {
        scale: 2f32.powi(40),
        ..LossScaler::default()
    };

    // One batch at a scale that overflows: the step is skipped.
    let mut t = trainer(&ModelSpec::mlp(), Precision::F16, 1);
    let before = weights(&t);
    let mut one = cfg(1);
    one.loss_scale = huge;
    let h = t.fit(&train.take(128), None, &one).unwrap();
    assert_eq!(h.epochs[0].skipped_steps, Some(1));
    assert_eq!(h.epochs[0].loss_scale, Some(2f64.powi(39)));
    assert!(weights(&t) == before, "a skipped step changed the weights");
    assert_eq!(t.optimizer().state(&backend()).unwrap().step, 0);

    // A whole run: it backs off, then learns.
    let mut t = trainer(&ModelSpec::mlp(), Precision::F16, 1);
    let mut run = cfg(3);
    run.loss_scale = huge;
    let h = t.fit(&train, None, &run).unwrap();
    let skipped = h.epochs[0].skipped_steps.unwrap();
    let scale = h.epochs[0].loss_scale.unwrap();
    eprintln!("skipped {skipped} steps, scale now {scale}");
    assert!((1..40).contains(&skipped), "skipped {skipped}");
    // Logit gradients are at most 1/128 of the scale: it must have backed
    // off at least to where they fit f16 (2¹⁶·128 = 2²³).
    assert!((1.0..=2f64.powi(23)).contains(&scale), "scale {scale}");
    assert_eq!(h.epochs[2].skipped_steps, Some(0));
    let acc = t.evaluate(&test, 500).unwrap().accuracy;
    assert!(acc >= 0.88, "f16 accuracy {acc:.4}");
}

#[test]
fn the_scaler_grows_after_a_run_of_finite_steps() {
    let train = Dataset::load("mnist-sample", Split::Train, None).unwrap();
    let mut t = trainer(&ModelSpec::mlp(), Precision::F16, 1);
    let mut c = cfg(1);
    c.loss_scale = LossScaler {
        scale: 256.0,
        good_steps: loss_scale::GROWTH_INTERVAL - 10,
        skipped_this_epoch: 0,
    };
    let h = t.fit(&train, None, &c).unwrap();
    assert_eq!(h.epochs[0].skipped_steps, Some(0));
    assert_eq!(h.epochs[0].loss_scale, Some(512.0));
}

/// An f16 run stopped during its second step and resumed ends bit for bit where an
/// uninterrupted one does — loss scale, skip counts and weights included;
/// a resume at another precision is refused.
#[test]
fn f16_resume_is_bit_identical_and_keeps_its_precision() {
    let train = Dataset::load("mnist-sample", Split::Train, None)
        .unwrap()
        .take(1000);
    let dir = tempfile::tempdir().unwrap();
    let with = |sub: &str| {
        let mut c = cfg(2);
        c.loss_scale = LossScaler {
            scale: 2f32.powi(30),
            ..LossScaler::default()
        };
        c.checkpoint = Some(kiln_train::CheckpointPolicy {
            dir: dir.path().join(sub),
            every: 1,
            keep: 1,
        });
        c
    };
    let mut straight = trainer(&ModelSpec::mlp(), Precision::F16, 5);
    let full = straight.fit(&train, None, &with("a")).unwrap();
    assert!(full.epochs[0].skipped_steps.unwrap() > 0);

    let mut c = with("b");
    common::stop_after(&mut c, 1);
    let mut stopped = trainer(&ModelSpec::mlp(), Precision::F16, 5);
    stopped.fit(&train, None, &c).unwrap_err();
    let r = kiln_train::checkpoint::load(&dir.path().join("b"), &backend()).unwrap();
    assert_eq!(r.progress.precision, "f16");
    assert_eq!(r.model.precision(), Precision::F16);
    assert_eq!(r.progress.loss_scale.unwrap().skipped_this_epoch, 1);
    let mut again = Trainer::new(
        r.model,
        Box::new(Adam::new(1e-3).unwrap()),
        Loss::CategoricalCrossEntropy,
        backend(),
    );
    again.load_optimizer_state(&r.optimizer).unwrap();
    let resumed = again.resume(&train, None, &with("b"), &r.progress).unwrap();
    assert!(
        weights(&again) == weights(&straight),
        "the resumed f16 run differs"
    );
    assert_eq!(resumed.epochs, {
        let mut e = full.epochs.clone();
        for (r, f) in e.iter_mut().zip(&resumed.epochs) {
            // Timings and memory are measured, not replayed.
            (r.seconds, r.images_per_sec) = (f.seconds, f.images_per_sec);
            (r.peak_rss_bytes, r.energy_joules) = (f.peak_rss_bytes, f.energy_joules);
        }
        e
    });

    let r = kiln_train::checkpoint::load(&dir.path().join("b"), &backend()).unwrap();
    let mut model = r.model;
    model.set_precision(Precision::Bf16);
    let mut t = Trainer::new(
        model,
        Box::new(Adam::new(1e-3).unwrap()),
        Loss::CategoricalCrossEntropy,
        backend(),
    );
    t.load_optimizer_state(&r.optimizer).unwrap();
    let e = t
        .resume(&train, None, &with("b"), &r.progress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("precision f16") && e.contains("bf16"), "{e}");
}
