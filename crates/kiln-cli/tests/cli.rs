//! The `kiln` binary, run as a user would.

use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_THREADS", "2")
        .output()
        .expect("running kiln")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The seed MLP trained one epoch on 300 examples into `dir/run`.
fn trained(dir: &std::path::Path) -> std::path::PathBuf {
    let run = dir.join("run");
    let o = kiln(&[
        "train",
        "--epochs",
        "1",
        "--limit",
        "300",
        "--plain",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    run
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn train_then_eval_on_the_bundled_sample() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let o = kiln(&[
        "train", "--model", "mlp", "--epochs", "1", "--limit", "2000", "--out", out, "--plain",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(
        s.contains("Total params: 50,890") && s.contains("epoch 1/1") && s.contains("test: loss"),
        "{s}"
    );
    let history = std::fs::read_to_string(dir.path().join("history.jsonl")).unwrap();
    assert_eq!(history.lines().count(), 1);
    assert!(history.contains("\"val_accuracy\""));
    // Plots beside the history (ci/test.sh installs their font and asks
    // for them; elsewhere a missing font only skips them, with a note).
    let fonts = std::env::var_os("KILN_REQUIRE_PLOTS").is_some()
        || kiln_train::plots::FONT_PATHS
            .iter()
            .any(|p| std::path::Path::new(p).exists());
    if fonts {
        for f in ["curves.svg", "curves.png", "confusion.svg", "confusion.png"] {
            let bytes = std::fs::read(dir.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(bytes.len() > 1000, "{f} is {} bytes", bytes.len());
        }
        let png = std::fs::read(dir.path().join("curves.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        let o = kiln(&[
            "plot",
            dir.path().join("history.jsonl").to_str().unwrap(),
            "--out",
            &format!("{out}/again"),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let svg = std::fs::read_to_string(dir.path().join("again/curves.svg")).unwrap();
        assert!(svg.contains("<svg") && svg.contains("validation"), "{svg}");
    } else {
        assert!(stderr(&o).contains("fonts-dejavu-core"), "{}", stderr(&o));
    }

    let json = dir.path().join("report.json");
    let o = kiln(&["eval", "--model", out, "--json", json.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(
        s.contains("accuracy")
            && s.contains("forward passes alone")
            && s.contains("macro avg")
            && s.contains("confusion matrix"),
        "{s}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["examples"], 2000);
    let forward = report["forward_seconds"].as_f64().unwrap();
    assert!(forward > 0.0 && forward < 60.0, "{forward}");
    assert_eq!(report["confusion"].as_array().unwrap().len(), 10);
    assert_eq!(report["per_class"].as_array().unwrap().len(), 10);
}

#[test]
fn info_reports_the_machine() {
    let o = kiln(&["info"]);
    assert!(o.status.success());
    let s = stdout(&o);
    assert!(
        s.contains("cpu:") && s.contains("kernels:") && s.contains("backends:   cpu (scalar"),
        "{s}"
    );
}

#[test]
fn errors_are_one_clear_line_and_a_nonzero_exit() {
    // Unknown flag: clap's usage error, exit 2.
    let o = kiln(&["train", "--epoch", "3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--epoch"), "{}", stderr(&o));

    let empty = tempfile::tempdir().unwrap();
    let o = kiln(&[
        "train",
        "--dataset",
        "mnist",
        "--data",
        empty.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with("error: --data ")
            && e.contains("no train-images-idx3-ubyte")
            && e.lines().count() == 1,
        "{e}"
    );

    let o = kiln(&["train", "--model", "resnet"]);
    assert!(
        stderr(&o).contains("unknown model `resnet`"),
        "{}",
        stderr(&o)
    );

    let o = kiln(&["train", "--early-stopping", "0"]);
    assert!(
        stderr(&o).contains("--early-stopping 0") && !o.status.success(),
        "{}",
        stderr(&o)
    );
    let o = kiln(&["train", "--model", "gpt", "--early-stopping", "2"]);
    assert!(
        stderr(&o).contains("--early-stopping is for image models"),
        "{}",
        stderr(&o)
    );

    // Without a GPU (this machine, CI), the CUDA backend says why.
    if !kiln_cuda::device::driver_present() {
        let o = kiln(&["train", "--backend", "cuda"]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("no CUDA driver found (libcuda.so.1)"),
            "{}",
            stderr(&o)
        );
    }
    let o = kiln(&["train", "--backend", "cuda:x"]);
    assert!(stderr(&o).contains("expected cuda:N"), "{}", stderr(&o));

    // NCCL: built without it, on the CPU, or with no GPU, each says what to do.
    let o = kiln(&["train", "--distributed", "tcp"]);
    assert!(
        stderr(&o).contains("expected auto, local, mpi or nccl"),
        "{}",
        stderr(&o)
    );
    let o = kiln(&["train", "--distributed", "nccl", "--epochs", "1"]);
    assert_eq!(o.status.code(), Some(1));
    let want = if cfg!(feature = "nccl") {
        "train with --backend cuda"
    } else {
        "--features nccl"
    };
    assert!(stderr(&o).contains(want), "{}", stderr(&o));
    if cfg!(feature = "nccl") && !kiln_cuda::device::driver_present() {
        let o = kiln(&["train", "--distributed", "nccl", "--backend", "cuda"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains("no CUDA driver found (libcuda.so.1)"),
            "{}",
            stderr(&o)
        );
    }

    let o = kiln(&["train", "--backend", "cpu:sse9"]);
    assert!(
        stderr(&o).contains("unknown kernel set `sse9`"),
        "{}",
        stderr(&o)
    );

    // A corrupt images file.
    std::fs::write(
        empty.path().join("train-images-idx3-ubyte"),
        [0u8, 0, 8, 3, 0, 0, 0, 9],
    )
    .unwrap();
    std::fs::write(
        empty.path().join("train-labels-idx1-ubyte"),
        [0u8, 0, 8, 1, 0, 0, 0, 0],
    )
    .unwrap();
    let o = kiln(&[
        "train",
        "--dataset",
        "mnist",
        "--data",
        empty.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));

    // A model file that is not one.
    let bogus = empty.path().join("model.safetensors");
    std::fs::write(&bogus, b"not a model").unwrap();
    let o = kiln(&["eval", "--model", bogus.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not a kiln model file"),
        "{}",
        stderr(&o)
    );

    // An output file that cannot be written is refused before the work
    // (a whole evaluation, bench or suite), not after it.
    let folder = empty.path().to_str().unwrap().to_string();
    let nowhere = empty.path().join("no/such/folder/out.json");
    let nowhere = nowhere.to_str().unwrap();
    for (args, says) in [
        (
            vec!["eval", "--model", "/no/model", "--json", &folder],
            "a folder",
        ),
        (
            vec!["bench", "--quick", "--json", nowhere],
            "there is no folder",
        ),
        (vec!["bench", "--quick", "--svg", &folder], "a folder"),
        (
            vec!["conformance", "--op", "gemm", "--json", nowhere],
            "there is no folder",
        ),
    ] {
        let o = kiln(&args);
        let e = stderr(&o);
        assert!(
            o.status.code() == Some(1) && e.contains(says) && e.lines().count() == 1,
            "{args:?}: {e}"
        );
    }

    // Endless inputs (devices) are read to a cap, then refused: each once
    // read until memory ran out.
    for args in [
        vec!["eval", "--model", "/dev/zero"],
        vec!["train", "--model", "gpt", "--dataset", "text:/dev/urandom"],
        vec!["plot", "/dev/zero"],
    ] {
        let o = kiln(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&o).contains("more than 256 MiB from a pipe or device")
                && stderr(&o).lines().count() == 1,
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn conformance_report_for_the_reference_backend() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let o = kiln(&[
        "conformance",
        "--backend",
        "cpu:scalar",
        "--cases",
        "8",
        "--tier",
        "edge",
        "--op",
        "gem",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let s = stdout(&o);
    assert!(
        s.contains("gemm_epilogue") && s.contains("6 checks: 6 passed, 0 failed"),
        "{s}"
    );
    // A check's exact name selects it alone, here with the blocked tier.
    let o = kiln(&[
        "conformance",
        "--backend",
        "cpu:scalar",
        "--op",
        "gemm",
        "--dtype",
        "f32",
    ]);
    let s = stdout(&o);
    assert!(o.status.success(), "{s}{}", stderr(&o));
    assert!(
        s.contains("1 checks: 1 passed")
            && s.contains("tiers blocked (cases per check: edge 48, blocked 24)"),
        "{s}"
    );
    for (flag, value, says) in [
        ("--tier", "huge", "expected edge, blocked, large or all"),
        ("--budget", "0", "expected seconds"),
        ("--cases", "0", "at least one case"),
    ] {
        let o = kiln(&["conformance", "--op", "gemm", flag, value]);
        assert_eq!(o.status.code(), Some(1), "{flag} {value}");
        assert!(stderr(&o).contains(says), "{flag} {value}: {}", stderr(&o));
    }
    let reports: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(reports.as_array().unwrap().len(), 6);
    // A kernel set this processor lacks is a clear error.
    let missing = if cfg!(target_arch = "x86_64") {
        "cpu:neon"
    } else {
        "cpu:avx512"
    };
    let o = kiln(&["conformance", "--backend", missing]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("needs"), "{}", stderr(&o));
    let o = kiln(&["conformance", "--op", "nonexistent"]);
    assert!(
        stderr(&o).contains("no conformance check matches --op nonexistent")
            && stderr(&o).contains("gemm_epilogue, "),
        "{}",
        stderr(&o)
    );
    // A check that exists in other dtypes names them.
    let o = kiln(&["conformance", "--op", "gemm", "--dtype", "u32"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no check matching --op gemm runs in u32")
            && stderr(&o).contains("gemm (f32, f16, bf16)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn train_the_cnn_from_its_spec_file_with_augmentation() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/cnn.toml");
    let o = kiln(&[
        "train",
        "--model",
        spec,
        "--epochs",
        "1",
        "--limit",
        "512",
        "--augment",
        "--out",
        out,
        "--plain",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(
        s.contains("Total params: 347,146") && s.contains("epoch 1/1"),
        "{s}"
    );
    let o = kiln(&["eval", "--model", out]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A spec with a mistake: one line naming the file and the problem.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"b\"\ninput = [1, 28, 28]\n[[layers]]\ntype = \"dense\"\nunits = 3\n",
    )
    .unwrap();
    let o = kiln(&["train", "--model", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("bad.toml") && e.contains("Flatten"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

/// Ctrl-C during `kiln train`: the step finishes, a checkpoint is written
/// and named, the exit status is 130; `--resume` then completes the run to
/// the same weights as one never interrupted.
#[test]
fn sigint_checkpoints_and_resume_finishes_the_run() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let args = |out: &std::path::Path| -> Vec<String> {
        [
            "train",
            "--model",
            "cnn",
            "--epochs",
            "3",
            "--limit",
            "4000",
            "--seed",
            "5",
            "--no-validation",
            "--plain",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([out.to_str().unwrap().to_string()])
        .collect()
    };
    let straight = kiln(&args(&a).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(straight.status.success(), "{}", stderr(&straight));

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args(&b))
        .env("KILN_THREADS", "2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training runs (its first epoch line), then interrupt.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.starts_with("epoch 1/3")),
        "no epoch line"
    );
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(130), "{err}");
    // The hint names the run's length, which --epochs' default is not.
    let hint = format!("--resume {} --epochs 3", b.join("checkpoints").display());
    assert!(
        err.contains("checkpoint written to") && err.contains(&hint),
        "{err}"
    );

    // The interrupted run's folder has no model file yet: eval takes its
    // newest checkpoint.
    let o = kiln(&["eval", "--model", b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("checkpoints/ckpt-"), "{}", stdout(&o));

    // Without --out, the run goes on writing where it wrote.
    let resume = kiln(&[
        "train",
        "--resume",
        b.join("checkpoints").to_str().unwrap(),
        "--epochs",
        "3",
        "--limit",
        "4000",
        "--seed",
        "5",
        "--no-validation",
        "--plain",
    ]);
    assert!(resume.status.success(), "{}", stderr(&resume));
    assert!(
        stdout(&resume).contains("resuming from"),
        "{}",
        stdout(&resume)
    );
    let tensors = |p: &std::path::Path| {
        let bytes = std::fs::read(p.join("model.safetensors")).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[8 + n..].to_vec()
    };
    assert!(
        tensors(&a) == tensors(&b),
        "the resumed run's weights differ"
    );

    // `kiln eval` reads a checkpoint as well as a model file.
    let ckpt = std::fs::read_dir(b.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let o = kiln(&["eval", "--model", ckpt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("macro avg"), "{}", stdout(&o));
    // And a folder of checkpoints: its newest, as --resume takes it.
    let o = kiln(&["eval", "--model", b.join("checkpoints").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("ckpt-"), "{}", stdout(&o));
    // A checkpoint's plots go to its run's folder, not among the
    // checkpoints.
    let plots = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("confusion-")
            })
            .count()
    };
    assert_eq!(plots(&b.join("checkpoints")), 0);
    if std::env::var_os("KILN_REQUIRE_PLOTS").is_some() {
        assert!(plots(&b) > 0, "no confusion plot in {}", b.display());
    }

    // Refused resumes below write to b by default: they must leave its
    // history as it is.
    let history = std::fs::read(b.join("history.jsonl")).unwrap();
    assert!(!history.is_empty());
    // Resuming with another model is refused, naming both.
    let o = kiln(&[
        "train",
        "--resume",
        b.join("checkpoints").to_str().unwrap(),
        "--model",
        "mlp",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("holds model `cnn`"), "{}", stderr(&o));
    // A different --lr is refused, not silently ignored.
    let o = kiln(&[
        "train",
        "--model",
        "cnn",
        "--resume",
        b.join("checkpoints").to_str().unwrap(),
        "--lr",
        "0.5",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--lr 0.5: the checkpoint trains at 0.001"),
        "{}",
        stderr(&o)
    );
    // Other data (the run's --limit left out) says which flags to repeat.
    let o = kiln(&[
        "train",
        "--resume",
        b.join("checkpoints").to_str().unwrap(),
        "--epochs",
        "3",
        "--seed",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("give the run's --dataset, --data and --limit"),
        "{}",
        stderr(&o)
    );
    assert!(
        std::fs::read(b.join("history.jsonl")).unwrap() == history,
        "a refused resume changed the run's history"
    );
}

#[test]
fn json_logs_are_one_record_per_epoch_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let o = kiln(&[
        "train",
        "--epochs",
        "2",
        "--limit",
        "1000",
        "--log-format",
        "json",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let records: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(records.len(), 2);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["epoch"], i + 1);
        assert!(r["images_per_sec"].as_f64().unwrap() > 0.0);
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
        assert!(
            r.get("energy_joules").is_some(),
            "energy is reported, or null"
        );
    }
    assert!(
        stderr(&o).contains("Total params"),
        "the summary goes to stderr"
    );
}

/// Writes a gray PNG of `w × h` from `pixels` (row-major bytes).
fn write_png(path: &std::path::Path, w: u32, h: u32, pixels: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .unwrap()
        .write_image_data(pixels)
        .unwrap();
}

#[test]
fn predict_classifies_png_and_idx_images() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = kiln(&[
        "train",
        "--epochs",
        "3",
        "--limit",
        "3000",
        "--out",
        out.to_str().unwrap(),
        "--plain",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The first test digit of the bundled sample, as a PNG and as IDX.
    let test = kiln_data::Dataset::load("mnist-sample", kiln_data::Split::Test, None).unwrap();
    let image = test.image(0).to_vec();
    let png28 = dir.path().join("digit.png");
    write_png(&png28, 28, 28, &image);
    // The same digit at 56×56 (each pixel doubled): resized, with a warning.
    let big: Vec<u8> = (0..56 * 56)
        .map(|i| image[(i / 56 / 2) * 28 + (i % 56) / 2])
        .collect();
    let png56 = dir.path().join("big.png");
    write_png(&png56, 56, 56, &big);
    let idx = dir.path().join("images.idx");
    let mut raw = vec![0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0, 28];
    raw.extend_from_slice(&image);
    std::fs::write(&idx, raw).unwrap();

    let o = kiln(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--json",
        "--input",
        png28.to_str().unwrap(),
        png56.to_str().unwrap(),
        idx.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resized to 28×28"), "{}", stderr(&o));
    let preds: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let preds = preds.as_array().unwrap();
    assert_eq!(preds.len(), 3);
    for p in preds {
        assert_eq!(p["probabilities"].as_array().unwrap().len(), 10, "{p}");
        let sum: f64 = p["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((sum - 1.0).abs() < 1e-4, "{sum}");
    }
    // One image three ways — PNG, a 2× PNG resized back (each output pixel
    // falls between two equal ones) and IDX: the same probabilities.
    assert_eq!(preds[0]["probabilities"], preds[1]["probabilities"]);
    assert_eq!(preds[0]["probabilities"], preds[2]["probabilities"]);

    // A table by default; a broken PNG is one clear error.
    let o = kiln(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--input",
        png28.to_str().unwrap(),
    ]);
    assert!(
        stdout(&o).contains("prediction") && stdout(&o).contains('%'),
        "{}",
        stdout(&o)
    );
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let o = kiln(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--input",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a readable PNG"), "{}", stderr(&o));
}

/// One HTTP/1.1 request over a fresh connection: (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

#[test]
fn serve_answers_concurrent_requests_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = kiln(&[
        "train",
        "--epochs",
        "1",
        "--limit",
        "1000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "serve",
            "--model",
            out.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
            "--max-body",
            "100000",
        ])
        .env("KILN_THREADS", "2")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let port: u16 = first
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {first:?}"));

    let (code, body) = http(port, "GET", "/healthz", "");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"ok\""), "{body}");

    // Eight clients, five requests each, two images per request.
    let image: Vec<String> = (0..784)
        .map(|i| format!("{}", (i % 7) as f32 / 7.0))
        .collect();
    let body = format!("{{\"images\": [[{0}], [{0}]]}}", image.join(","));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| http(port, "POST", "/v1/predict", &body))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for c in clients {
        for (code, body) in c.join().unwrap() {
            assert_eq!(code, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["predictions"].as_array().unwrap().len(), 2, "{body}");
        }
    }

    // Bad requests: a JSON error and a 4xx each.
    let (code, body) = http(port, "POST", "/v1/predict", "{not json");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (code, body) = http(port, "POST", "/v1/predict", "{\"image\": [1, 2, 3]}");
    assert_eq!((code, body.contains("784")), (400, true), "{body}");
    let (code, _) = http(port, "POST", "/v1/predict", &" ".repeat(100_001));
    assert_eq!(code, 413);
    assert_eq!(http(port, "GET", "/v1/predict", "").0, 405);
    assert_eq!(http(port, "GET", "/nope", "").0, 404);

    let (code, metrics) = http(port, "GET", "/metrics", "");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("kiln_requests_total{code=\"200\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("kiln_images_total 80"), "{metrics}");

    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
    assert!(lines.any(|l| l.is_ok_and(|l| l == "stopped")));
}

#[test]
fn mixed_precision_training_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let o = kiln(&[
        "train",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--limit",
        "1000",
        "--precision",
        "f16",
        "--out",
        out,
        "--plain",
        "--checkpoint-every",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(
        s.contains("precision f16 (f32 master weights, dynamic loss scaling)")
            && s.contains("loss_scale 65536 skipped 0"),
        "{s}"
    );
    let history = std::fs::read_to_string(dir.path().join("history.jsonl")).unwrap();
    assert!(
        history.contains("\"precision\":\"f16\"") && history.contains("\"loss_scale\":65536"),
        "{history}"
    );
    // A resume keeps the checkpoint's precision, and refuses another.
    let ckpt = dir.path().join("checkpoints");
    let ckpt = ckpt.to_str().unwrap();
    let o = kiln(&[
        "train", "--epochs", "2", "--limit", "1000", "--out", out, "--plain", "--resume", ckpt,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("precision f16"), "{}", stdout(&o));
    let o = kiln(&[
        "train",
        "--epochs",
        "3",
        "--limit",
        "1000",
        "--out",
        out,
        "--resume",
        ckpt,
        "--precision",
        "bf16",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("precision f16, this run has bf16"),
        "{}",
        stderr(&o)
    );
    // Evaluation in bf16 reads the f32 weights.
    let o = kiln(&["eval", "--model", out, "--precision", "bf16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = kiln(&["train", "--precision", "fp8"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("fp8"), "{}", stderr(&o));
}

#[test]
fn bench_times_the_op_set_against_measured_peaks_and_a_saved_run() {
    let dir = tempfile::tempdir().unwrap();
    let (json, svg) = (
        dir.path().join("bench.json"),
        dir.path().join("roofline.svg"),
    );
    let o = kiln(&[
        "bench",
        "--quick",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let s = stdout(&o);
    assert!(o.status.success(), "{s}{}", stderr(&o));
    for want in [
        "compute peak",
        "FMA loop",
        "triad",
        "gemm",
        "conv2d_backward_filter",
        "softmax_cross_entropy",
        "adam_update",
        "matrixmultiply",
        "gemm crate",
    ] {
        assert!(s.contains(want), "{want} missing from\n{s}");
    }
    // matrixmultiply runs on the run's own thread count (it would take
    // every core), so its column names no other (up to its 4 threads).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() && cores <= 4 {
        assert!(!s.contains("matrixmultiply ("), "{s}");
    }
    if std::env::var_os("KILN_REQUIRE_OPENBLAS").is_some() {
        assert!(s.contains("openblas ("), "no OpenBLAS column:\n{s}");
    }
    // The transposed add is not the SIMD sets' fast path, and says so.
    if !stdout(&kiln(&["info"])).contains("kernels:    scalar") {
        assert!(
            s.contains("slow path: binary:") && s.contains("(strided operand: scalar loops)"),
            "no slow path under the transposed add:\n{s}"
        );
    }
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(run["rows"].as_array().unwrap().len() >= 10);
    let strided = run["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["shape"].as_str().unwrap().ends_with('ᵀ'))
        .expect("a transposed row");
    assert!(strided["slow_paths"].is_array(), "{strided}");
    assert!(run["compute_peak"]["value"].as_f64().unwrap() > 0.0);
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(
        picture.starts_with("<svg") && picture.contains("GFLOP/s peak"),
        "{picture}"
    );
    // Against the saved run: a ratio on every row.
    let o = kiln(&[
        "bench",
        "--quick",
        "--backend",
        "cpu:scalar",
        "--no-comparators",
        "--compare",
        json.to_str().unwrap(),
    ]);
    let s = stdout(&o);
    assert!(
        o.status.success() && s.contains("× cpu:"),
        "{s}{}",
        stderr(&o)
    );
    assert!(!s.contains("matrixmultiply"), "{s}");
    // A saved run whose numbers cannot be true is refused, by name.
    let mut damaged: serde_json::Value = run.clone();
    damaged["rows"][0]["median_s"] = serde_json::json!(-0.001);
    let bad = dir.path().join("damaged.json");
    std::fs::write(&bad, damaged.to_string()).unwrap();
    let o = kiln(&["bench", "--quick", "--compare", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not a valid kiln bench run")
            && stderr(&o).contains("expected 0 < min ≤ median ≤ max"),
        "{}",
        stderr(&o)
    );
    // `kiln report` refuses it before making its folder.
    let never = dir.path().join("never");
    let o = kiln(&[
        "report",
        "--bench-json",
        bad.to_str().unwrap(),
        "--out",
        never.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not a valid kiln bench run"),
        "{}",
        stderr(&o)
    );
    assert!(!never.exists());
    // Bad input is a clear error, an absurd value quoted back short.
    let o = kiln(&["bench", "--quick", "--budget", "1e300"]);
    assert!(
        stderr(&o).contains("--budget 1e300: expected seconds"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&json, "{ not json").unwrap();
    let o = kiln(&["bench", "--quick", "--compare", json.to_str().unwrap()]);
    assert!(
        stderr(&o).contains("not a kiln bench run"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn report_writes_markdown_and_a_page_a_real_browser_renders() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let o = kiln(&[
        "report",
        "--backend",
        "cpu:scalar",
        "--tier",
        "edge",
        "--cases",
        "4",
        "--quick",
        "--no-comparators",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for want in [
        "# kiln report: cpu:scalar",
        "| gemm | pass",
        "| softmax_cross_entropy |",
        "## Bench",
        "roofline.svg",
    ] {
        assert!(md.contains(want), "{want} missing from\n{md}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.starts_with("<!DOCTYPE html>")
            && html.contains("<svg")
            && !html.contains("src=\"http")
    );
    // Rebuilt from the saved runs, without running anything.
    let again = dir.path().join("again");
    let o = kiln(&[
        "report",
        "--backend",
        "cpu:scalar",
        "--conformance-json",
        out.join("conformance.json").to_str().unwrap(),
        "--bench-json",
        out.join("bench.json").to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read_to_string(again.join("report.md"))
        .unwrap()
        .contains("| gemm | pass"));

    // A real headless browser lays the page out (ci/test.sh installs
    // Debian's chromium and requires this part).
    let chromium = ["chromium", "chromium-browser"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(chromium) = chromium else {
        assert!(
            std::env::var_os("KILN_REQUIRE_BROWSER").is_none(),
            "KILN_REQUIRE_BROWSER is set but no chromium is installed"
        );
        eprintln!("skipped the browser check: no chromium");
        return;
    };
    let url = format!("file://{}", out.join("report.html").display());
    let shot = dir.path().join("shot.png");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
    ];
    let o = Command::new(chromium)
        .args(common)
        .args([
            "--window-size=1200,2400",
            &format!("--screenshot={}", shot.display()),
            &url,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    let o = Command::new(chromium)
        .args(common)
        .args(["--dump-dom", &url])
        .output()
        .unwrap();
    let dom = stdout(&o);
    assert!(
        dom.contains("<td class=\"pass\">pass") && dom.contains("</svg>"),
        "{dom}"
    );
}

#[test]
fn a_closed_pipe_ends_kiln_quietly() {
    use std::process::Stdio;
    // `kiln info | head -0`: the reader is gone before kiln writes.
    for args in [
        &["info"][..],
        &[
            "conformance",
            "--op",
            "gem",
            "--tier",
            "edge",
            "--cases",
            "2",
        ],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert!(
            !err.contains("panicked") && out.status.code() != Some(101),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn thread_counts_past_four_per_core_are_refused() {
    let o = kiln(&["conformance", "--op", "gemm", "--threads", "100000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--threads 100000: expected 1 to"),
        "{}",
        stderr(&o)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["conformance", "--op", "gemm"])
        .env("KILN_THREADS", "100000")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("KILN_THREADS=\"100000\": expected 1 to"),
        "{}",
        stderr(&o)
    );
    // `kiln info` prints what it can, then fails as the backend does.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("info")
        .env("KILN_THREADS", "100000")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("kernels:    unavailable") && stdout(&o).contains("simd:"),
        "{}",
        stdout(&o)
    );
    assert!(
        stderr(&o).contains("KILN_THREADS=\"100000\""),
        "{}",
        stderr(&o)
    );
    // --threads wins over a malformed KILN_THREADS, which it makes unread.
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "train",
            "--threads",
            "1",
            "--epochs",
            "1",
            "--limit",
            "100",
            "--plain",
            "--verify-replicas",
        ])
        .args(["--out", dir.path().to_str().unwrap()])
        .env("KILN_THREADS", "abc")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // A distributed run's flag in a run of one process is worth a word.
    assert!(
        stderr(&o).contains("note: --verify-replicas has no effect: this run is one process"),
        "{}",
        stderr(&o)
    );
    // A switch for the AMX kernel that is neither 0 nor 1 (checked on every
    // processor, AMX or not).
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["conformance", "--op", "gemm"])
        .env("KILN_AMX", "maybe")
        .output()
        .unwrap();
    if cfg!(target_arch = "x86_64") {
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains("KILN_AMX=\"maybe\": expected 0"),
            "{}",
            stderr(&o)
        );
    }
    // A log topic that does not exist is named; a blank setting is unset,
    // as for every KILN_ variable.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["conformance", "--op", "gemm_epilogue", "--dtype", "f32"])
        .env("KILN_LOG", "slow-paths,slowpath")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(
            "`slowpath` is not a log topic; expected a comma-separated list of slow-paths, debug"
        ),
        "{}",
        stderr(&o)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["conformance", "--op", "gemm_epilogue", "--dtype", "f32"])
        .env("KILN_THREADS", " ")
        .env("KILN_CPU", "")
        .env("KILN_LOG", "")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = kiln(&["bench", "--quick", "--threads", "0"]);
    assert!(
        stderr(&o).contains("--threads 0: expected 1 to"),
        "{}",
        stderr(&o)
    );
    // The other counts that have no useful zero.
    for (args, says) in [
        (&["train", "--keep", "0"][..], "--keep 0"),
        (&["train", "--limit", "0"][..], "--limit 0"),
        (&["train", "--epochs", "0"][..], "--epochs and --batch-size"),
        (
            &["eval", "--model", "nowhere", "--batch-size", "0"][..],
            "--batch-size 0",
        ),
        (
            &["serve", "--model", "nowhere", "--max-batch", "0"][..],
            "--max-batch 0",
        ),
        (
            &[
                "predict", "--model", "nowhere", "--input", "x", "--top", "0",
            ][..],
            "--top 0",
        ),
        // A flag that would be silently ignored is refused instead.
        (
            &["train", "--momentum", "0.9"][..],
            "--momentum is for --optimizer sgd",
        ),
    ] {
        let o = kiln(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn a_model_name_cannot_lead_the_default_output_out_of_runs() {
    let dir = tempfile::tempdir().unwrap();
    let spec = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/mlp.toml"
    ))
    .unwrap()
    .replace("name = \"mlp\"", "name = \"../../../escaped\"");
    let path = dir.path().join("evil.toml");
    std::fs::write(&path, spec).unwrap();
    let work = dir.path().join("a/b/c");
    std::fs::create_dir_all(&work).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "train",
            "--model",
            path.to_str().unwrap(),
            "--epochs",
            "1",
            "--limit",
            "300",
            "--plain",
        ])
        .current_dir(&work)
        .env("KILN_THREADS", "2")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let runs: Vec<_> = std::fs::read_dir(work.join("runs"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(runs.len(), 1);
    let name = runs[0].file_name().into_string().unwrap();
    assert!(
        !name.contains('/') && name.ends_with("escaped-mnist-sample"),
        "{name}"
    );
    assert!(runs[0].path().join("model.safetensors").exists());
    assert!(!dir.path().join("a/escaped-mnist-sample").exists());
}

#[test]
fn eval_keeps_its_report_where_the_plot_cannot_be_drawn_and_plots_where_told() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path());
    // A folder squats on the plot's name beside the model (root ignores
    // read-only modes, so this is how the test makes the spot unwritable).
    let squat = run.join("confusion-mnist-sample.svg");
    std::fs::create_dir_all(&squat).unwrap();
    let json = dir.path().join("report.json");
    let o = kiln(&[
        "eval",
        "--model",
        run.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("macro avg") && json.exists());
    assert!(
        stderr(&o).contains("no confusion-matrix plot")
            && stderr(&o).contains("confusion-mnist-sample.svg"),
        "{}",
        stderr(&o)
    );
    // --out puts the plots where the user says; a folder that cannot be
    // made is an error naming it.
    let plots = dir.path().join("plots");
    let o = kiln(&[
        "eval",
        "--model",
        run.to_str().unwrap(),
        "--out",
        plots.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    if std::env::var_os("KILN_REQUIRE_PLOTS").is_some() {
        assert!(plots.join("confusion-mnist-sample.png").exists());
    }
    let o = kiln(&[
        "eval",
        "--model",
        run.to_str().unwrap(),
        "--out",
        "/proc/kiln-no-such/plots",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/proc/kiln-no-such/plots"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn huge_png_headers_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path());
    // A few dozen bytes claiming 100000 × 100000 gray pixels (10 GB decoded).
    let big = dir.path().join("big.png");
    {
        let f = std::fs::File::create(&big).unwrap();
        let mut enc = png::Encoder::new(f, 100_000, 100_000);
        enc.set_color(png::ColorType::Grayscale);
        let mut w = enc.write_header().unwrap();
        // One IDAT chunk holding an empty zlib stream: the header is all
        // a decoder needs to plan its buffer.
        w.write_chunk(
            png::chunk::IDAT,
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        )
        .unwrap();
        drop(w);
    }
    assert!(std::fs::metadata(&big).unwrap().len() < 100);
    let t = std::time::Instant::now();
    let o = kiln(&[
        "predict",
        "--model",
        run.to_str().unwrap(),
        "--input",
        big.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("100000×100000 pixels; images of at most 16777216 pixels"),
        "{}",
        stderr(&o)
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn models_too_big_for_memory_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bigconv.toml");
    std::fs::write(
        &spec,
        "name = \"bigconv\"\ninput = [1, 28, 28]\n\n[[layers]]\ntype = \"conv2d\"\nfilters = 32\n\
         kernel_size = 3000\npadding = \"same\"\nactivation = \"relu\"\n\n[[layers]]\ntype = \"flatten\"\n\n\
         [[layers]]\ntype = \"dense\"\nunits = 10\nactivation = \"softmax\"\n",
    )
    .unwrap();
    let t = std::time::Instant::now();
    let o = kiln(&[
        "train",
        "--model",
        spec.to_str().unwrap(),
        "--out",
        dir.path().join("r").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("needs about")
            && e.contains("convolution workspace")
            && e.contains("KILN_MEMORY_LIMIT"),
        "{e}"
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    // The limit is the user's to set; a malformed one is an error.
    for (limit, says) in [
        ("1M", "over the 1.0 MiB limit"),
        ("lots", "KILN_MEMORY_LIMIT=\"lots\""),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "train",
                "--epochs",
                "1",
                "--limit",
                "100",
                "--out",
                dir.path().join("m").to_str().unwrap(),
            ])
            .env("KILN_MEMORY_LIMIT", limit)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains(says), "{limit}: {}", stderr(&o));
    }
    // The summary states the estimate.
    let o = kiln(&[
        "train",
        "--epochs",
        "1",
        "--limit",
        "100",
        "--plain",
        "--out",
        dir.path().join("ok").to_str().unwrap(),
    ]);
    assert!(
        stdout(&o).contains("Estimated memory at batch 128:"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn early_stopping_ends_a_run_once_the_validation_loss_stops_improving() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    // 300 examples overfit within a few epochs; 40 would be far past it.
    let o = kiln(&[
        "train",
        "--model",
        "mlp",
        "--epochs",
        "40",
        "--limit",
        "300",
        "--early-stopping",
        "2",
        "--out",
        out,
        "--plain",
        "--lr",
        "3e-3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let history = std::fs::read_to_string(dir.path().join("history.jsonl")).unwrap();
    let losses: Vec<f64> = history
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["val_loss"].as_f64().unwrap()
        })
        .collect();
    let n = losses.len();
    assert!((3..40).contains(&n), "{n} epochs: {losses:?}");
    // The last two epochs did not beat the best before them.
    let best = losses[..n - 2]
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min);
    assert!(losses[n - 2..].iter().all(|&l| l >= best), "{losses:?}");
}

/// A model whose outputs overflow (weights edited to 3·10³⁸, saved with
/// fresh checksums) is an error in `kiln eval` and `kiln predict`, as it
/// is a 422 in `kiln serve` — not a report of NaN losses and probabilities
/// with exit status 0; a model evaluated on another dataset than its own
/// gets a note.
#[test]
fn eval_refuses_overflowing_outputs_and_notes_another_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path());
    let b = kiln_cpu::CpuBackend::reference();
    let mut loaded = kiln_train::model_file::load(&run.join("model.safetensors"), &b).unwrap();
    let (name, w) = loaded.model.state_dict().into_iter().next().unwrap();
    let huge = kiln_core::Tensor::from_slice(&vec![3e38f32; w.numel()], w.dims(), &b).unwrap();
    loaded.model.set_param(&name, &huge).unwrap();
    let bad = dir.path().join("huge.safetensors");
    kiln_train::model_file::save(&bad, &loaded.model, &loaded.metadata).unwrap();
    // One 28 × 28 image, as IDX.
    let image = dir.path().join("one.idx");
    let mut idx = vec![0u8, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0, 28];
    idx.extend((0..784).map(|i| (i % 251) as u8));
    std::fs::write(&image, idx).unwrap();
    // A model of another dataset (same shape) evaluates with a note.
    let mut meta = loaded.metadata.clone();
    meta.insert("kiln.dataset".into(), "fashion-mnist".into());
    let other = dir.path().join("other.safetensors");
    let sane = kiln_train::model_file::load(&run.join("model.safetensors"), &b).unwrap();
    kiln_train::model_file::save(&other, &sane.model, &meta).unwrap();
    let o = kiln(&["eval", "--model", other.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("was trained on fashion-mnist; evaluating it on mnist-sample")
            && !stderr(&o).contains("cannot be checked"),
        "{}",
        stderr(&o)
    );
    // The same file with its checksums taken out of the header loads, with
    // a note that nothing vouches for its bytes.
    let bytes = std::fs::read(&other).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert!(header["__metadata__"]
        .as_object_mut()
        .unwrap()
        .remove("kiln.checksums")
        .is_some());
    let mut text = header.to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut unsummed = (text.len() as u64).to_le_bytes().to_vec();
    unsummed.extend_from_slice(text.as_bytes());
    unsummed.extend_from_slice(&bytes[8 + n..]);
    let unsummed_path = dir.path().join("unsummed.safetensors");
    std::fs::write(&unsummed_path, unsummed).unwrap();
    let o = kiln(&["eval", "--model", unsummed_path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("has no `kiln.checksums`: its tensors cannot be checked"),
        "{}",
        stderr(&o)
    );
    let bad = bad.to_str().unwrap();
    for args in [
        vec!["eval", "--model", bad],
        vec![
            "predict",
            "--model",
            bad,
            "--input",
            image.to_str().unwrap(),
        ],
    ] {
        let o = kiln(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stdout(&o));
        assert!(
            stderr(&o).contains("not finite"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

/// Output that cannot be written (`> /dev/full`: a full disk) ends the
/// command with one clear line and status 1, never `println!`'s panic —
/// on stdout, and on stderr carrying an error of its own.
#[test]
fn a_console_that_cannot_be_written_is_an_error_not_a_panic() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("skipped: no /dev/full here");
        return;
    };
    let run = |args: &[&str], stdout: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(args).env("KILN_THREADS", "1");
        if stdout {
            c.stdout(full.try_clone().unwrap());
        } else {
            c.stdout(std::process::Stdio::null())
                .stderr(full.try_clone().unwrap());
        }
        c.output().expect("running kiln")
    };
    let o = run(&["info"], true);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.starts_with("error: writing to stdout") && !err.contains("panicked"),
        "{err}"
    );
    // The error cannot be printed either: still status 1, not 101.
    let o = run(&["train", "--model", "no-such-model"], false);
    assert_eq!(o.status.code(), Some(1));
}
