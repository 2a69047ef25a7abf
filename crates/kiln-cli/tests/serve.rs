//! `kiln serve` under abuse, against a real server process: slow bodies,
//! SIGTERM with requests in flight, overflowing pixels, idle and
//! half-open connections, oversized heads, and bearer tokens.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

/// A small trained model, made once for every test here.
fn model() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "train", "--epochs", "1", "--limit", "500", "--plain", "--out",
            ])
            .arg(dir.path())
            .env("KILN_THREADS", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        dir
    });
    dir.path()
}

struct Served {
    child: Child,
    port: u16,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Served {
    fn start(extra: &[&str]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--addr", "127.0.0.1:0", "--model"])
            .arg(model())
            .args(extra)
            .env("KILN_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let port = first
            .split("127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {first:?}"));
        Served { child, port, lines }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// The server's thread count, from /proc.
    fn threads(&self) -> usize {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    }

    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the exit (at most `limit`), returning the status, the
    /// remaining stdout and the stderr.
    fn wait(mut self, limit: Duration) -> (std::process::ExitStatus, String, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let rest: Vec<String> = self.lines.by_ref().map_while(|l| l.ok()).collect();
                let mut err = String::new();
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                return (status, rest.join("\n"), err);
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("the server did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn request(method: &str, path: &str, headers: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Sends one request on `s` and reads the whole answer: (status, body).
fn exchange(mut s: TcpStream, raw: &str) -> (u16, String) {
    s.write_all(raw.as_bytes()).unwrap();
    read_answer(s)
}

fn read_answer(mut s: TcpStream) -> (u16, String) {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (code, body)
}

fn predict_body(pixel: &str) -> String {
    let image = vec![pixel; 784].join(",");
    format!("{{\"images\": [[{image}]]}}")
}

#[test]
fn slow_bodies_do_not_hold_up_valid_requests_and_are_timed_out() {
    let served = Served::start(&["--read-timeout", "3"]);
    // Fifty clients announce 100 kB and send one byte.
    let slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = served.connect();
            s.write_all(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
                .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let body = predict_body("0.5");
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let (code, answer) = exchange(served.connect(), &request("POST", "/v1/predict", "", &body));
        assert_eq!(code, 200, "{answer}");
        worst = worst.max(t.elapsed());
    }
    assert!(
        worst < Duration::from_secs(2),
        "a valid request took {worst:?} beside slow clients"
    );
    // Past the read timeout each slow client gets a 408 and is closed.
    for s in slow {
        let (code, answer) = read_answer(s);
        assert_eq!(code, 408, "{answer}");
    }
}

#[test]
fn sigterm_answers_every_request_already_sent_then_exits_within_the_grace() {
    let served = Served::start(&["--grace", "3", "--max-batch", "1", "--workers", "2"]);
    // One slow client that will never finish its body.
    let mut slow = served.connect();
    slow.write_all(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{")
        .unwrap();
    let body = predict_body("0.25");
    let clients = 40;
    let sent = Arc::new(Barrier::new(clients + 1));
    let port = served.port;
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (sent, raw) = (Arc::clone(&sent), request("POST", "/v1/predict", "", &body));
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(raw.as_bytes()).unwrap();
                sent.wait();
                read_answer(s)
            })
        })
        .collect();
    sent.wait();
    let t = Instant::now();
    served.terminate();
    for h in handles {
        let (code, answer) = h.join().unwrap();
        assert_eq!(
            code, 200,
            "a request sent before SIGTERM got {code}: {answer}"
        );
    }
    // The half-sent request is dropped: the connection closes.
    let (code, _) = read_answer(slow.try_clone().unwrap());
    assert_eq!(
        code, 0,
        "the slow client should be closed without an answer"
    );
    let _ = slow.write_all(b"}");
    let (status, out, _) = served.wait(Duration::from_secs(6));
    assert!(status.success(), "{status}");
    assert!(out.contains("stopped"), "{out}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drained in {:?}",
        t.elapsed()
    );
}

#[test]
fn pixels_beyond_f32_and_non_finite_outputs_are_errors_not_200s() {
    let served = Served::start(&[]);
    for (pixel, code) in [("1e39", 400), ("-1e39", 400), ("3e38", 422)] {
        let (got, answer) = exchange(
            served.connect(),
            &request("POST", "/v1/predict", "", &predict_body(pixel)),
        );
        assert_eq!(got, code, "{pixel}: {answer}");
        assert!(
            answer.contains("\"error\"") && !answer.contains("null"),
            "{pixel}: {answer}"
        );
    }
    let (got, answer) = exchange(
        served.connect(),
        &request("POST", "/v1/predict", "", &predict_body("1")),
    );
    assert_eq!(got, 200, "{answer}");
}

#[test]
fn connections_heads_and_paths_are_bounded() {
    let served = Served::start(&["--idle-timeout", "3", "--max-connections", "64"]);
    // The server is up and running its loop once it answers.
    assert_eq!(
        exchange(served.connect(), &request("GET", "/healthz", "", "")).0,
        200
    );
    let baseline = served.threads();
    // 200 half-open connections: each closes at once; their threads go too.
    for _ in 0..200 {
        let s = served.connect();
        s.shutdown(std::net::Shutdown::Both).unwrap();
    }
    let t = Instant::now();
    while served.threads() > baseline && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        served.threads() <= baseline,
        "{} threads, {baseline} before",
        served.threads()
    );

    // 80 idle connections against a limit of 64: the ones past it get a
    // 503 at once, the others are closed after the idle timeout.
    let opened = Instant::now();
    let idle: Vec<TcpStream> = (0..80).map(|_| served.connect()).collect();
    let (mut refused, mut closed) = (0, 0);
    for s in idle {
        match read_answer(s) {
            (503, _) => refused += 1,
            (0, _) => closed += 1,
            (code, body) => panic!("an idle connection got {code}: {body}"),
        }
    }
    let waited = opened.elapsed();
    assert!(
        refused >= 16 && closed <= 64 && closed > 0,
        "{refused} refused, {closed} closed"
    );
    assert!(
        waited > Duration::from_secs(2) && waited < Duration::from_secs(10),
        "idle connections closed after {waited:?} (idle timeout 3 s)"
    );

    // A 64 MB header line is cut off at the head limit.
    let mut s = served.connect();
    let t = Instant::now();
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nX-Big: ");
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..64 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let (code, _) = read_answer(s);
    assert_eq!(code, 431);
    assert!(t.elapsed() < Duration::from_secs(5));

    // A 404 does not echo the path.
    let (code, answer) = exchange(
        served.connect(),
        &request("GET", "/%3Cscript%3Esecret-path", "", ""),
    );
    assert_eq!(code, 404);
    assert!(
        !answer.contains("secret-path") && !answer.contains("script"),
        "{answer}"
    );
    // Chunked bodies and absurd lengths are refused plainly.
    let (code, _) = exchange(
        served.connect(),
        "POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_eq!(code, 501);
    let (code, _) = exchange(
        served.connect(),
        "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
    );
    assert_eq!(code, 413);
    // Past usize is over the limit too, not "not a number".
    let (code, _) = exchange(
        served.connect(),
        "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    );
    assert_eq!(code, 413);
    // Lines ended by bare LFs (RFC 9112 §2.2) are read as lines, at once.
    let t = Instant::now();
    let (code, answer) = exchange(
        served.connect(),
        "GET /healthz HTTP/1.1\nHost: x\nConnection: close\n\n",
    );
    assert_eq!(code, 200, "{answer}");
    assert!(t.elapsed() < Duration::from_secs(2));
    // A known path with the wrong method: 405 naming the method it takes.
    let whole = |raw: String| {
        let mut s = served.connect();
        s.write_all(raw.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    let answer = whole(request("DELETE", "/v1/predict", "", ""));
    assert!(
        answer.starts_with("HTTP/1.1 405")
            && answer.contains("\r\nAllow: POST\r\n")
            && answer.contains("takes POST"),
        "{answer}"
    );
    let answer = whole(request("POST", "/healthz", "", ""));
    assert!(
        answer.starts_with("HTTP/1.1 405") && answer.contains("\r\nAllow: GET\r\n"),
        "{answer}"
    );
    // Unknown fields and rows of pixels are named, as /v1/generate names them.
    let (code, answer) = exchange(
        served.connect(),
        &request(
            "POST",
            "/v1/predict",
            "",
            r#"{"images": [[0.5]], "imgs": 1}"#,
        ),
    );
    assert!(
        code == 400 && answer.contains("unknown field `imgs`"),
        "{answer}"
    );
    let rows = format!("{{\"image\": [{}]}}", vec!["[0.5, 0.5]"; 392].join(","));
    let (code, answer) = exchange(served.connect(), &request("POST", "/v1/predict", "", &rows));
    assert!(code == 400 && answer.contains("flatten"), "{answer}");
    // Two lengths that disagree (request smuggling's ground), or a sign.
    for lengths in [
        "Content-Length: 2\r\nContent-Length: 36",
        "Content-Length: +2",
    ] {
        let (code, answer) = exchange(
            served.connect(),
            &format!("POST /v1/predict HTTP/1.1\r\nHost: x\r\n{lengths}\r\n\r\n{{}}"),
        );
        assert_eq!(code, 400, "{lengths}: {answer}");
    }
}

#[test]
fn bearer_tokens_guard_every_endpoint_but_healthz_and_never_leak() {
    let dir = tempfile::tempdir().unwrap();
    let token = "0123456789abcdef-kiln-test-token";
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let served = Served::start(&["--token-file", file.to_str().unwrap()]);
    let body = predict_body("0.5");
    let post = |auth: &str| {
        exchange(
            served.connect(),
            &request("POST", "/v1/predict", auth, &body),
        )
    };
    let (code, answer) = post("");
    assert_eq!(code, 401, "{answer}");
    assert!(!answer.contains(token));
    assert_eq!(
        post("Authorization: Bearer 0123456789abcdef-kiln-test-tokem\r\n").0,
        401
    );
    assert_eq!(post("Authorization: Bearer 0123\r\n").0, 401);
    assert_eq!(post(&format!("Authorization: Bearer {token}\r\n")).0, 200);
    // The scheme is case-insensitive (RFC 9110); another scheme is not it.
    assert_eq!(post(&format!("Authorization: bearer {token}\r\n")).0, 200);
    assert_eq!(post(&format!("Authorization: Basic {token}\r\n")).0, 401);
    assert_eq!(
        exchange(served.connect(), &request("GET", "/metrics", "", "")).0,
        401
    );
    assert_eq!(
        exchange(served.connect(), &request("GET", "/healthz", "", "")).0,
        200
    );
    served.terminate();
    let (status, out, err) = served.wait(Duration::from_secs(10));
    assert!(status.success());
    assert!(!out.contains(token) && !err.contains(token), "{out}{err}");

    // A non-loopback address needs a token or --no-auth.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--addr", "0.0.0.0:0", "--model"])
        .arg(model())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("serves anyone who can reach it") && err.contains("--token-file"),
        "{err}"
    );
    // A short token is refused.
    std::fs::write(&file, "short").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--token-file",
            file.to_str().unwrap(),
            "--model",
        ])
        .arg(model())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 16 printable characters"));
    // A token and --no-auth contradict each other.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--no-auth", "--token-file"])
        .arg(&file)
        .arg("--model")
        .arg(model())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot be used with"), "{err}");
}
