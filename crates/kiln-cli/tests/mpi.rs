//! Data-parallel `kiln train` under a real `mpirun` (Open MPI), as a user
//! runs it: replicas that train like one process, a killed rank, a rank
//! that fails alone, and Ctrl-C to the launcher. Built only with the `mpi`
//! feature; `mpirun` missing skips these tests unless KILN_REQUIRE_MPI is
//! set (ci/test.sh sets it and installs Open MPI).
#![cfg(feature = "mpi")]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `mpirun` and its flags for this machine (root in CI, 2 cores), or `None`
/// (the test skips) when Open MPI is missing and not required.
fn mpirun() -> Option<Command> {
    let found = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("KILN_REQUIRE_MPI").is_none(),
            "KILN_REQUIRE_MPI is set but mpirun is missing: install openmpi-bin"
        );
        eprintln!("skipping: no mpirun (apt-get install openmpi-bin libopenmpi-dev)");
        return None;
    }
    let mut c = Command::new("mpirun");
    // --timeout: a regression into a hang fails the test instead of CI.
    c.args(["--allow-run-as-root", "--oversubscribe", "--timeout", "180"])
        // One worker thread per rank: the ranks share this machine's cores.
        .env("KILN_THREADS", "1");
    Some(c)
}

/// `kiln ARGS` on `np` ranks; `None` when skipping.
fn on_ranks(np: usize, args: &[&str]) -> Option<Output> {
    let mut c = mpirun()?;
    c.args(["-np", &np.to_string(), env!("CARGO_BIN_EXE_kiln")])
        .args(args);
    Some(c.output().expect("running mpirun"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `(loss, val_accuracy)` of each epoch record in `dir/history.jsonl`.
fn history(dir: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(dir.join("history.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["loss"].as_f64().unwrap(),
                v["val_accuracy"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "train", "--model", "mlp", "--limit", "4000", "--plain", "--out", out,
    ];
    a.extend_from_slice(extra);
    a
}

/// 2 and 4 ranks with the global batch of 128 train the seed MLP as one
/// process does: every rank's weights bit-identical after every step
/// (--verify-replicas), the loss curve within float rounding of the single
/// process's (each rank sums its shard before the shards are added, so not
/// bit for bit), the same accuracy; rank 0 alone writes the files.
#[test]
fn two_and_four_ranks_train_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(train_args(one.to_str().unwrap(), &["--epochs", "3"]))
        .env("KILN_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let alone = history(&one);
    for np in [2, 4] {
        let out = dir.path().join(format!("np{np}"));
        let args = train_args(
            out.to_str().unwrap(),
            &["--epochs", "3", "--verify-replicas"],
        );
        let Some(o) = on_ranks(np, &args) else { return };
        let (so, se) = (text(&o.stdout), text(&o.stderr));
        assert!(o.status.success(), "{np} ranks: {so}{se}");
        assert!(so.contains(&format!("{np} processes")), "{so}");
        // One rank speaks: one summary, one test line.
        assert_eq!(so.matches("test: loss").count(), 1, "{so}");
        let dp = history(&out);
        assert_eq!(dp.len(), alone.len(), "one history writer");
        for ((l, a), (l1, a1)) in dp.iter().zip(&alone) {
            assert!(
                (l - l1).abs() <= 1e-4 * l1,
                "{np} ranks: loss {l}, one process {l1}"
            );
            assert!(
                (a - a1).abs() <= 0.005,
                "{np} ranks: accuracy {a}, one process {a1}"
            );
        }
        assert!(out.join("model.safetensors").exists());
    }
}

/// The pids of the ranks of the run writing to `out` whose
/// OMPI_COMM_WORLD_RANK is `rank`.
fn rank_pids(out: &str, rank: usize) -> Vec<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let has = |hay: &[u8], needle: &str| hay.split(|&b| b == 0).any(|p| p == needle.as_bytes());
        if has(&cmd, out) && has(&env, &want) && text(&cmd).contains("kiln") {
            pids.push(pid);
        }
    }
    pids
}

/// Starts `kiln train` on 2 ranks and returns once rank 0 has printed its
/// first epoch line.
fn started(out: &str, extra: &[&str]) -> Option<(Child, BufReader<std::process::ChildStdout>)> {
    let mut c = mpirun()?;
    // In a process group of its own, as a job a terminal started.
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let mut child = c
        .args(["-np", "2", env!("CARGO_BIN_EXE_kiln")])
        .args(train_args(out, extra))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("epoch ") {
        line.clear();
        assert!(
            lines.read_line(&mut line).unwrap() > 0,
            "the run ended before its first epoch"
        );
    }
    Some((child, lines))
}

/// Waits up to `limit` for `child`; its exit status, stdout rest and stderr.
fn finish(
    mut child: Child,
    mut rest: BufReader<std::process::ChildStdout>,
    limit: Duration,
) -> (i32, String, String) {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut so = String::new();
            std::io::Read::read_to_string(&mut rest, &mut so).unwrap();
            let mut se = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut se).unwrap();
            return (status.code().unwrap_or(-1), so, se);
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("the job still ran {limit:?} later");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A rank killed with SIGKILL mid-run ends the whole job, non-zero, within
/// seconds, with the launcher naming the lost rank — the survivor does not
/// hang in its all-reduce.
#[test]
fn a_killed_rank_ends_the_job_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let Some((child, rest)) = started(out, &["--epochs", "200", "--batch-size", "16"]) else {
        return;
    };
    let victims = rank_pids(out, 1);
    assert_eq!(victims.len(), 1, "rank 1's process: {victims:?}");
    let t = Instant::now();
    assert!(Command::new("kill")
        .args(["-9", &victims[0].to_string()])
        .status()
        .unwrap()
        .success());
    let (code, _, se) = finish(child, rest, Duration::from_secs(30));
    let took = t.elapsed();
    eprintln!("the job ended {took:?} after rank 1 was killed");
    assert_ne!(code, 0);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(se.contains("rank 1") && se.contains("signal 9"), "{se}");
}

/// One rank that cannot load its data (started with other flags, through
/// mpirun's MPMD syntax) ends every rank with its error, which names it.
#[test]
fn a_rank_that_fails_alone_stops_every_rank_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let Some(mut c) = mpirun() else { return };
    let bin = env!("CARGO_BIN_EXE_kiln");
    let t = Instant::now();
    let o = c
        .args(["-np", "1", bin])
        .args(train_args(out, &["--epochs", "50"]))
        .args([":", "-np", "1", bin])
        .args(train_args(
            out,
            &[
                "--epochs",
                "50",
                "--dataset",
                "fashion-mnist",
                "--data",
                "/nonexistent",
            ],
        ))
        .output()
        .unwrap();
    let se = text(&o.stderr);
    assert!(!o.status.success(), "{se}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        se.contains("error: rank 1 of 2: --data /nonexistent: does not exist"),
        "{se}"
    );
    // Started alike but for the seed, the ranks refuse together.
    let o = mpirun()
        .unwrap()
        .args(["-np", "1", bin])
        .args(train_args(out, &["--epochs", "1", "--seed", "1"]))
        .args([":", "-np", "1", bin])
        .args(train_args(out, &["--epochs", "1", "--seed", "2"]))
        .output()
        .unwrap();
    let se = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        se.contains("different training data or settings") && se.contains("seed 2"),
        "{se}"
    );
}

