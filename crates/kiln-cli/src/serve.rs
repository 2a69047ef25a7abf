//! `kiln serve`: a model behind an HTTP JSON endpoint.
//!
//! - `POST /v1/predict` with `{"images": [[…784 pixels in 0..1…], …]}` (or
//!   `{"image": […]}`) → `{"predictions": [{"class", "label",
//!   "probabilities"}, …]}`;
//! - for a language model (`kiln train --model gpt`), `POST /v1/generate`
//!   with `{"prompt": "ROMEO:", "tokens": 200, "temperature": 0.8,
//!   "top_k": 200, "seed": 1}` (all but the prompt optional) → `{"text",
//!   "completion", "prompt_tokens", "new_tokens", "seconds",
//!   "tokens_per_sec"}`, sampled with the key/value cache; prompts over
//!   `--max-prompt` characters, more than `--max-tokens` tokens, characters
//!   outside the model's vocabulary and unknown fields get a 400;
//! - `GET /healthz` → `{"status": "ok", …}`;
//! - `GET /metrics` → Prometheus text: requests by status, images
//!   classified, batches run, request latency.
//!
//! The HTTP side is [`crate::http`]: a thread per connection reads whole
//! requests within time and size limits and hands them to `--workers`
//! threads; the requests' images go to one batcher thread, which runs
//! everything waiting (up to `--max-batch` images) through the model at
//! once, so concurrent clients share forward passes. Bodies over
//! `--max-body` bytes, malformed JSON, wrong image sizes and pixels beyond
//! f32 get a 4xx with a JSON error, as does an output that is not finite
//! (never a 200 with NaN). Binds 127.0.0.1 unless told otherwise; any
//! other address needs `--token-file` (a bearer token on every endpoint but
//! `/healthz`) or an explicit `--no-auth`. SIGTERM or Ctrl-C drains: no new
//! connections, every request already read is answered, idle and half-read
//! connections are closed, and the server exits within `--grace` seconds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::{Error, Result};
use kiln_cpu::CpuBackend;
use kiln_nn::Sequential;
use kiln_train::Trainer;

use crate::http::{Request, Response, Server};
use serde_json::{json, Value};

/// The arguments of `kiln serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The model: a model file written by `kiln train` (or its folder), a
    /// checkpoint, or a folder of checkpoints (its newest).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Most images run through the model in one batch.
    #[arg(long, default_value_t = 256)]
    pub max_batch: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body: usize,
    /// Threads that handle complete requests (parse, batch, answer).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Connections open at once; more get a 503.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds to receive a whole request from its first byte (a 408 past it).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub read_timeout: f64,
    /// Seconds an open connection may wait for its next request.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub idle_timeout: f64,
    /// Seconds to drain after SIGTERM before exiting regardless.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub grace: f64,
    /// A file holding the bearer token every request but GET /healthz must
    /// send (`Authorization: Bearer TOKEN`); needed to bind a non-loopback address.
    #[arg(long, value_name = "FILE", conflicts_with = "no_auth")]
    pub token_file: Option<PathBuf>,
    /// Serve a non-loopback address without a token (anyone who can reach it may use it).
    #[arg(long)]
    pub no_auth: bool,
    /// Backend: cpu, or cpu:KERNELS.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Language models: the most tokens one request may generate.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Language models: the longest prompt accepted, in characters.
    #[arg(long, default_value_t = 4096)]
    pub max_prompt: usize,
}

