//! Data-parallel training over an in-process group of ranks (one thread
//! each, `kiln_dist::InProcess`): the trainer's distributed path without a
//! launcher. The same path runs under `mpirun` in kiln-cli's MPI tests.

use std::sync::Arc;

use kiln_core::Error;
use kiln_cpu::CpuBackend;
use kiln_data::{Dataset, Split};
use kiln_dist::{Collective, InProcess};
use kiln_nn::{Adam, Loss, ModelSpec, Sequential};
use kiln_train::{DataParallel, FitConfig, History, Trainer};

mod common;
use common::{cfg, stop_after, weights};

fn trainer(spec: &ModelSpec, seed: u64) -> Trainer<CpuBackend> {
    let b = CpuBackend::reference().with_threads(1).expect("a backend");
    let model = Sequential::from_spec(spec, seed, &b).unwrap();
    Trainer::new(
        model,
        Box::new(Adam::new(1e-3).unwrap()),
        Loss::CategoricalCrossEntropy,
        b,
    )
}

type Run = (kiln_core::Result<History>, Vec<Vec<u8>>);

/// Trains `spec` on `world` ranks, each model built from seed `init`, the
/// first parameter of ranks 1… then zeroed (rank 0's weights must win),
/// each with `cfg` and the replica check on; `tweak` adjusts a rank's settings. Each rank's result and
/// final weights, in rank order.
fn fit_ranks(
    world: usize,
    spec: &ModelSpec,
    init: u64,
    train: &Dataset,
    validation: Option<&Dataset>,
    cfg: &FitConfig,
    tweak: impl Fn(usize, &mut FitConfig) + Sync,
) -> Vec<Run> {
    let ranks = InProcess::group(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                let tweak = &tweak;
                s.spawn(move || {
                    let r = rank.rank();
                    let world: Arc<dyn Collective> = Arc::new(rank);
                    let mut c = cfg.clone();
                    c.distributed = Some(
                        DataParallel::new(world)
                            .bucket_bytes(64 << 10)
                            .verify_replicas(true),
                    );
                    tweak(r, &mut c);
                    let mut t = trainer(spec, init);
                    if r > 0 {
                        // Rank 0's weights must win: the others start elsewhere.
                        let p = &mut t.model_mut().params_mut()[0];
                        let zeros =
                            kiln_core::Tensor::zeros(p.shape().dims(), p.dtype(), p.backend())
                                .unwrap();
                        p.set(&zeros).unwrap();
                    }
                    let h = t.fit(train, validation, &c);
                    (h, weights(&t))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn losses(h: &History) -> Vec<f64> {
    h.epochs.iter().map(|e| e.loss).collect()
}

/// 2 and 3 ranks (shards of 50 and of 33, 33, 34) with global batch 100
/// against one process with batch 100, dropout in the model: the replicas
/// end bit-identical (and were checked after every step), and the loss
/// curve and weights follow the single process's within float rounding —
/// not bit for bit, as each rank sums its shard before the shards are
/// added. Dropout masks match one process's because each rank draws from
/// its first example's place in the stream; unequal shards are weighted by
/// their size.
#[test]
fn ranks_stay_identical_and_train_as_one_process() {
    let train = Dataset::load("mnist-sample", Split::Train, None)
        .unwrap()
        .take(1000);
    let mut c = cfg(3, 4);
    c.batch_size = 100;
    let mut spec = ModelSpec::mlp();
    spec.layers
        .insert(2, kiln_nn::LayerSpec::Dropout { rate: 0.3 });
    let test = Dataset::load("mnist-sample", Split::Test, None)
        .unwrap()
        .take(301);
    let mut alone = trainer(&spec, 42);
    let h = alone.fit(&train, Some(&test), &c).unwrap();
    let single = weights(&alone);
    for world in [2, 3] {
        let runs = fit_ranks(world, &spec, 42, &train, Some(&test), &c, |_, _| {});
        let (h0, w0) = (runs[0].0.as_ref().unwrap(), &runs[0].1);
        for (hr, wr) in &runs[1..] {
            assert!(wr == w0, "the replicas differ");
            assert_eq!(losses(hr.as_ref().unwrap()), losses(h0));
        }
        assert_eq!(h0.epochs[0].processes, Some(world));
        assert!(h0.epochs[0].comm_seconds.unwrap() > 0.0);
        let mut worst = 0f32;
        for (a, b) in w0.iter().zip(&single) {
            let a: &[f32] = bytemuck::cast_slice(a);
            let b: &[f32] = bytemuck::cast_slice(b);
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs());
            }
        }
        eprintln!(
            "{world} ranks against 1 process: losses {:?} / {:?}, weights differ by up to {worst:e}",
            losses(h0),
            losses(&h)
        );
        for (dp, one) in losses(h0).iter().zip(losses(&h)) {
            assert!(
                (dp - one).abs() <= 1e-5 * one.abs(),
                "{world} ranks: loss {dp}, one process: {one}"
            );
        }
        // The validation set, shared among the ranks, scores as in one process.
        for (dp, one) in h0.epochs.iter().zip(&h.epochs) {
            let (l, l1) = (dp.val_loss.unwrap(), one.val_loss.unwrap());
            assert!(
                (l - l1).abs() <= 1e-5 * l1,
                "{world} ranks: val loss {l}, one process {l1}"
            );
            assert_eq!(dp.val_accuracy, one.val_accuracy, "{world} ranks");
        }
        // Adam's steps move each weight by up to lr = 1e-3 each; rounding
        // differences in the gradients move them by far less (and other
        // dropout masks, or shards weighted wrongly, by far more).
        assert!(
            worst < 1e-5,
            "weights differ from one process's by up to {worst}"
        );
    }
}

/// The all-reduces overlapped with the backward pass (the default: buckets
/// planned in reverse parameter order, each reduced on the communication
/// thread once the pass has finished its gradients) and made after the pass
/// add the same numbers: the runs end bit for bit alike — with 4 KiB
/// buckets (many per step), dropout, and, for 3 ranks, an empty shard.
#[test]
fn overlapped_and_after_pass_averaging_agree_bit_for_bit() {
    let train = Dataset::load("mnist-sample", Split::Train, None)
        .unwrap()
        .take(130);
    let mut c = cfg(2, 5);
    c.batch_size = 64;
    let mut spec = ModelSpec::mlp();
    spec.layers
        .insert(2, kiln_nn::LayerSpec::Dropout { rate: 0.2 });
    let small = |c: &mut FitConfig, overlap: bool| {
        let d = c.distributed.take().expect("a distributed run");
        c.distributed = Some(d.bucket_bytes(4 << 10).overlap(overlap));
    };
    for world in [2, 3] {
        let on = fit_ranks(world, &spec, 3, &train, None, &c, |_, c| small(c, true));
        let off = fit_ranks(world, &spec, 3, &train, None, &c, |_, c| small(c, false));
        let (h_on, h_off) = (on[0].0.as_ref().unwrap(), off[0].0.as_ref().unwrap());
        assert_eq!(losses(h_on), losses(h_off), "{world} ranks");
        assert!(on[0].1 == off[0].1, "{world} ranks: the weights differ");
        for (r, w) in on.iter().skip(1) {
            assert!(
                r.is_ok() && w == &on[0].1,
                "{world} ranks: a replica differs"
            );
        }
    }
}

/// 130 examples in batches of 64 leave a last batch of 2 for 3 ranks: one
/// rank's shard is empty, contributes zero gradients, and the replicas
/// still agree; a batch smaller than the world is refused up front.
#[test]
fn an_empty_shard_is_harmless_and_a_too_small_batch_is_refused() {
    let train = Dataset::load("mnist-sample", Split::Train, None)
        .unwrap()
        .take(130);
    let mut c = cfg(1, 9);
    c.batch_size = 64;
    let runs = fit_ranks(3, &ModelSpec::mlp(), 1, &train, None, &c, |_, _| {});
    for (h, w) in &runs {
        assert!(h.as_ref().unwrap().epochs[0].images_per_sec > 0.0);
        assert!(w == &runs[0].1);
    }
    c.batch_size = 2;
    for (h, _) in fit_ranks(3, &ModelSpec::mlp(), 1, &train, None, &c, |_, _| {}) {
        let e = h.unwrap_err().to_string();
        assert!(
            e.contains("batch size 2 cannot be split over 3 processes"),
            "{e}"
        );
    }
}

/// A stop requested on rank 1 alone (after step 8) stops both ranks after
/// the same step — the next one, whose totals carry the request —;
/// rank 0 alone writes the checkpoint and the history; both ranks resume
/// from it and end where an uninterrupted two-rank run ends, bit for bit.
#[test]
fn a_stop_on_one_rank_checkpoints_once_and_resumes_exactly() {
    let train = Dataset::load("mnist-sample", Split::Train, None)
        .unwrap()
        .take(600);
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::mlp();
    let cfg_in = |sub: &str| {
        let mut c = cfg(2, 3);
        c.batch_size = 100;
        c.history_path = Some(dir.path().join(sub).join("history.jsonl"));
        c.checkpoint = Some(kiln_train::CheckpointPolicy {
            dir: dir.path().join(sub).join("checkpoints"),
            every: 0,
            keep: 2,
        });
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        c
    };
    let straight = fit_ranks(2, &spec, 5, &train, None, &cfg_in("a"), |_, _| {});
    let lines = std::fs::read_to_string(dir.path().join("a/history.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2, "one writer: {lines}");

    let stopped = fit_ranks(2, &spec, 5, &train, None, &cfg_in("b"), |r, c| {
        if r == 1 {
            stop_after(c, 8);
        }
    });
    for (h, _) in &stopped {
        match h {
            Err(Error::Interrupted(what)) => assert!(what.contains("batch 3 of 6"), "{what}"),
            other => panic!("expected an interruption, got {other:?}"),
        }
    }
    let saved = std::fs::read_dir(dir.path().join("b/checkpoints"))
        .unwrap()
        .count();
    assert_eq!(saved, 1, "rank 0 alone writes the checkpoint");

    // Both ranks resume from rank 0's checkpoint.
    let ranks = InProcess::group(2);
    let resumed: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                let (train, dir, spec) = (&train, &dir, &spec);
                let mut c = cfg_in("b");
                s.spawn(move || {
                    let world: Arc<dyn Collective> = Arc::new(rank);
                    c.distributed = Some(DataParallel::new(world).verify_replicas(true));
                    let b = CpuBackend::reference().with_threads(1).unwrap();
                    let r = kiln_train::checkpoint::load(&dir.path().join("b/checkpoints"), &b)
                        .unwrap();
                    assert_eq!(r.model.spec(), *spec);
                    let mut t = Trainer::new(
                        r.model,
                        Box::new(Adam::new(1e-3).unwrap()),
                        Loss::CategoricalCrossEntropy,
                        b,
                    );
                    t.load_optimizer_state(&r.optimizer).unwrap();
                    t.resume(train, None, &c, &r.progress).unwrap();
                    weights(&t)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(resumed[0] == resumed[1]);
    assert!(
        resumed[0] == straight[0].1,
        "the resumed run differs from the straight one"
    );
}

/// Ranks started with different data or settings refuse to train, every
/// one of them, naming what differs — instead of averaging gradients of
/// unrelated batches.
#[test]
fn ranks_with_different_data_or_settings_refuse_to_start() {
    let train = Dataset::load("mnist-sample", Split::Train, None)
        .unwrap()
        .take(200);
    let c = cfg(1, 2);
    let runs = fit_ranks(2, &ModelSpec::mlp(), 1, &train, None, &c, |r, c| {
        if r == 1 {
            c.seed = 3;
        }
    });
    for (r, (h, _)) in runs.iter().enumerate() {
        let e = h.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("different training data or settings"),
            "rank {r}: {e}"
        );
        if r == 1 {
            assert!(e.contains("seed 3") && e.contains("seed 2"), "{e}");
        }
    }
}