/// Ctrl-C mid-run — SIGINT to the job's whole process group, as a
/// terminal sends it, so the ranks get it directly and again as `mpirun`'s
/// SIGTERM: every rank stops after the same step, rank 0 leaves a
/// checkpoint, and resuming it on 2 ranks ends with the model file of an
/// uninterrupted 2-rank run, byte for byte.
#[test]
fn ctrl_c_to_the_launcher_leaves_a_checkpoint_that_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    // Batches of 16, not 128: an epoch of the seed MLP takes about 10 ms
    // on 2 ranks, and 60 of them could end before the signal arrives.
    let run = ["--epochs", "60", "--batch-size", "16"];
    let Some(o) = on_ranks(2, &train_args(straight.to_str().unwrap(), &run)) else {
        return;
    };
    assert!(o.status.success(), "{}", text(&o.stderr));

    let cut = dir.path().join("cut");
    let cut_s = cut.to_str().unwrap();
    let (child, rest) = started(cut_s, &run).unwrap();
    let group = format!("-{}", child.id());
    assert!(Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .unwrap()
        .success());
    let (code, _, se) = finish(child, rest, Duration::from_secs(30));
    assert_ne!(code, 0, "{se}");
    let saved: Vec<_> = std::fs::read_dir(cut.join("checkpoints"))
        .unwrap_or_else(|e| panic!("no checkpoints folder ({e}); the job said:\n{se}"))
        .flatten()
        .collect();
    assert_eq!(
        saved.len(),
        1,
        "one checkpoint, from rank 0: {saved:?}\n{se}"
    );

    let ckpt = cut.join("checkpoints");
    let o = on_ranks(
        2,
        &[
            "train",
            "--resume",
            ckpt.to_str().unwrap(),
            "--epochs",
            "60",
            "--batch-size",
            "16",
            "--limit",
            "4000",
            "--plain",
            "--out",
            cut_s,
        ],
    )
    .unwrap();
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stdout).contains("resuming from"));
    let a = std::fs::read(straight.join("model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed run's model differs from the uninterrupted run's"
    );
}

/// A GPT trains data-parallel too: 2 ranks, each with 4 of the 8
/// sequences of every step, follow one process's validation loss within
/// float rounding, with replicas checked after every step; rank 0 alone
/// writes the history.
#[test]
fn a_gpt_trains_on_two_ranks_as_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("tiny.toml");
    std::fs::write(
        &spec,
        "name = \"gpt-tiny\"\n[gpt]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\n",
    )
    .unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(
        &corpus,
        "to be, or not to be: that is the question.\n".repeat(60),
    )
    .unwrap();
    let data = format!("text:{}", corpus.display());
    let run = |np: usize, out: &Path| {
        let args = [
            "train",
            "--model",
            spec.to_str().unwrap(),
            "--dataset",
            &data,
            "--iters",
            "20",
            "--eval-every",
            "10",
            "--eval-iters",
            "2",
            "--batch-size",
            "8",
            "--plain",
            "--verify-replicas",
            "--out",
            out.to_str().unwrap(),
        ];
        let o = if np == 1 {
            Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(args)
                .env("KILN_THREADS", "1")
                .output()
                .unwrap()
        } else {
            on_ranks(np, &args)?
        };
        assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
        let lines = std::fs::read_to_string(out.join("history.jsonl")).unwrap();
        let val: Vec<f64> = lines
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["val_loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        Some(val)
    };
    let Some(one) = run(1, &dir.path().join("one")) else {
        return;
    };
    let Some(two) = run(2, &dir.path().join("two")) else {
        return;
    };
    assert_eq!(one.len(), 2);
    assert_eq!(two.len(), one.len(), "one history writer");
    for (a, b) in two.iter().zip(&one) {
        assert!(
            (a - b).abs() <= 1e-4 * b,
            "2 ranks: validation loss {a}, one process {b}"
        );
    }
}