impl ServeArgs {
    /// The HTTP limits the flags ask for, each checked.
    fn limits(&self) -> Result<crate::http::Limits> {
        let seconds = |flag: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 3600.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(Error::invalid(format!(
                    "{flag} {v}: expected seconds, more than 0 and at most 3600"
                )))
            }
        };
        let count = |flag: &str, v: usize, max: usize| {
            if (1..=max).contains(&v) {
                Ok(v)
            } else {
                Err(Error::invalid(format!("{flag} {v}: expected 1 to {max}")))
            }
        };
        count("--max-batch", self.max_batch, 1 << 16)?;
        count(
            "--max-tokens",
            self.max_tokens,
            kiln_train::generate::MAX_NEW_TOKENS,
        )?;
        count("--max-prompt", self.max_prompt, 1 << 20)?;
        Ok(crate::http::Limits {
            body_bytes: count("--max-body", self.max_body, 1 << 30)?,
            header_bytes: 16 * 1024,
            read_timeout: seconds("--read-timeout", self.read_timeout)?,
            idle_timeout: seconds("--idle-timeout", self.idle_timeout)?,
            connections: count("--max-connections", self.max_connections, 100_000)?,
            workers: kiln_cpu::check_threads("--workers", self.workers)?,
            grace: seconds("--grace", self.grace)?,
        })
    }

    /// The bearer token, if any; refuses an open non-loopback bind.
    fn token(&self) -> Result<Option<Vec<u8>>> {
        if let Some(path) = &self.token_file {
            let text = kiln_core::files::read(path, "token file")?;
            let token = text.trim_ascii().to_vec();
            if token.len() < 16 || token.iter().any(|b| !b.is_ascii_graphic()) {
                return Err(Error::invalid(format!(
                    "{}: a token is at least 16 printable characters on one line (e.g. `openssl rand -hex 32`)",
                    path.display()
                )));
            }
            return Ok(Some(token));
        }
        if !self.addr.ip().is_loopback() && !self.no_auth {
            return Err(Error::invalid(format!(
                "binding {} serves anyone who can reach it: pass --token-file FILE \
                 (clients then send `Authorization: Bearer TOKEN`) or --no-auth",
                self.addr
            )));
        }
        Ok(None)
    }
}

/// Images of one request, and where its answer goes.
struct Job {
    images: Vec<f32>,
    count: usize,
    reply: Sender<Result<Vec<f32>>>,
}

/// Counters for `/metrics`.
#[derive(Default)]
struct Metrics {
    requests: Mutex<std::collections::BTreeMap<u16, u64>>,
    images: AtomicU64,
    batches: AtomicU64,
    tokens: AtomicU64,
    latency_us_sum: AtomicU64,
    latency_count: AtomicU64,
}

impl Metrics {
    fn record(&self, status: u16, started: Instant) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry(status)
            .or_default() += 1;
        self.latency_us_sum
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    fn prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP kiln_requests_total HTTP requests answered, by status.\n# TYPE kiln_requests_total counter\n",
        );
        for (code, n) in self.requests.lock().expect("metrics lock").iter() {
            out += &format!("kiln_requests_total{{code=\"{code}\"}} {n}\n");
        }
        out += &format!(
            "# HELP kiln_images_total Images classified.\n# TYPE kiln_images_total counter\nkiln_images_total {}\n",
            self.images.load(Ordering::Relaxed)
        );
        out += &format!(
            "# HELP kiln_generated_tokens_total Tokens generated (language models).\n# TYPE kiln_generated_tokens_total counter\nkiln_generated_tokens_total {}\n",
            self.tokens.load(Ordering::Relaxed)
        );
        out += &format!(
            "# HELP kiln_batches_total Forward passes run (each may serve several requests).\n# TYPE kiln_batches_total counter\nkiln_batches_total {}\n",
            self.batches.load(Ordering::Relaxed)
        );
        out += &format!(
            "# HELP kiln_request_seconds Time from request to response.\n# TYPE kiln_request_seconds summary\nkiln_request_seconds_sum {}\nkiln_request_seconds_count {}\n",
            self.latency_us_sum.load(Ordering::Relaxed) as f64 * 1e-6,
            self.latency_count.load(Ordering::Relaxed)
        );
        out
    }
}

/// Runs every waiting job through the model in as few batches as possible.
fn batcher(
    trainer: Trainer<CpuBackend>,
    jobs: Receiver<Job>,
    max_batch: usize,
    metrics: Arc<Metrics>,
) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        let mut images = group[0].count;
        while images < max_batch {
            match jobs.try_recv() {
                Ok(j) => {
                    images += j.count;
                    group.push(j);
                }
                Err(_) => break,
            }
        }
        let flat: Vec<f32> = group
            .iter()
            .flat_map(|j| j.images.iter().copied())
            .collect();
        let result = trainer.predict(&flat, images).and_then(|t| t.to_vec_f32());
        metrics.batches.fetch_add(1, Ordering::Relaxed);
        metrics.images.fetch_add(images as u64, Ordering::Relaxed);
        match result {
            Ok(probs) => {
                let classes = probs.len() / images.max(1);
                let mut at = 0;
                for j in group {
                    let part = probs[at * classes..(at + j.count) * classes].to_vec();
                    at += j.count;
                    let _ = j.reply.send(Ok(part));
                }
            }
            Err(e) => {
                for j in group {
                    let _ = j.reply.send(Err(Error::Backend(e.to_string())));
                }
            }
        }
    }
}

