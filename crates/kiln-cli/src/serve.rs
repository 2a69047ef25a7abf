//! `kiln serve`: a model behind an HTTP JSON endpoint.
//!
//! - `POST /v1/predict` with `{"images": [[…784 pixels in 0..1…], …]}` (or
//!   `{"image": […]}`) → `{"predictions": [{"class", "label",
//!   "probabilities"}, …]}`;
//! - `GET /healthz` → `{"status": "ok", …}`;
//! - `GET /metrics` → Prometheus text: requests by status, images
//!   classified, batches run, request latency.
//!
//! Connections are read by a few handler threads; the requests' images go
//! to one batcher thread, which runs everything waiting (up to
//! `--max-batch` images) through the model at once, so concurrent clients
//! share forward passes. Bodies over `--max-body` bytes, malformed JSON,
//! wrong image sizes and non-finite pixels get a 4xx with a JSON error.
//! Binds 127.0.0.1 unless told otherwise; SIGTERM or Ctrl-C stops it
//! cleanly (in-flight requests finish).

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::{Error, Result};
use kiln_cpu::CpuBackend;
use kiln_train::{model_file, Trainer};
use serde_json::{json, Value};

/// The arguments of `kiln serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The model: a model file written by `kiln train` (or its folder), or a checkpoint.
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
    /// Connection-handling threads.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Backend: cpu, or cpu:KERNELS.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
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

/// A JSON response.
fn respond(
    req: tiny_http::Request,
    status: u16,
    body: &Value,
    metrics: &Metrics,
    started: Instant,
) {
    let header =
        tiny_http::Header::from_bytes("Content-Type", "application/json").expect("a valid header");
    let r = tiny_http::Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(header);
    let _ = req.respond(r);
    metrics.record(status, started);
}

fn error_body(msg: impl Into<String>) -> Value {
    json!({ "error": msg.into() })
}

/// Parses a predict request into flat pixels and the image count.
fn parse_images(body: &[u8], pixels: usize) -> std::result::Result<(Vec<f32>, usize), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let list: Vec<&Value> = match (v.get("images"), v.get("image")) {
        (Some(Value::Array(a)), None) => a.iter().collect(),
        (None, Some(one)) => vec![one],
        _ => return Err("expected {\"images\": [[pixels…], …]} or {\"image\": [pixels…]}".into()),
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
            return Err(format!(
                "image {i} has {} pixels, the model takes {pixels}",
                px.len()
            ));
        }
        for p in px {
            match p.as_f64() {
                Some(x) if x.is_finite() => flat.push(x as f32),
                _ => return Err(format!("image {i} holds {p}, not a finite number")),
            }
        }
    }
    Ok((flat, list.len()))
}

