//! The GPT from the command line: train on a text file, resume, generate
//! with and without the cache, serve `/v1/generate`, and clear errors.

use std::io::{BufRead, BufReader, Lines, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Output, Stdio};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_THREADS", "2")
        .output()
        .expect("running kiln")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A tiny GPT spec and a text to train it on, in `dir`.
fn setup(dir: &Path) -> (String, String) {
    let spec = dir.join("tiny.toml");
    std::fs::write(
        &spec,
        "name = \"gpt-tiny\"\n[gpt]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\n",
    )
    .unwrap();
    let corpus = dir.join("corpus.txt");
    std::fs::write(
        &corpus,
        "to be, or not to be: that is the question.\n".repeat(60),
    )
    .unwrap();
    (
        spec.to_str().unwrap().to_string(),
        format!("text:{}", corpus.display()),
    )
}

fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        code,
        out.split_once("\r\n\r\n").map_or("", |x| x.1).to_string(),
    )
}

/// A `kiln serve --addr 127.0.0.1:0 … --model MODEL` on one thread: the
/// child, the reader of its stdout past the first line (it prints
/// `stopped` as it exits), and the port that line names.
fn serve(model: &str, extra: &[&str]) -> (Child, Lines<BufReader<ChildStdout>>, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .args(extra)
        .args(["--model", model])
        .env("KILN_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("POST /v1/"), "{first}");
    let port: u16 = first
        .split("127.0.0.1:")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (child, lines, port)
}

/// SIGTERM to a server from [`serve`]; it must exit cleanly.
fn stop(mut child: Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn train_resume_generate_and_serve_a_gpt() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, dataset) = setup(dir.path());
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let args = [
        "train",
        "--model",
        &spec,
        "--dataset",
        &dataset,
        "--iters",
        "40",
        "--eval-every",
        "20",
        "--eval-iters",
        "2",
        "--batch-size",
        "4",
        "--warmup",
        "4",
        "--lr",
        "3e-3",
        "--checkpoint-every",
        "20",
        // Not the default, so that a resume must take it from the checkpoint.
        "--seed",
        "7",
        "--plain",
        "--out",
        run_s,
    ];
    let o = kiln(&args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for want in [
        "lm_head (LmHead)",
        "iter 20/40 train_loss",
        "tok/s",
        "MiB peak",
        "validation loss",
        "sample (200 tokens",
    ] {
        assert!(out.contains(want), "{want:?} missing from\n{out}");
    }
    let history = std::fs::read_to_string(run.join("history.jsonl")).unwrap();
    assert_eq!(history.lines().count(), 2);
    assert!(run.join("checkpoints/ckpt-000000020.safetensors").exists());

    // Resuming from step 20 ends where the whole run ended, bit for bit.
    let whole = std::fs::read(run.join("model.safetensors")).unwrap();
    let again = dir.path().join("again");
    let mut resume: Vec<&str> = args.to_vec();
    let ckpt = run.join("checkpoints/ckpt-000000020.safetensors");
    let ckpt = ckpt.to_str().unwrap().to_string();
    resume.splice(resume.len() - 1.., [again.to_str().unwrap()]);
    resume.extend(["--resume", &ckpt]);
    let o = kiln(&resume);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("resuming from") && out.contains("step 20 of 40"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(again.join("model.safetensors")).unwrap(),
        whole
    );
    // `--resume` alone (the interrupt message's advice) continues the run
    // with its checkpoint's corpus, length, batch, seed, rate and schedule.
    let alone = dir.path().join("alone");
    let o = kiln(&[
        "train",
        "--resume",
        &ckpt,
        "--eval-every",
        "20",
        "--eval-iters",
        "2",
        "--plain",
        "--out",
        alone.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(
        std::fs::read(alone.join("model.safetensors")).unwrap(),
        whole
    );
    // Another rate would move the whole schedule: refused, not used.
    let o = kiln(&["train", "--resume", &ckpt, "--lr", "1e-3", "--plain"]);
    let err = text(&o).1;
    assert!(
        !o.status.success()
            && err.contains("learning-rate schedule")
            && err.contains("peak: 0.003"),
        "{err}"
    );
    // The corpus edited since: said so, not "used X, this one X".
    // (The same characters, so the vocabulary still matches.)
    let corpus = std::path::PathBuf::from(dataset.trim_start_matches("text:"));
    let original = std::fs::read(&corpus).unwrap();
    std::fs::write(
        &corpus,
        "to be, or not to be: the question is that.\n".repeat(60),
    )
    .unwrap();
    let o = kiln(&["train", "--resume", &ckpt, "--plain"]);
    let err = text(&o).1;
    assert!(
        !o.status.success() && err.contains("has changed since the checkpoint"),
        "{err}"
    );
    std::fs::write(&corpus, original).unwrap();

    // Generation: the same text from the cache and from recomputation
    // (greedy, within the block), JSON timings.
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            run_s,
            "--prompt",
            "to be",
            "--tokens",
            "10",
            "--temperature",
            "0",
        ];
        a.extend(extra);
        let o = kiln(&a);
        assert!(o.status.success(), "{}", text(&o).1);
        text(&o)
    };
    let (cached, note) = gen(&[]);
    let (recomputed, _) = gen(&["--no-cache"]);
    assert_eq!(cached, recomputed);
    assert!(
        cached.starts_with("to be") && note.contains("tokens/s (key/value cache"),
        "{note}"
    );
    let (json, _) = gen(&["--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["new_tokens"], 10);
    assert!(v["tokens_per_sec"].as_f64().unwrap() > 0.0);
    for cmd in ["eval", "predict"] {
        let mut a = vec![cmd, "--model", run_s];
        if cmd == "predict" {
            a.extend(["--input", "corpus.txt"]);
        }
        let o = kiln(&a);
        let err = text(&o).1;
        assert!(
            !o.status.success()
                && err.contains("is a language model")
                && err.contains("kiln generate"),
            "{cmd}: {err}"
        );
    }
    let o = kiln(&["generate", "--model", run_s, "--prompt", "ZEBRA"]);
    assert!(
        !o.status.success() && text(&o).1.contains("not in the model's vocabulary"),
        "{}",
        text(&o).1
    );

    // Serving: /v1/generate answers, bounds its inputs with 400s, and
    // /v1/predict says where to go.
    let (child, mut lines, port) = serve(run_s, &["--max-tokens", "50"]);
    let (code, body) = http(
        port,
        "POST",
        "/v1/generate",
        r#"{"prompt": "to be", "tokens": 10, "temperature": 0}"#,
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["text"].as_str().unwrap(), cached.trim_end_matches('\n'));
    for (req, want) in [
        (
            r#"{"prompt": "to be", "tokens": 51}"#,
            "1 to 50 per request",
        ),
        (r#"{"prompt": "ZEBRA"}"#, "vocabulary"),
        (r#"{"prompt": ""}"#, "empty"),
        (r#"{"prompt": "to", "temperature": -1}"#, "temperature"),
        (r#"{"prompt": "to", "tokens": 0}"#, "generates 1 to 50"),
        (r#"["to be", 5, 0.8, 200, 1]"#, "got an array"),
        (r#"{"prompt": "to", "top_p": 0.9}"#, "unknown field"),
        ("not json", "expected"),
    ] {
        let (code, body) = http(port, "POST", "/v1/generate", req);
        assert_eq!(code, 400, "{req}: {body}");
        assert!(body.contains(want), "{req}: {body}");
    }
    let (code, body) = http(port, "POST", "/v1/predict", r#"{"image": [0]}"#);
    assert!(code == 404 && body.contains("/v1/generate"), "{body}");
    let (code, body) = http(port, "GET", "/metrics", "");
    assert!(
        code == 200 && body.contains("kiln_generated_tokens_total 10"),
        "{body}"
    );
    stop(child);
    assert_eq!(lines.next().unwrap().unwrap(), "stopped");
}

#[test]
fn bad_gpt_runs_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, dataset) = setup(dir.path());
    let bin = dir.path().join("bin.txt");
    std::fs::write(&bin, [b'a', 0xff, b'b']).unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "abcdefgh").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![format!("text:{}", bin.display())], "not UTF-8"),
        (vec![format!("text:{}", empty.display())], "is empty"),
        (
            vec![format!("text:{}", short.display())],
            "needs at least 17",
        ),
        (
            vec![dataset.clone(), "--epochs".into(), "2".into()],
            "--epochs is for image models",
        ),
        (
            vec![dataset.clone(), "--eval-every".into(), "0".into()],
            "--eval-every",
        ),
        (
            vec![dataset.clone(), "--grad-clip=-1".into()],
            "--grad-clip",
        ),
        (
            vec![dataset.clone(), "--precision".into(), "f16".into()],
            "use --precision bf16",
        ),
        (
            vec![dataset.clone(), "--min-lr".into(), "1".into()],
            "--min-lr 1: expected 0 to the peak",
        ),
        (
            vec![dataset.clone(), "--beta2".into(), "1".into()],
            "--beta2 1: expected 0 ≤ β₂ < 1",
        ),
        (
            vec![dataset.clone(), "--warmup".into(), "3".into()],
            "--warmup 3 is longer than the run (--iters 2)",
        ),
        (
            vec![dataset.clone(), "--weight-decay".into(), "1e9".into()],
            "weight decay 1e9 at learning rate 0.001: each step scales the weights by 1 − lr·wd",
        ),
        (
            vec![dataset.clone(), "--weight-decay=-1".into()],
            "weight decay -1: expected a finite decay of 0 or more",
        ),
        (
            vec![dataset.clone(), "--momentum".into(), "0.5".into()],
            "--momentum is for --optimizer sgd",
        ),
    ];
    for (extra, want) in cases {
        let mut a = vec![
            "train",
            "--model",
            &spec,
            "--iters",
            "2",
            "--plain",
            "--dataset",
        ];
        let out = dir.path().join("out");
        a.extend(extra.iter().map(String::as_str));
        a.extend(["--out", out.to_str().unwrap()]);
        let o = kiln(&a);
        let (_, err) = text(&o);
        assert!(
            !o.status.success() && err.contains(want),
            "{extra:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // A rate f32 cannot hold is refused as typed, not reported as 0.
    let o = kiln(&["train", "--model", "gpt", "--lr", "1e-50"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).1.contains("1e-50 is outside the range of f32"),
        "{}",
        text(&o).1
    );
    for (flag, value) in [
        ("--iters", "3"),
        ("--warmup", "3"),
        ("--min-lr", "1e-4"),
        ("--eval-every", "3"),
        ("--eval-iters", "3"),
        ("--weight-decay", "0.1"),
        ("--beta2", "0.9"),
        ("--grad-clip", "0.5"),
        ("--accumulate", "2"),
    ] {
        let o = kiln(&["train", flag, value]);
        assert!(
            text(&o).1.contains(&format!("{flag} is for GPT runs")),
            "{flag}: {}",
            text(&o).1
        );
    }
    // An image model on text is named as such, not looked for as a file.
    for extra in [&[][..], &["--epochs", "1"]] {
        let mut a = vec!["train", "--model", "mlp", "--dataset", "shakespeare"];
        a.extend(extra);
        let (_, err) = text(&kiln(&a));
        assert!(
            err.contains("--model mlp is not a language model and --dataset shakespeare is text"),
            "{extra:?}: {err}"
        );
    }
}

/// A text with no new line (the default prompt) still trains, samples and
/// generates: both start from the vocabulary's first character; a prompt
/// outside the vocabulary is refused with the vocabulary listed.
#[test]
fn a_text_without_new_lines_trains_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, _) = setup(dir.path());
    let corpus = dir.path().join("one-line.txt");
    std::fs::write(&corpus, "abcab".repeat(60)).unwrap();
    let out = dir.path().join("run");
    let o = kiln(&[
        "train",
        "--model",
        &spec,
        "--iters",
        "3",
        "--eval-every",
        "3",
        "--eval-iters",
        "1",
        "--plain",
        "--dataset",
        &format!("text:{}", corpus.display()),
        "--out",
        out.to_str().unwrap(),
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout.contains("sample (200 tokens"), "{stdout}");
    let run = out.to_str().unwrap();
    // `kiln plot` draws a GPT run's curves as `kiln train` did.
    let again = out.join("again");
    let o = kiln(&["plot", run, "--out", again.to_str().unwrap()]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        stdout.contains("curves.svg") || err.contains("fonts-dejavu-core"),
        "{stdout}{err}"
    );
    // Losses near f64's limit (a run that diverged, a hand-edited file)
    // are drawn, not searched for ticks without end.
    let history = std::fs::read_to_string(out.join("history.jsonl")).unwrap();
    let mut records: Vec<serde_json::Value> = history
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    records[0]["train_loss"] = 1.7e308.into();
    let last = records.len() - 1;
    records[last]["val_loss"] = (-1.7e308).into();
    let extreme = out.join("extreme.jsonl");
    let lines: Vec<String> = records.iter().map(|r| r.to_string()).collect();
    std::fs::write(&extreme, lines.join("\n") + "\n").unwrap();
    let mut plot = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["plot", extreme.to_str().unwrap(), "--out"])
        .arg(out.join("extreme"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = plot.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            plot.kill().unwrap();
            panic!("kiln plot still running after 60 s on losses of ±1.7e308");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "kiln plot on losses of ±1.7e308: {status}"
    );
    let o = kiln(&["generate", "--model", run, "--tokens", "20"]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout.trim().starts_with('a'), "{stdout}");
    let o = kiln(&["generate", "--model", run, "--prompt", "x"]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("'x'") && err.contains("\"abc\""),
        "{err}"
    );
}

/// A model file whose numbers overflow — every token vector at 1e38, the
/// checksums removed as a program rewriting it would — is refused by
/// `kiln generate` (status 1, one line) and answered with 422 by `kiln
/// serve`, which keeps serving; sampling among NaN logits had printed a
/// run of newlines and answered 200.
#[test]
fn a_model_whose_logits_overflow_is_refused_not_sampled() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, dataset) = setup(dir.path());
    let run = dir.path().join("run");
    let o = kiln(&[
        "train",
        "--model",
        &spec,
        "--dataset",
        &dataset,
        "--iters",
        "2",
        "--eval-every",
        "2",
        "--eval-iters",
        "1",
        "--batch-size",
        "2",
        "--warmup",
        "1",
        "--plain",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    // safetensors: an 8-byte header length, the JSON header, the data.
    let bytes = std::fs::read(run.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    header["__metadata__"]
        .as_object_mut()
        .unwrap()
        .remove("kiln.checksums");
    let at = &header["0.embedding.table"]["data_offsets"];
    let (start, end) = (
        at[0].as_u64().unwrap() as usize,
        at[1].as_u64().unwrap() as usize,
    );
    for x in data[start..end].chunks_exact_mut(4) {
        x.copy_from_slice(&1e38f32.to_le_bytes());
    }
    let mut head = header.to_string().into_bytes();
    head.resize(head.len().next_multiple_of(8), b' ');
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let mut file = (head.len() as u64).to_le_bytes().to_vec();
    file.extend(head);
    file.extend(data);
    std::fs::write(broken.join("model.safetensors"), file).unwrap();
    let broken_s = broken.to_str().unwrap();

    let o = kiln(&[
        "generate", "--model", broken_s, "--prompt", "to be", "--tokens", "5",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        out.is_empty() && err.contains("the model's output is not finite"),
        "{out}{err}"
    );

    let (child, _lines, port) = serve(broken_s, &[]);
    let (code, body) = http(
        port,
        "POST",
        "/v1/generate",
        r#"{"prompt": "to be", "tokens": 5}"#,
    );
    assert!(code == 422 && body.contains("not finite"), "{code} {body}");
    let (code, _) = http(port, "GET", "/healthz", "");
    assert_eq!(code, 200);
    stop(child);
}