fn error_body(msg: impl Into<String>) -> Value {
    json!({ "error": msg.into() })
}

/// Parses a predict request into flat pixels and the image count.
fn parse_images(body: &[u8], pixels: usize) -> std::result::Result<(Vec<f32>, usize), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let shape = "expected {\"images\": [[pixels…], …]} or {\"image\": [pixels…]}";
    // Fields beyond these are refused, as /v1/generate refuses them: a
    // misspelt one would otherwise be ignored.
    if let Some(other) = v
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "images" && *k != "image"))
    {
        return Err(format!("unknown field `{other}`: {shape}"));
    }
    let list: Vec<&Value> = match (v.get("images"), v.get("image")) {
        (Some(Value::Array(a)), None) => a.iter().collect(),
        (None, Some(one)) => vec![one],
        _ => return Err(shape.into()),
    };
    if list.is_empty() {
        return Err("no images given".into());
    }
    let mut flat = Vec::with_capacity(list.len() * pixels);
    for (i, img) in list.iter().enumerate() {
        let Some(px) = img.as_array() else {
            return Err(format!("image {i} is not an array of numbers"));
        };
        if px.len() != pixels {
            let rows = if px.first().is_some_and(Value::is_array) {
                " (rows of pixels: flatten each image into one array, row after row)"
            } else {
                ""
            };
            return Err(format!(
                "image {i} has {} pixels, the model takes {pixels}{rows}",
                px.len()
            ));
        }
        for (j, p) in px.iter().enumerate() {
            // Checked in f32, the type the model computes in: 1e39 is a
            // finite JSON number but ∞ there.
            match p.as_f64().map(|x| x as f32) {
                Some(x) if x.is_finite() => flat.push(x),
                Some(_) => {
                    return Err(format!(
                        "image {i} pixel {j} is {p}, beyond the f32 range the model computes in (pixels are 0..1)"
                    ))
                }
                None => return Err(format!("image {i} pixel {j} is {p}, not a number")),
            }
        }
    }
    Ok((flat, list.len()))
}

/// A language model being served: one generation at a time (each is
/// already as parallel as the backend makes it).
struct TextModel {
    model: Mutex<Sequential<CpuBackend>>,
    vocab: kiln_data::Vocab,
    max_tokens: usize,
    max_prompt: usize,
}

/// A `POST /v1/generate` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateRequest {
    prompt: String,
    /// Default: 200, or the server's `--max-tokens` if lower.
    #[serde(default)]
    tokens: Option<usize>,
    #[serde(default = "default_temperature")]
    temperature: f32,
    #[serde(default = "default_top_k")]
    top_k: usize,
    #[serde(default = "default_seed")]
    seed: u64,
}

/// What a JSON value is, for an error message.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn default_temperature() -> f32 {
    0.8
}
fn default_top_k() -> usize {
    200
}
fn default_seed() -> u64 {
    1
}

/// What every request needs: the batcher's queue (image models) or the
/// language model, the counters, the model's facts.
struct App {
    jobs: Mutex<Sender<Job>>,
    text: Option<TextModel>,
    metrics: Arc<Metrics>,
    pixels: usize,
    names: Vec<String>,
    model_name: String,
    token: Option<Vec<u8>>,
}

impl App {
    /// Answers one request, counting it.
    fn handle(&self, req: Request) -> Response {
        let started = Instant::now();
        let r = self.route(req);
        self.metrics.record(r.status, started);
        r
    }