/// Handles requests until `stop` is set.
#[allow(clippy::too_many_arguments)]
fn handle(
    server: Arc<tiny_http::Server>,
    jobs: Sender<Job>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    pixels: usize,
    names: Arc<Vec<String>>,
    model_name: String,
    max_body: usize,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut req = match server.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(_) => break,
        };
        let started = Instant::now();
        let url = req.url().split('?').next().unwrap_or("").to_string();
        match (req.method(), url.as_str()) {
            (tiny_http::Method::Get, "/healthz") => {
                let body = json!({"status": "ok", "model": model_name});
                respond(req, 200, &body, &metrics, started);
            }
            (tiny_http::Method::Get, "/metrics") => {
                let text = metrics.prometheus();
                let header =
                    tiny_http::Header::from_bytes("Content-Type", "text/plain; version=0.0.4")
                        .expect("a valid header");
                let _ = req.respond(tiny_http::Response::from_string(text).with_header(header));
                metrics.record(200, started);
            }
            (tiny_http::Method::Post, "/v1/predict") => {
                if req.body_length().is_some_and(|n| n > max_body) {
                    let msg = format!("the body is over the {max_body}-byte limit");
                    respond(req, 413, &error_body(msg), &metrics, started);
                    continue;
                }
                let mut body = Vec::new();
                let read = req
                    .as_reader()
                    .take(max_body as u64 + 1)
                    .read_to_end(&mut body);
                if read.is_err() {
                    respond(
                        req,
                        400,
                        &error_body("could not read the body"),
                        &metrics,
                        started,
                    );
                    continue;
                }
                if body.len() > max_body {
                    let msg = format!("the body is over the {max_body}-byte limit");
                    respond(req, 413, &error_body(msg), &metrics, started);
                    continue;
                }
                let (images, count) = match parse_images(&body, pixels) {
                    Ok(x) => x,
                    Err(msg) => {
                        respond(req, 400, &error_body(msg), &metrics, started);
                        continue;
                    }
                };
                let (tx, rx) = channel();
                let sent = jobs.send(Job {
                    images,
                    count,
                    reply: tx,
                });
                match sent.ok().and_then(|_| rx.recv().ok()) {
                    Some(Ok(probs)) => {
                        let classes = probs.len() / count.max(1);
                        let preds: Vec<Value> = probs
                            .chunks_exact(classes.max(1))
                            .map(|p| {
                                let best =
                                    (0..p.len()).fold(0, |b, j| if p[j] > p[b] { j } else { b });
                                json!({"class": best, "label": names.get(best), "probabilities": p})
                            })
                            .collect();
                        respond(
                            req,
                            200,
                            &json!({ "predictions": preds }),
                            &metrics,
                            started,
                        );
                    }
                    Some(Err(e)) => {
                        respond(req, 500, &error_body(e.to_string()), &metrics, started)
                    }
                    None => respond(req, 503, &error_body("shutting down"), &metrics, started),
                }
            }
            (_, "/healthz" | "/metrics" | "/v1/predict") => {
                respond(
                    req,
                    405,
                    &error_body("method not allowed"),
                    &metrics,
                    started,
                );
            }
            _ => respond(
                req,
                404,
                &error_body(format!("no endpoint {url}")),
                &metrics,
                started,
            ),
        }
    }
}

/// Runs `kiln serve` until SIGTERM or Ctrl-C.
pub fn serve(a: ServeArgs, backend: CpuBackend, stop: Arc<AtomicBool>) -> Result<()> {
    // Model files and checkpoints alike (a checkpoint's optimiser state is ignored).
    let (loaded, _) = model_file::load_for_inference(&a.model, &backend)?;
    let pixels: usize = loaded.model.input_shape().iter().product();
    let model_name = loaded.model.name().to_string();
    let classes: usize = loaded.model.output_shape()?.iter().product();
    let dataset = loaded
        .metadata
        .get("kiln.dataset")
        .cloned()
        .unwrap_or_default();
    let names = Arc::new(kiln_data::dataset::class_names(&dataset, classes));
    let trainer = Trainer::for_inference(loaded.model, backend)?;

    let server = tiny_http::Server::http(a.addr)
        .map_err(|e| Error::invalid(format!("cannot listen on {}: {e}", a.addr)))?;
    let local = server
        .server_addr()
        .to_ip()
        .map_or_else(|| a.addr.to_string(), |s| s.to_string());
    let server = Arc::new(server);
    let metrics = Arc::new(Metrics::default());
    let (jobs, queue) = channel();
    let batch_metrics = Arc::clone(&metrics);
    let max_batch = a.max_batch.max(1);
    let batch_thread = std::thread::Builder::new()
        .name("kiln-batcher".into())
        .spawn(move || batcher(trainer, queue, max_batch, batch_metrics))
        .map_err(|e| Error::io("starting the batcher thread".to_string(), e))?;
    let handlers: Vec<_> = (0..a.workers.max(1))
        .map(|i| {
            let (server, jobs, metrics, stop, names) = (
                Arc::clone(&server),
                jobs.clone(),
                Arc::clone(&metrics),
                Arc::clone(&stop),
                Arc::clone(&names),
            );
            let (name, max_body) = (model_name.clone(), a.max_body);
            std::thread::Builder::new()
                .name(format!("kiln-http-{i}"))
                .spawn(move || handle(server, jobs, metrics, stop, pixels, names, name, max_body))
                .map_err(|e| Error::io("starting an HTTP thread".to_string(), e))
        })
        .collect::<Result<_>>()?;
    drop(jobs);
    println!("serving model `{model_name}` on http://{local} (POST /v1/predict, GET /healthz, GET /metrics)");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    for h in handlers {
        let _ = h.join();
    }
    // Every sender is gone: the batcher finishes what it has and returns.
    let _ = batch_thread.join();
    println!("stopped");
    Ok(())
}