    fn route(&self, req: Request) -> Response {
        let err = |status, msg: String| Response::json(status, &error_body(msg));
        let known = matches!(
            req.path.as_str(),
            "/healthz" | "/metrics" | "/v1/predict" | "/v1/generate"
        );
        if req.path != "/healthz" {
            if let Some(token) = &self.token {
                let given = req
                    .headers
                    .get("authorization")
                    // The scheme is case-insensitive (RFC 9110, 11.1).
                    .and_then(|v| v.split_once(' '))
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, t)| t.trim());
                if !given.is_some_and(|g| crate::http::constant_time_eq(g.as_bytes(), token)) {
                    let mut r = err(401, "a valid bearer token is required".into());
                    r.headers.push(("WWW-Authenticate", "Bearer".into()));
                    return r;
                }
            }
        }
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/healthz") => {
                Response::json(200, &json!({"status": "ok", "model": self.model_name}))
            }
            ("GET", "/metrics") => Response {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                headers: Vec::new(),
                body: self.metrics.prometheus().into_bytes(),
            },
            ("POST", "/v1/predict") if self.text.is_some() => err(
                404,
                format!("model `{}` generates text: POST /v1/generate", self.model_name),
            ),
            ("POST", "/v1/predict") => self.predict(&req.body),
            ("POST", "/v1/generate") => match &self.text {
                Some(text) => self.generate(text, &req.body),
                None => err(
                    404,
                    format!("model `{}` classifies images: POST /v1/predict", self.model_name),
                ),
            },
            _ if known => {
                let allow = match req.path.as_str() {
                    "/healthz" | "/metrics" => "GET",
                    _ => "POST",
                };
                let mut r = err(405, format!("method not allowed: {} takes {allow}", req.path));
                r.headers.push(("Allow", allow.into()));
                r
            }
            // The path is not echoed back.
            _ => err(
                404,
                "no such endpoint: try POST /v1/predict (or /v1/generate), GET /healthz or GET /metrics".into(),
            ),
        }
    }

    fn generate(&self, text: &TextModel, body: &[u8]) -> Response {
        let err = |status, msg: String| Response::json(status, &error_body(msg));
        let shape = "expected {\"prompt\": \"…\", \"tokens\": N, \"temperature\": T, \"top_k\": K, \"seed\": S}";
        // Parsed once; serde reads a struct from an array too, by
        // position: an object only.
        let r: GenerateRequest = match serde_json::from_slice::<Value>(body) {
            Ok(v) if v.is_object() => match serde_json::from_value(v) {
                Ok(r) => r,
                Err(e) => return err(400, format!("{shape}: {e}")),
            },
            Ok(v) => return err(400, format!("{shape}, got {}", json_kind(&v))),
            Err(e) => return err(400, format!("{shape}: {e}")),
        };
        let chars = r.prompt.chars().count();
        if chars > text.max_prompt {
            return err(
                400,
                format!("the prompt has {chars} characters; this server takes at most {} (--max-prompt)", text.max_prompt),
            );
        }
        let tokens = r.tokens.unwrap_or(200.min(text.max_tokens));
        if tokens == 0 || tokens > text.max_tokens {
            return err(
                400,
                format!("{tokens} tokens asked for; this server generates 1 to {} per request (--max-tokens)", text.max_tokens),
            );
        }
        let cfg = kiln_train::SampleConfig {
            tokens,
            temperature: r.temperature,
            top_k: (r.top_k > 0).then_some(r.top_k),
            seed: r.seed,
            cache: true,
        };
        if let Err(e) = cfg.check() {
            return err(400, e.to_string());
        }
        if let Err(e) = text.vocab.encode(&r.prompt) {
            return err(400, e.to_string());
        }
        let Ok(model) = text.model.lock() else {
            return err(
                500,
                "the model is unavailable after an earlier failure".into(),
            );
        };
        match kiln_train::generate(&model, &text.vocab, &r.prompt, &cfg) {
            Ok(g) => {
                self.metrics
                    .tokens
                    .fetch_add(g.new_tokens as u64, Ordering::Relaxed);
                Response::json(200, &json!(g))
            }
            // The request was fine; the model's numbers were not (as
            // /v1/predict answers for outputs that are not finite).
            Err(Error::InvalidArgument(msg))
                if msg.starts_with(kiln_train::generate::NOT_FINITE) =>
            {
                err(422, msg)
            }
            Err(Error::InvalidArgument(msg)) => err(400, msg),
            Err(e) => err(500, e.to_string()),
        }
    }

    fn predict(&self, body: &[u8]) -> Response {
        let err = |status, msg: String| Response::json(status, &error_body(msg));
        let (images, count) = match parse_images(body, self.pixels) {
            Ok(x) => x,
            Err(msg) => return err(400, msg),
        };
        let (tx, rx) = channel();
        let sent = self.jobs.lock().is_ok_and(|j| {
            j.send(Job {
                images,
                count,
                reply: tx,
            })
            .is_ok()
        });
        match sent.then(|| rx.recv().ok()).flatten() {
            // Huge (finite) pixels can overflow inside the model: never
            // answer 200 with NaN.
            Some(Ok(probs)) if probs.iter().any(|p| !p.is_finite()) => {
                let classes = (probs.len() / count.max(1)).max(1);
                let bad = probs
                    .chunks(classes)
                    .position(|p| p.iter().any(|v| !v.is_finite()))
                    .unwrap_or(0);
                err(
                    422,
                    format!("image {bad}: the model's output is not finite for these pixels (they are far outside 0..1)"),
                )
            }
            Some(Ok(probs)) => {
                let classes = (probs.len() / count.max(1)).max(1);
                let preds: Vec<Value> = probs
                    .chunks_exact(classes)
                    .map(|p| {
                        let best = (0..p.len()).fold(0, |b, j| if p[j] > p[b] { j } else { b });
                        json!({"class": best, "label": self.names.get(best), "probabilities": p})
                    })
                    .collect();
                Response::json(200, &json!({ "predictions": preds }))
            }
            Some(Err(e)) => err(500, e.to_string()),
            None => err(503, "shutting down".into()),
        }
    }
}

/// Runs `kiln serve` until SIGTERM or Ctrl-C.
pub fn serve(a: ServeArgs, backend: CpuBackend, stop: Arc<AtomicBool>) -> Result<()> {
    // The flags first, so a mistake costs no model load.
    let limits = a.limits()?;
    let token = a.token()?;
    // Model files and checkpoints alike (a checkpoint's optimiser state is ignored).
    let (loaded, _) = crate::load_model(&a.model, &backend)?;
    let text = match loaded.model.takes_tokens() {
        true => Some(kiln_train::lm::vocab_for(&loaded.model, &loaded.metadata)?),
        false => None,
    };
    let pixels: usize = loaded.model.input_shape().iter().product();
    let model_name = loaded.model.name().to_string();
    let classes: usize = loaded.model.output_shape()?.iter().product();
    let dataset = loaded
        .metadata
        .get("kiln.dataset")
        .cloned()
        .unwrap_or_default();
    let names = Arc::new(kiln_data::dataset::class_names(&dataset, classes));
    let (text, trainer) = match text {
        Some(vocab) => (
            Some(TextModel {
                model: Mutex::new(loaded.model),
                vocab,
                max_tokens: a.max_tokens,
                max_prompt: a.max_prompt,
            }),
            None,
        ),
        None => (None, Some(Trainer::for_inference(loaded.model, backend)?)),
    };

    let server = Server::bind(a.addr, limits)?;
    let local = server.local_addr()?;
    let metrics = Arc::new(Metrics::default());
    let (jobs, queue) = channel();
    let batch_metrics = Arc::clone(&metrics);
    let max_batch = a.max_batch;
    let batch_thread = trainer
        .map(|trainer| {
            std::thread::Builder::new()
                .name("kiln-batcher".into())
                .spawn(move || batcher(trainer, queue, max_batch, batch_metrics))
                .map_err(|e| Error::io("starting the batcher thread".to_string(), e))
        })
        .transpose()?;
    let endpoint = if text.is_some() {
        "POST /v1/generate"
    } else {
        "POST /v1/predict"
    };
    let app = Arc::new(App {
        jobs: Mutex::new(jobs),
        text,
        metrics,
        pixels,
        names: names.to_vec(),
        model_name: model_name.clone(),
        token,
    });
    let auth = if app.token.is_some() {
        ", bearer token required"
    } else {
        ""
    };
    println!("serving model `{model_name}` on http://{local} ({endpoint}, GET /healthz, GET /metrics{auth})");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let handler_app = Arc::clone(&app);
    server.run(Arc::new(move |req| handler_app.handle(req)), stop)?;
    // Every request is answered; dropping the queue's sender ends the batcher.
    drop(app);
    if let Some(t) = batch_thread {
        let _ = t.join();
    }
    println!("stopped");
    Ok(())
}
