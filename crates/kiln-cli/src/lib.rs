//! # kiln-cli
//!
//! The `kiln` command line — `info`, `train`, `eval`, `conformance`,
//! `predict`, `serve`, `plot` — as a library, so that a crate with a
//! backend of its own gets the whole command line for it from one call:
//!
//! ```no_run
//! // src/main.rs of a vendor crate; `kiln_cpu::CpuBackend` stands in for
//! // the vendor's own `Backend`.
//! fn main() -> std::process::ExitCode {
//!     kiln_cli::run_with(|| Ok(kiln_cpu::CpuBackend::reference()))
//! }
//! ```
//!
//! In such a program `--backend device` (the default of `train`, `eval`
//! and `conformance`) names the vendor's backend; `cpu`, `cpu:KERNELS` and
//! `cuda[:N]` still name kiln's own, for comparison. Reproduction lines
//! name the program as it was started, so they rerun as printed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use kiln_core::{Backend, Error, Result};
use kiln_cpu::{features, CpuBackend, KernelSet};
use kiln_data::{Dataset, Split};
use kiln_nn::{Adam, Loss, ModelSpec, Optimizer, Precision, Sequential, Sgd};
mod bench;
mod http;
mod lm;
mod predict;
mod report;
mod serve;

use kiln_train::history::Curves;
use kiln_train::{checkpoint, model_file, CheckpointPolicy, FitConfig, Trainer, Verbosity};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Tensor backends and a trainer: train, evaluate and inspect models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Show the CPU, its SIMD features, the kernel set in use and the backends available.
    Info,
    /// Train a model on a dataset, then evaluate it on the test split.
    Train(TrainArgs),
    /// Evaluate a saved model on a dataset.
    Eval(EvalArgs),
    /// Run the conformance suite on a backend and print the per-op report.
    Conformance(ConformanceArgs),
    /// Time the standard op set on a backend against the machine's measured peaks.
    Bench(bench::BenchArgs),
    /// Write one report for a backend (conformance, bench, roofline) as Markdown and HTML.
    Report(ReportArgs),
    /// Classify images (PNG or IDX files) with a trained model.
    Predict(predict::PredictArgs),
    /// Serve a trained model over HTTP (POST /v1/predict, GET /healthz, GET /metrics).
    Serve(serve::ServeArgs),
    /// Plot a run's training curves from its history.jsonl (loss and
    /// accuracy per epoch, or a GPT's losses per evaluation).
    Plot(PlotArgs),
    /// Sample text from a trained GPT (with a key/value cache).
    Generate(lm::GenerateArgs),
}

#[derive(clap::Args)]
struct PlotArgs {
    /// The history written by `kiln train` (history.jsonl), or its folder.
    history: PathBuf,
    /// Where to write curves.svg and curves.png [default: beside the history].
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum OptimizerName {
    Adam,
    Sgd,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Model: a built-in name (mlp, cnn, gpt) or a model spec file (.toml,
    /// as in models/; a `[gpt]` table makes a GPT) [default: mlp, or the
    /// checkpoint's with --resume].
    #[arg(long)]
    model: Option<String>,
    /// Dataset: mnist-sample (bundled), mnist or fashion-mnist; for a GPT,
    /// shakespeare (bundled) or text:FILE (any UTF-8 file) [default:
    /// mnist-sample, or shakespeare for a GPT].
    #[arg(long)]
    dataset: Option<String>,
    /// Folder holding the dataset's IDX files (or a folder with a DATASET/ folder inside).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Passes over the training set [default: 10] (image models).
    #[arg(long)]
    epochs: Option<usize>,
    /// Examples per step [default: 128; a GPT: 12 sequences].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Optimiser steps of a GPT run [default: 2000].
    #[arg(long)]
    iters: Option<u64>,
    /// Evaluate a GPT on both splits every N steps [default: 250].
    #[arg(long, value_name = "N")]
    eval_every: Option<u64>,
    /// Batches per GPT evaluation [default: 20].
    #[arg(long, value_name = "N")]
    eval_iters: Option<u64>,
    /// GPT: learning-rate warm-up steps, before the cosine decay to --min-lr
    /// [default: 100, or --iters if fewer].
    #[arg(long, value_name = "N")]
    warmup: Option<u64>,
    /// GPT: the rate the cosine decay ends at [default: --lr / 10].
    #[arg(long, value_parser = f32_flag)]
    min_lr: Option<f32>,
    /// GPT: AdamW's decoupled weight decay (not on biases, norms or
    /// tables) [default: 0.1, or the checkpoint's with --resume].
    #[arg(long, value_parser = f32_flag)]
    weight_decay: Option<f32>,
    /// GPT: AdamW's β₂ [default: 0.99, or the checkpoint's with --resume].
    #[arg(long, value_parser = f32_flag)]
    beta2: Option<f32>,
    /// GPT: clip gradients to this global norm, 0 for no clipping
    /// [default: 1, or the checkpoint's with --resume].
    #[arg(long, value_parser = f32_flag)]
    grad_clip: Option<f32>,
    /// GPT: micro-batches summed into each step (gradient accumulation)
    /// [default: 1, or the checkpoint's with --resume].
    #[arg(long, value_name = "N")]
    accumulate: Option<usize>,
    /// Learning rate [default: 1e-3, or the checkpoint's with --resume].
    #[arg(long, value_parser = f32_flag)]
    lr: Option<f32>,
    /// Optimiser (Keras defaults).
    #[arg(long, value_enum, default_value = "adam")]
    optimizer: OptimizerName,
    /// Momentum, for --optimizer sgd.
    #[arg(long, default_value_t = 0.0, value_parser = f32_flag)]
    momentum: f32,
    /// Seed for the initial weights and the example order [default: 42;
    /// a GPT's --resume: the checkpoint's].
    #[arg(long)]
    seed: Option<u64>,
    /// Backend: cpu, cpu:KERNELS to force a kernel set (cpu:scalar), device (a program's own), or
    /// cuda / cuda:N for a GPU.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Worker threads (default: KILN_THREADS, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Train on only the first N examples (quick runs).
    #[arg(long)]
    limit: Option<usize>,
    /// Skip the per-epoch evaluation on the test split.
    #[arg(long)]
    no_validation: bool,
    /// Augment training images with a random affine warp per image (Keras'
    /// ImageDataGenerator: rotation ±20°, shifts ±10 %, zoom ±10 %).
    #[arg(long)]
    augment: bool,
    /// Output folder for model.safetensors and history.jsonl [default:
    /// runs/MODEL-DATASET, or with --resume the folder holding the
    /// checkpoint's `checkpoints/`].
    #[arg(long)]
    out: Option<PathBuf>,
    /// One plain line per epoch instead of a progress bar.
    #[arg(long)]
    plain: bool,
    /// `json`: each epoch's record as one JSON line on stdout (everything
    /// else goes to stderr), for programs that follow a run.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    /// Stop when the validation loss (the training loss with
    /// --no-validation) has not improved for N epochs (Keras'
    /// EarlyStopping); image models.
    #[arg(long, value_name = "N")]
    early_stopping: Option<usize>,
    /// Write a checkpoint every N epochs to OUT/checkpoints (Ctrl-C or
    /// SIGTERM always writes one).
    #[arg(long, value_name = "N", default_value_t = 0)]
    checkpoint_every: usize,
    /// How many checkpoints to keep (the newest).
    #[arg(long, value_name = "K", default_value_t = 3)]
    keep: usize,
    /// Continue the run saved in a checkpoint (a file, or a folder: its
    /// newest), bit for bit as if it had not stopped. Give the same
    /// --dataset, --seed, --batch-size, --optimizer and --augment; --epochs
    /// is the run's total.
    #[arg(long, value_name = "CHECKPOINT")]
    resume: Option<PathBuf>,
    /// Numeric precision: f32, or mixed precision with f32 master weights
    /// and bf16 or f16 activations and GEMM inputs (f16 scales the loss
    /// dynamically) [default: f32, or the checkpoint's with --resume].
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    precision: Option<String>,
    /// Data-parallel training: `auto` (MPI when `mpirun` started kiln,
    /// else this process alone), `local`, `mpi`, or `nccl` (one GPU per
    /// process, gradients summed in GPU memory; needs --backend cuda and a
    /// build with --features nccl). Every process takes a shard of each
    /// --batch-size batch; rank 0 writes the files.
    #[arg(long, value_name = "ENGINE", default_value = "auto")]
    distributed: String,
    /// Megabytes of gradient per all-reduce call in a distributed run.
    #[arg(long, value_name = "MB", default_value_t = 25.0)]
    bucket_mb: f64,
    /// Check after every step of a distributed run that every process
    /// holds bit-identical weights (a digest broadcast per step).
    #[arg(long)]
    verify_replicas: bool,
    /// In a distributed run, all-reduce the gradients after the backward
    /// pass instead of overlapping each bucket's with the rest of the pass
    /// (same sums; for measuring what the overlap hides).
    #[arg(long)]
    no_overlap: bool,
}

impl TrainArgs {
    /// What the run prints: JSON records, plain lines, or a bar on a terminal.
    fn verbosity(&self) -> Verbosity {
        if self.log_format == "json" {
            Verbosity::Json
        } else if self.plain {
            Verbosity::Lines
        } else {
            Verbosity::Auto
        }
    }
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The model file written by `kiln train` (model.safetensors), or its
    /// folder, a checkpoint, or a folder of checkpoints (its newest).
    #[arg(long)]
    model: PathBuf,
    /// Dataset: mnist-sample (bundled), mnist or fashion-mnist.
    #[arg(long, default_value = "mnist-sample")]
    dataset: String,
    /// Folder holding the dataset's IDX files.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which split to evaluate.
    #[arg(long, value_parser = ["test", "train"], default_value = "test")]
    split: String,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Backend: cpu, cpu:KERNELS, cuda / cuda:N, or device (a program's own).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Worker threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Folder for the confusion-matrix plots [default: the model's folder;
    /// for a checkpoint, its run's folder].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Compute in f32, bf16 or f16 (the weights are read as stored).
    #[arg(long, value_parser = ["f32", "bf16", "f16"], default_value = "f32")]
    precision: String,
}

#[derive(clap::Args)]
struct ConformanceArgs {
    /// Backend: cpu, cpu:KERNELS to check one kernel set (cpu:scalar), cuda / cuda:N, or device (a program's own).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Random cases per check in the edge tier [default: KILN_CONFORMANCE_CASES, else 48].
    #[arg(long)]
    cases: Option<u32>,
    /// Size tiers: edge (small awkward sizes), blocked (edge, plus sizes across
    /// every blocking boundary), large (1024–2048 per dimension, k ≥ 4096), all
    /// [default: KILN_CONFORMANCE_TIER, else blocked].
    #[arg(long, value_name = "TIER")]
    tier: Option<String>,
    /// Seconds each check may spend per tier before it stops drawing cases,
    /// or `none` [default: KILN_CONFORMANCE_BUDGET, else the tier's own].
    #[arg(long, value_name = "SECONDS")]
    budget: Option<String>,
    /// Seed for the inputs [default: KILN_CONFORMANCE_SEED, else fixed].
    #[arg(long)]
    seed: Option<u64>,
    /// Run only the checks whose name contains this (e.g. gemm, unary_exp).
    #[arg(long)]
    op: Option<String>,
    /// Run only this dtype (f32, f16, bf16, u32).
    #[arg(long)]
    dtype: Option<String>,
    /// Also write every report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Worker threads.
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct ReportArgs {
    #[command(flatten)]
    check: ConformanceArgs,
    /// Bench with small shapes and short timings (a smoke run).
    #[arg(long)]
    quick: bool,
    /// Folder for report.md, report.html, roofline.svg, conformance.json and bench.json.
    #[arg(long, default_value = "kiln-report")]
    out: PathBuf,
    /// Use this saved run of `kiln conformance --json` instead of running the suite.
    #[arg(long, value_name = "FILE")]
    conformance_json: Option<PathBuf>,
    /// Use this saved run of `kiln bench --json` instead of running the bench.
    #[arg(long, value_name = "FILE")]
    bench_json: Option<PathBuf>,
    /// Do not time matrixmultiply, the gemm crate and OpenBLAS beside a CPU backend.
    #[arg(long)]
    no_comparators: bool,
}

/// The name this program was started as, for the command lines it prints.
fn program_name() -> String {
    // As it was typed (`kiln`, `target/release/kiln`), so the line runs as printed.
    std::env::args_os()
        .next()
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| !a.is_empty() && !a.contains(char::is_whitespace))
        .unwrap_or_else(|| "kiln".into())
}

/// Runs the `kiln` command line on this process's arguments, with kiln's
/// own backends only.
pub fn main() -> ExitCode {
    run(&NoDevice, false)
}

/// Runs the `kiln` command line with `make` building the backend that
/// `--backend device` names — the default for `train`, `eval` and
/// `conformance` here. `make` is called once per command that needs it;
/// its error is printed as the command's error.
pub fn run_with<B, F>(make: F) -> ExitCode
where
    B: Backend,
    F: Fn() -> Result<B>,
{
    run(&make, true)
}

/// A backend beyond kiln's own, for [`run_with`].
trait Device {
    /// The backend's type.
    type B: Backend;
    /// Builds it, or `None` if this program has none.
    fn make(&self) -> Option<Result<Self::B>>;
}

/// The `kiln` binary's: no device backend.
struct NoDevice;

impl Device for NoDevice {
    type B = CpuBackend;
    fn make(&self) -> Option<Result<CpuBackend>> {
        None
    }
}

impl<B: Backend, F: Fn() -> Result<B>> Device for F {
    type B = B;
    fn make(&self) -> Option<Result<B>> {
        Some(self())
    }
}

fn run<D: Device>(device: &D, device_default: bool) -> ExitCode {
    let mut command = Cli::command().bin_name(program_name());
    if device_default {
        for sub in [
            "train",
            "eval",
            "conformance",
            "bench",
            "report",
            "generate",
        ] {
            command = command
                .mut_subcommand(sub, |s| s.mut_arg("backend", |a| a.default_value("device")));
        }
    }
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    fail_cleanly_on_console_errors();
    if !matches!(cli.command, Command::Serve(_)) {
        die_quietly_on_broken_pipes();
    }
    let result = match cli.command {
        Command::Info => info(),
        Command::Train(a) => train(a, device),
        Command::Eval(a) => eval(a, device),
        Command::Conformance(a) => conformance(a, device),
        Command::Bench(a) => bench_command(a, device),
        Command::Report(a) => report_command(a, device),
        Command::Predict(a) => cpu_backend(&a.backend, None).and_then(|b| predict::predict(a, b)),
        Command::Plot(a) => plot(a),
        Command::Generate(a) => generate_command(a, device),
        Command::Serve(a) => cpu_backend(&a.backend, None)
            .and_then(|b| stop_on_signals().and_then(|stop| serve::serve(a, b, stop))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Interrupted(what)) => {
            eprintln!("interrupted: {what}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Refuses an output file that could not be written, before any work: a
/// folder, or a path in a folder that does not exist — which the atomic
/// write would otherwise find only after a whole evaluation or bench.
pub(crate) fn check_output_file(flag: &str, path: &std::path::Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::invalid(format!(
            "{flag} {}: a folder; give the path of a file to write",
            path.display()
        )));
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !folder.is_dir() {
        return Err(Error::invalid(format!(
            "{flag} {}: there is no folder {} to write it in",
            path.display(),
            folder.display()
        )));
    }
    Ok(())
}

impl TrainArgs {
    /// `--seed`, or 42 (an image model's run; a GPT's resume defaults to
    /// its checkpoint's instead).
    fn seed(&self) -> u64 {
        self.seed.unwrap_or(42)
    }
}

/// `name` as one path component: letters, digits, `-`, `_` and `.` kept,
/// anything else (`/`, `..` as a whole, spaces) replaced by `_`, so a model
/// or dataset name cannot lead a default output path out of `runs/`.
fn path_safe(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    match s.trim_matches('.') {
        "" => "model".into(),
        _ if s.starts_with('.') => format!("_{s}"),
        _ => s,
    }
}

/// A write to stdout or stderr that fails — `> /dev/full`, a full disk
/// behind `> log` — ends the process with `error: writing to stdout: …`
/// and status 1, instead of the panic `println!` and `eprintln!` raise
/// (std's "failed printing to stdout: …"). Checkpoints are written by
/// renaming a finished file, so stopping here loses nothing saved. Every
/// other panic keeps the default report.
fn fail_cleanly_on_console_errors() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        match message.strip_prefix("failed printing to ") {
            Some(what) => {
                use std::io::Write;
                // Stderr may be the stream that failed: nothing more to do then.
                let _ = writeln!(std::io::stderr(), "error: writing to {what}");
                std::process::exit(1);
            }
            None => default(info),
        }
    }));
}

/// Writing to a closed pipe (`kiln eval … | head -1`) then ends the process
/// quietly, as it does other Unix tools, instead of making `println!` panic.
/// Not for `serve`, whose sockets must outlive clients that go away.
fn die_quietly_on_broken_pipes() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal; no handler
    // code is installed, so nothing can run in signal context.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A flag that the first Ctrl-C (SIGINT) or SIGTERM sets, so training
/// abandons the step in progress (between ops) and saves a checkpoint of
/// the last completed one; a second signal
/// exits at once with status 130.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag before this signal sets it.
        flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))
            .and_then(|_| flag::register(sig, Arc::clone(&stop)))
            .map_err(|e| Error::io("installing the Ctrl-C handler".to_string(), e))?;
    }
    Ok(stop)
}

/// The stop flag of a rank of a distributed run: SIGINT, SIGTERM and
/// SIGUSR1 (which `mpirun` forwards) all ask for a stop after the current
/// step, on every rank together. A second signal does not exit at once: a
/// terminal's Ctrl-C reaches the ranks both directly and as `mpirun`'s
/// SIGTERM, and the checkpoint must still be written; `mpirun` itself
/// ends ranks that do not stop.
fn stop_on_signals_distributed() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM, SIGUSR1] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .map_err(|e| Error::io("installing the stop-signal handler".to_string(), e))?;
    }
    Ok(stop)
}

/// The stop flag `kiln train` runs with, alone or as one of `world`'s ranks.
fn training_stop_flag(world: &dyn kiln_dist::Collective) -> Result<Arc<AtomicBool>> {
    if world.world() > 1 {
        stop_on_signals_distributed()
    } else {
        stop_on_signals()
    }
}

/// Builds the backend a `--backend` flag names.
fn cpu_backend(spec: &str, threads: Option<usize>) -> Result<CpuBackend> {
    let kernels = match spec.split_once(':') {
        None if spec == "cpu" => None,
        Some(("cpu", kernels)) => Some(kernels),
        _ if spec.starts_with("cuda") => {
            return Err(Error::invalid(format!(
                "this command runs on the CPU only; `{spec}` is for train, eval and conformance"
            )))
        }
        _ => return Err(unknown_backend(spec)),
    };
    // --threads wins over KILN_THREADS, which is then not read at all.
    let threads = match threads {
        Some(n) => kiln_cpu::check_threads("--threads", n)?,
        None => 0,
    };
    CpuBackend::configured(kernels, threads)
}

impl TrainArgs {
    /// Where a run of `model` on `dataset` writes: `--out`, else a resumed
    /// checkpoint's run folder, else `runs/MODEL-DATASET`.
    pub(crate) fn out_folder(&self, model: &str, dataset: &str) -> PathBuf {
        self.out
            .clone()
            .or_else(|| self.resume.as_deref().and_then(run_folder_of))
            .unwrap_or_else(|| {
                PathBuf::from("runs").join(format!("{}-{}", path_safe(model), path_safe(dataset)))
            })
    }
}

/// The run folder a checkpoint (a file, or the folder of them) belongs
/// to: the folder holding its `checkpoints/`, where a resumed run writes
/// unless `--out` says otherwise.
fn run_folder_of(checkpoint: &Path) -> Option<PathBuf> {
    let dir = if checkpoint.is_dir() {
        checkpoint
    } else {
        checkpoint.parent()?
    };
    // `checkpoints` given from inside the run: the run is this folder.
    dir.file_name()
        .is_some_and(|n| n == "checkpoints")
        .then(|| dir.parent().map(Path::to_path_buf))
        .flatten()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p
            }
        })
}

fn unknown_backend(spec: &str) -> Error {
    Error::invalid(format!(
        "unknown backend `{spec}`: expected cpu, cpu:KERNELS (e.g. cpu:scalar), cuda or cuda:N \
         (`device` names a program's own backend, in programs built with kiln_cli::run_with)"
    ))
}

/// The GPU a `cuda` or `cuda:N` spec names, if it is one.
fn cuda_ordinal(spec: &str) -> Result<Option<usize>> {
    match spec.split_once(':') {
        None if spec == "cuda" => Ok(Some(0)),
        Some(("cuda", n)) => n.parse().map(Some).map_err(|_| {
            Error::invalid(format!(
                "`{spec}`: expected cuda:N with N a GPU number (see kiln info)"
            ))
        }),
        _ => Ok(None),
    }
}

/// Runs `$body` with `$b` bound to the backend `$spec` names: the
/// program's device backend (`device`), CUDA or the CPU.
macro_rules! with_backend {
    ($spec:expr, $threads:expr, $device:expr, |$b:ident| $body:expr) => {{
        if $spec == "device" {
            match $device.make() {
                Some(made) => {
                    let $b = made?;
                    $body
                }
                None => Err(unknown_backend($spec)),
            }
        } else {
            match cuda_ordinal($spec)? {
                Some(ordinal) => {
                    let $b = kiln_cuda::CudaBackend::new(ordinal)?;
                    $body
                }
                None => {
                    let $b = cpu_backend($spec, $threads)?;
                    $body
                }
            }
        }
    }};
}

fn info() -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("kiln {}", env!("CARGO_PKG_VERSION"));
    println!("cpu:        {} ({cores} cores)", features::cpu_model());
    println!("simd:       {}", features::detected().join(" "));
    // The rest is printed either way; the exit status says whether the
    // CPU backend can start with this environment.
    let cpu = CpuBackend::new();
    match &cpu {
        Ok(b) => println!(
            "kernels:    {} ({} threads)",
            b.kernels().name(),
            b.threads()
        ),
        Err(_) => println!("kernels:    unavailable (the error below)"),
    }
    let sets: Vec<&str> = KernelSet::ALL
        .iter()
        .filter(|k| k.check_available().is_ok())
        .map(|k| k.name())
        .collect();
    println!("backends:   cpu ({})", sets.join(", "));
    match kiln_cuda::list_devices() {
        Ok(gpus) if gpus.is_empty() => {
            println!("gpus:       none (the CUDA driver sees no device)")
        }
        Ok(gpus) => {
            for (i, g) in gpus.iter().enumerate() {
                println!(
                    "{}{g}",
                    if i == 0 {
                        "gpus:       "
                    } else {
                        "            "
                    }
                );
            }
        }
        Err(e) => println!("gpus:       none ({e})"),
    }
    cpu.map(drop)
}

/// A built-in model by name, or the spec in a `.toml` (or `.json`) file.
fn train<D: Device>(mut a: TrainArgs, device: &D) -> Result<()> {
    if !(a.bucket_mb.is_finite() && a.bucket_mb > 0.0 && a.bucket_mb <= 4096.0) {
        return Err(Error::invalid(format!(
            "--bucket-mb {}: expected a size in megabytes above 0 and at most 4096",
            a.bucket_mb
        )));
    }
    let world = kiln_dist::connect(a.distributed.parse()?)?;
    if world.world() > 1 {
        // A panic on one rank would leave the others in a collective (and
        // MPI's finalisation waiting for them): it ends the job instead.
        // (A weak handle: the hook must not keep MPI from being finalised.)
        let rank = Arc::downgrade(&world);
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            if let Some(w) = rank.upgrade() {
                eprintln!(
                    "error: rank {} of {} panicked; ending the job",
                    w.rank(),
                    w.world()
                );
                w.abort(101)
            }
        }));
        if a.threads.is_none() && kiln_core::env::setting("KILN_THREADS")?.is_none() {
            // The cores shared among this machine's ranks, not each rank all of them.
            a.threads = Some(threads_per_local_rank(world.world()));
        }
        if a.backend == "cuda" {
            // One GPU per rank: this machine's rank r takes GPU r.
            a.backend = format!("cuda:{}", local_rank().unwrap_or(0));
        }
    }
    let spec = a.backend.clone();
    let result = with_backend!(spec.as_str(), a.threads, device, |b| run_train(
        a,
        b,
        Arc::clone(&world)
    ));
    match result {
        // A rank that fails alone would leave the others waiting in a
        // collective: it ends the whole job instead.
        Err(e) if world.world() > 1 && !matches!(e, Error::Interrupted(_)) => {
            eprintln!("error: rank {} of {}: {e}", world.rank(), world.world());
            world.abort(1)
        }
        r => r,
    }
}

/// The data parallelism `kiln train` runs with over `world` (announced
/// with `say`), or `None` alone; `unit` names what a batch holds.
fn data_parallel(
    a: &TrainArgs,
    world: &Arc<dyn kiln_dist::Collective>,
    batch_size: usize,
    unit: &str,
    say: &impl Fn(String),
) -> Option<kiln_train::DataParallel> {
    // NCCL runs its all-reduces in a world of one too: the path a
    // one-GPU machine can check.
    let parallel = world.world() > 1 || a.distributed == "nccl";
    if !parallel {
        // Harmless in a script that runs the same command at every size,
        // and worth a word: they change nothing here.
        for (flag, given) in [
            ("--verify-replicas", a.verify_replicas),
            ("--no-overlap", a.no_overlap),
        ] {
            if given {
                eprintln!(
                    "note: {flag} has no effect: this run is one process (start it with mpirun -n N, or --distributed nccl)"
                );
            }
        }
    }
    parallel.then(|| {
        say(format!(
            "data-parallel over {}: {} {unit} per process per step, {} MB all-reduce buckets {}{}",
            world.describe(),
            batch_size.div_ceil(world.world()),
            a.bucket_mb,
            if a.no_overlap {
                "after the backward pass"
            } else {
                "overlapped with the backward pass"
            },
            if a.verify_replicas {
                ", replicas checked after every step"
            } else {
                ""
            }
        ));
        kiln_train::DataParallel::new(Arc::clone(world))
            .bucket_bytes((a.bucket_mb * 1e6) as usize)
            .verify_replicas(a.verify_replicas)
            .overlap(!a.no_overlap)
    })
}

/// With `--distributed nccl`, the NCCL engine joined over `world` (the MPI
/// world that carries its unique id) on `backend`'s GPU; otherwise `world`.
fn join_nccl<B: Backend>(
    a: &TrainArgs,
    backend: &B,
    world: Arc<dyn kiln_dist::Collective>,
) -> Result<Arc<dyn kiln_dist::Collective>> {
    if a.distributed != "nccl" {
        return Ok(world);
    }
    #[cfg(feature = "nccl")]
    {
        let any: &dyn std::any::Any = backend;
        let cuda = any
            .downcast_ref::<kiln_cuda::CudaBackend>()
            .ok_or_else(|| {
                Error::invalid(
                    "--distributed nccl sums gradients in GPU memory: train with --backend cuda \
                 (or reduce through host memory with --distributed mpi)",
                )
            })?;
        Ok(Arc::new(kiln_dist::Nccl::over(world, cuda)?))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = (backend, world);
        Err(Error::invalid(
            "--distributed nccl: this kiln was built without NCCL (`--features nccl`)",
        ))
    }
}

/// This process's rank among those an MPI launcher started on this
/// machine.
fn local_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// This machine's cores divided among the ranks an MPI launcher started
/// on it (at least one thread each) — or, where the launcher bound this
/// rank to some cores, those cores.
fn threads_per_local_rank(world: usize) -> usize {
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf reads a system constant; no memory is involved.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let online = usize::try_from(online).unwrap_or(usable).max(1);
    if usable < online {
        return usable;
    }
    let local = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
        .unwrap_or(world)
        .max(1);
    (online / local).max(1)
}

fn run_train<B: Backend>(
    a: TrainArgs,
    backend: B,
    world: Arc<dyn kiln_dist::Collective>,
) -> Result<()> {
    let world = join_nccl(&a, &backend, world)?;
    if lm::is_lm_run(&a)? {
        return lm::run_train_lm(a, backend, world);
    }
    // Rank 0 speaks and writes for a distributed run.
    let lead = world.rank() == 0;
    for (flag, given) in [
        ("--iters", a.iters.is_some()),
        ("--warmup", a.warmup.is_some()),
        ("--min-lr", a.min_lr.is_some()),
        ("--eval-every", a.eval_every.is_some()),
        ("--eval-iters", a.eval_iters.is_some()),
        ("--weight-decay", a.weight_decay.is_some()),
        ("--beta2", a.beta2.is_some()),
        ("--grad-clip", a.grad_clip.is_some()),
        ("--accumulate", a.accumulate.is_some()),
    ] {
        if given {
            return Err(Error::invalid(format!(
                "{flag} is for GPT runs (--model gpt); image models train for --epochs with Keras' Adam (--lr) or --optimizer sgd (--momentum)"
            )));
        }
    }
    let epochs = a.epochs.unwrap_or(10);
    let batch_size = a.batch_size.unwrap_or(128);
    if a.early_stopping == Some(0) {
        return Err(Error::invalid(
            "--early-stopping 0: give the epochs without improvement to allow (at least 1)",
        ));
    }
    let dataset = a.dataset.clone().unwrap_or_else(|| "mnist-sample".into());
    let json = a.log_format == "json";
    let speak = say(json);
    let say = move |s: String| {
        if lead {
            speak(s)
        }
    };
    if epochs == 0 || batch_size == 0 {
        return Err(Error::invalid(
            "--epochs and --batch-size must be at least 1",
        ));
    }
    // A Ctrl-C always writes a checkpoint, so one must be kept.
    if a.keep == 0 {
        return Err(Error::invalid(
            "--keep 0: keep at least the newest checkpoint",
        ));
    }
    if matches!(a.optimizer, OptimizerName::Adam) && a.momentum != 0.0 {
        return Err(Error::invalid(
            "--momentum is for --optimizer sgd; Adam keeps its own moments",
        ));
    }
    let restored = a
        .resume
        .as_deref()
        .map(|p| checkpoint::load(p, &backend))
        .transpose()?;
    let spec = match (&restored, &a.model) {
        (Some(r), Some(m)) => {
            let asked = ModelSpec::resolve(m)?;
            let saved = r.model.spec();
            if asked != saved {
                return Err(Error::invalid(format!(
                    "{} holds model `{}`, not the --model `{m}` asked for (leave --model out to resume it)",
                    r.path.display(),
                    saved.name
                )));
            }
            saved
        }
        (Some(r), None) => r.model.spec(),
        (None, m) => ModelSpec::resolve(m.as_deref().unwrap_or("mlp"))?,
    };
    // Planned from the spec, before the model or any batch is allocated.
    let plan = spec.memory(batch_size)?;
    plan.check(&spec.name, batch_size, kiln_nn::memory_limit()?)?;
    let mut train_set = Dataset::load(&dataset, Split::Train, a.data.as_deref())?;
    if a.limit == Some(0) {
        return Err(Error::invalid("--limit 0: train on at least one example"));
    }
    if let Some(n) = a.limit {
        train_set = train_set.take(n);
    }
    let test_set = Dataset::load(&dataset, Split::Test, a.data.as_deref())?;
    let out = a.out_folder(&spec.name, &dataset);
    std::fs::create_dir_all(&out)
        .map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    // Temporaries of writes a killed run never finished.
    for dir in [out.clone(), out.join("checkpoints")]
        .into_iter()
        .filter(|_| lead)
    {
        let stale = model_file::remove_stale_temporaries(&dir)?;
        if !stale.is_empty() {
            eprintln!(
                "note: removed {} temporary file(s) an interrupted run left in {}",
                stale.len(),
                dir.display()
            );
        }
    }
    // Written afresh by the trainer once its checks pass: a refused run
    // leaves an earlier run's history as it was.
    let history_path = out.join("history.jsonl");

    // A resumed run keeps its learning rate; a different one is refused
    // rather than silently ignored.
    if let (Some(lr), Some(r)) = (a.lr, &restored) {
        if lr != r.progress.lr {
            return Err(Error::invalid(format!(
                "--lr {}: the checkpoint trains at {} and a resumed run keeps its learning rate (leave --lr out)",
                kiln_core::Number(lr),
                kiln_core::Number(r.progress.lr)
            )));
        }
    }
    let lr =
        a.lr.or(restored.as_ref().map(|r| r.progress.lr))
            .unwrap_or(1e-3);
    let mut optimizer: Box<dyn Optimizer<B>> = match a.optimizer {
        OptimizerName::Adam => Box::new(Adam::new(lr)?),
        OptimizerName::Sgd => Box::new(Sgd::new(lr, a.momentum)?),
    };
    let precision: Precision = match (&a.precision, &restored) {
        (Some(p), _) => p.parse()?,
        (None, Some(r)) => r.progress.precision.parse()?,
        (None, None) => Precision::F32,
    };
    let (mut model, progress) = match restored {
        Some(r) => {
            optimizer
                .load_state(&r.optimizer, &r.model.params())
                .map_err(|e| Error::invalid(format!("{}: {e}", r.path.display())))?;
            say(format!(
                "resuming from {} (epoch {}, batch {})",
                r.path.display(),
                r.progress.epoch + 1,
                r.progress.batch
            ));
            (r.model, Some(r.progress))
        }
        None => (Sequential::from_spec(&spec, a.seed(), &backend)?, None),
    };
    model.set_precision(precision);
    say(model.summary().trim_end().to_string());
    say(format!(
        "Estimated memory at batch {}: {} (parameters and optimiser {}, activations {}, workspace {})",
        batch_size,
        kiln_nn::spec::gib(plan.total()),
        kiln_nn::spec::gib(plan.params),
        kiln_nn::spec::gib(plan.activations),
        kiln_nn::spec::gib(plan.workspace)
    ));
    say(format!(
        "training on {} ({} train, {} test) with {}, {}, batch {}, seed {}, precision {}",
        dataset,
        train_set.len(),
        test_set.len(),
        backend.name(),
        optimizer.describe(),
        batch_size,
        a.seed(),
        precision_description(precision)
    ));
    let distributed = data_parallel(&a, &world, batch_size, "examples", &say);
    // A clone shares the backend's slow-path counts, read at the end.
    let counted = backend.clone();
    let mut trainer = Trainer::new(model, optimizer, Loss::CategoricalCrossEntropy, backend);
    let cfg = FitConfig {
        epochs,
        batch_size,
        seed: a.seed(),
        shuffle: true,
        verbosity: a.verbosity(),
        history_path: Some(history_path.clone()),
        augment: a
            .augment
            .then(|| kiln_data::Augment::keras_default(a.seed() ^ 0x6175_676d)),
        checkpoint: Some(CheckpointPolicy {
            dir: out.join("checkpoints"),
            every: a.checkpoint_every,
            keep: a.keep,
        }),
        stop: Some(training_stop_flag(world.as_ref())?),
        loss_scale: kiln_train::LossScaler::default(),
        on_step: None,
        on_epoch: a.early_stopping.map(|patience| {
            let monitor = if a.no_validation {
                kiln_train::Monitor::Loss
            } else {
                kiln_train::Monitor::ValLoss
            };
            kiln_train::EarlyStopping::new(monitor, patience, 0.0).hook()
        }),
        lr_schedule: None,
        distributed,
    };
    let validation = (!a.no_validation).then_some(&test_set);
    let history = match &progress {
        Some(p) => trainer.resume(&train_set, validation, &cfg, p)?,
        None => trainer.fit(&train_set, validation, &cfg)?,
    };
    if !lead {
        // Every replica holds the same model: rank 0 tests and saves it.
        return Ok(());
    }
    let test = trainer.evaluate(&test_set, 1000)?;
    let total: f64 = history.epochs.iter().map(|e| e.seconds).sum();
    say(format!(
        "test: loss {:.4} accuracy {:.2}% ({} examples); training {:.1}s ({:.2}s/epoch)",
        test.loss,
        100.0 * test.accuracy,
        test.examples,
        total,
        total / history.epochs.len() as f64
    ));
    let meta = HashMap::from([
        ("kiln.dataset".to_string(), dataset.clone()),
        (
            "kiln.dataset.fingerprint".to_string(),
            train_set.fingerprint(),
        ),
        ("kiln.epochs".to_string(), epochs.to_string()),
        ("kiln.seed".to_string(), a.seed().to_string()),
        ("kiln.precision".to_string(), precision.name().to_string()),
        (
            "kiln.test_accuracy".to_string(),
            format!("{:.6}", test.accuracy),
        ),
    ]);
    let model_path = out.join("model.safetensors");
    model_file::save(&model_path, trainer.model(), &meta)?;
    say(format!(
        "saved {} and {}",
        model_path.display(),
        history_path.display()
    ));
    // Plots beside the history: the curves, and the test confusion matrix.
    let report = trainer.report(&test_set, 1000, &[1])?;
    for w in [
        kiln_train::plots::training_curves(&history.epochs, &out.join("curves"))?,
        kiln_train::plots::confusion_matrix(&report, &out.join("confusion"))?,
    ] {
        let files: Vec<String> = w.files.iter().map(|f| f.display().to_string()).collect();
        say(format!("plots: {}", files.join(", ")));
        if let Some(why) = w.skipped {
            eprintln!("note: {why}");
        }
    }
    note_slow_paths(&counted);
    Ok(())
}

/// How `kiln train` prints its messages: on stdout, or on stderr with JSON
/// logs (stdout then carries only the records).
fn say(json: bool) -> impl Fn(String) {
    move |s: String| {
        if json {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    }
}

/// Prints the calls that took a slow path on `backend` (and its clones).
fn note_slow_paths<B: Backend>(backend: &B) {
    let slow = backend.slow_paths();
    if !slow.is_empty() {
        let list: Vec<String> = slow.iter().map(|p| p.to_string()).collect();
        eprintln!(
            "note: calls that took a slow path (same results, less speed; KILN_LOG=slow-paths \
             logs each kind as it first happens): {}",
            list.join("; ")
        );
    }
}

fn generate_command<D: Device>(a: lm::GenerateArgs, device: &D) -> Result<()> {
    let spec = a.backend.clone();
    with_backend!(spec.as_str(), a.threads, device, |b| lm::run_generate(
        &a, b
    ))
}

/// How the run header names a precision.
fn precision_description(p: Precision) -> String {
    match p {
        Precision::F32 => "f32".to_string(),
        Precision::Bf16 => "bf16 (f32 master weights)".to_string(),
        Precision::F16 => "f16 (f32 master weights, dynamic loss scaling)".to_string(),
    }
}

/// Prints what a plot call wrote (and why a PNG was skipped).
fn report_plots(w: &kiln_train::plots::Written) {
    for f in &w.files {
        println!("wrote {}", f.display());
    }
    if let Some(why) = &w.skipped {
        eprintln!("note: {why}");
    }
}

fn plot(a: PlotArgs) -> Result<()> {
    let path = if a.history.is_dir() {
        a.history.join("history.jsonl")
    } else {
        a.history.clone()
    };
    // A GPT's history holds an evaluation per --eval-every steps, an image
    // model's an epoch per line.
    let curves = kiln_train::history::read_curves(&path)?;
    let dir = a
        .out
        .or_else(|| path.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let stem = dir.join("curves");
    let w = match &curves {
        Curves::Evaluations(evaluations) => kiln_train::plots::lm_curves(evaluations, &stem)?,
        Curves::Epochs(epochs) => kiln_train::plots::training_curves(epochs, &stem)?,
    };
    report_plots(&w);
    Ok(())
}

fn eval<D: Device>(a: EvalArgs, device: &D) -> Result<()> {
    let spec = a.backend.clone();
    with_backend!(spec.as_str(), a.threads, device, |b| run_eval(a, b))
}

fn run_eval<B: Backend>(a: EvalArgs, backend: B) -> Result<()> {
    if let Some(path) = &a.json {
        check_output_file("--json", path)?;
    }
    if a.batch_size == 0 {
        return Err(Error::invalid(
            "--batch-size 0: evaluate at least one example per pass",
        ));
    }
    // Model files and checkpoints alike (a checkpoint's optimiser state is ignored).
    let (loaded, path) = crate::load_model(&a.model, &backend)?;
    lm::refuse_language_model(&loaded.model, &path, "kiln eval")?;
    let split = if a.split == "train" {
        Split::Train
    } else {
        Split::Test
    };
    let ds = Dataset::load(&a.dataset, split, a.data.as_deref())?;
    // Another dataset of the same shape evaluates without an error, and
    // its numbers mean little: say so.
    if let Some(trained) = loaded.metadata.get("kiln.dataset") {
        if !trained.is_empty() && trained != ds.name() {
            eprintln!(
                "note: {} was trained on {trained}; evaluating it on {} (give --dataset {trained} for its own test set)",
                path.display(),
                ds.name()
            );
        }
    }
    let name = loaded.model.name().to_string();
    let mut model = loaded.model;
    model.set_precision(a.precision.parse()?);
    let trainer = Trainer::for_inference(model, backend)?;
    let start = std::time::Instant::now();
    let report = trainer.report(&ds, a.batch_size, &[1, 3, 5])?;
    if !report.loss.is_finite() {
        return Err(Error::invalid(format!(
            "{}: the loss on {} is {}: the model's outputs are not finite (weights too large for {}, a damaged file, or a run that diverged)",
            path.display(),
            ds.name(),
            report.loss,
            a.precision
        )));
    }
    // The end-to-end rate leaves out the report's warm-up pass too.
    let secs = start.elapsed().as_secs_f64() - report.warmup_seconds;
    println!(
        "{} (model `{name}`) on {}: loss {:.4} accuracy {:.2}% ({} examples, {:.0} images/s; forward passes alone {:.0} images/s)\n",
        path.display(),
        ds.name(),
        report.loss,
        100.0 * report.accuracy(),
        report.examples,
        report.examples as f64 / secs.max(1e-9),
        report.examples as f64 / report.forward_seconds.max(1e-9)
    );
    print!("{}", report.render());
    let dir = match &a.out {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::io(format!("creating the plot folder {}", d.display()), e))?;
            d.clone()
        }
        // A checkpoint's plots go to its run's folder, beside training's,
        // not among the checkpoints that `--keep` rotates.
        None => run_folder_of(&path).unwrap_or_else(|| {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from)
        }),
    };
    let stem = dir.join(format!("confusion-{}", ds.name()));
    if let Some(json) = &a.json {
        model_file::write_atomic(json, report.to_json().as_bytes())?;
        println!("\nwrote {}", json.display());
    }
    println!();
    // The plot is a by-product beside the model (a checkpoint's run): where
    // it cannot be drawn there, say so and keep the report; a folder the
    // user named must work.
    match kiln_train::plots::confusion_matrix(&report, &stem) {
        Ok(w) => report_plots(&w),
        Err(e) if a.out.is_none() => {
            eprintln!("note: no confusion-matrix plot: {e} (pass --out DIR to write it elsewhere)")
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

fn conformance<D: Device>(a: ConformanceArgs, device: &D) -> Result<()> {
    let spec = a.backend.clone();
    with_backend!(spec.as_str(), a.threads, device, |b| run_conformance(a, b))
}

/// The suite's configuration and the checks `a` selects.
fn conformance_plan(
    a: &ConformanceArgs,
    backend_name: &str,
) -> Result<(
    kiln_conformance::Config,
    Vec<(&'static str, kiln_core::DType)>,
)> {
    let mut cfg = kiln_conformance::Config::from_env(backend_name).map_err(Error::invalid)?;
    cfg.backend = a.backend.clone();
    cfg.rerun = kiln_conformance::Rerun::Command(format!("{} conformance", program_name()));
    if let Some(c) = a.cases {
        if c == 0 {
            return Err(Error::invalid("--cases 0: a check needs at least one case"));
        }
        cfg.cases = c;
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if let Some(t) = &a.tier {
        cfg.depth = kiln_conformance::Depth::parse(t)
            .map_err(|e| Error::invalid(format!("--tier: {e}")))?;
    }
    if let Some(b) = &a.budget {
        cfg.budget = Some(
            kiln_conformance::parse_budget(b)
                .map_err(|e| Error::invalid(format!("--budget {e}")))?,
        );
    }
    let dtype: Option<kiln_core::DType> = a.dtype.as_deref().map(str::parse).transpose()?;
    // An exact check name selects that check alone; anything else, every
    // check whose name contains it.
    let exact =
        a.op.as_deref()
            .is_some_and(|o| kiln_conformance::CHECKS.iter().any(|(n, _)| *n == o));
    // The checks --op names (all of them without it).
    let named = |name: &str| {
        a.op.as_deref()
            .is_none_or(|o| if exact { name == o } else { name.contains(o) })
    };
    let selected: Vec<(&'static str, kiln_core::DType)> = kiln_conformance::CHECKS
        .iter()
        .filter(|(name, _)| named(name))
        .flat_map(|(name, dts)| dts.iter().map(move |&d| (*name, d)))
        .filter(|(_, d)| dtype.is_none_or(|want| *d == want))
        .collect();
    if selected.is_empty() {
        // The name matched and the dtype did not: say which dtypes it takes.
        let by_name: Vec<String> = kiln_conformance::CHECKS
            .iter()
            .filter(|(name, _)| a.op.is_some() && named(name))
            .map(|(name, dts)| {
                let dts: Vec<String> = dts.iter().map(|d| d.to_string()).collect();
                format!("{name} ({})", dts.join(", "))
            })
            .collect();
        if let (false, Some(d)) = (by_name.is_empty(), dtype) {
            return Err(Error::invalid(format!(
                "no check matching --op {} runs in {d}: {} (leave --dtype out for all of them)",
                a.op.as_deref().unwrap_or_default(),
                by_name.join("; ")
            )));
        }
        let names: Vec<&str> = kiln_conformance::CHECKS.iter().map(|(n, _)| *n).collect();
        return Err(Error::invalid(format!(
            "no conformance check matches --op {} --dtype {}: the checks are {} (--op takes a name or part of one)",
            a.op.as_deref().unwrap_or("(any)"),
            dtype.map_or("(any)".to_string(), |d| d.to_string()),
            names.join(", ")
        )));
    }
    Ok((cfg, selected))
}

/// Runs `selected` checks on `backend`, printing a table row per check
/// and, for each failure, its case and rerun line.
fn run_suite<B: Backend>(
    backend: &B,
    cfg: &kiln_conformance::Config,
    selected: Vec<(&'static str, kiln_core::DType)>,
) -> Vec<kiln_conformance::Report> {
    println!(
        "kiln conformance: backend {} ({}), {}",
        cfg.backend,
        backend.name(),
        cfg.describe()
    );
    println!(
        "{:<26} {:<5} {:<16} {:>6} {:>12} {:>8}",
        "op", "dtype", "result", "cases", "worst/bound", "seconds"
    );
    let start = std::time::Instant::now();
    let mut reports = Vec::new();
    for (name, d) in selected {
        let r = kiln_conformance::run_check(backend, name, d, cfg);
        println!(
            "{:<26} {:<5} {:<16} {:>6} {:>12.3} {:>8.2}",
            r.op,
            r.dtype.as_str(),
            r.status.label(),
            r.cases,
            r.worst,
            r.seconds()
        );
        reports.push(r);
    }
    let count = |s: kiln_conformance::Status| reports.iter().filter(|r| r.status == s).count();
    let failed: Vec<_> = reports.iter().filter(|r| r.is_failure()).collect();
    for r in &failed {
        println!(
            "\n{}/{}: {}\nreproduce: {}",
            r.op,
            r.dtype,
            r.failure.as_deref().unwrap_or(""),
            r.reproduce
        );
    }
    use kiln_conformance::Status as S;
    println!(
        "\n{} checks: {} passed, {} failed, {} unsupported, {} expected failures, {} unexpected passes ({:.1} s)",
        reports.len(),
        count(S::Pass),
        failed.len(),
        count(S::Unsupported),
        count(S::ExpectedFailure),
        count(S::UnexpectedPass),
        start.elapsed().as_secs_f64()
    );
    reports
}

fn run_conformance<B: Backend>(a: ConformanceArgs, backend: B) -> Result<()> {
    if let Some(path) = &a.json {
        check_output_file("--json", path)?;
    }
    let (cfg, selected) = conformance_plan(&a, &backend.name())?;
    let reports = run_suite(&backend, &cfg, selected);
    let failed = reports.iter().filter(|r| r.is_failure()).count();
    if let Some(path) = &a.json {
        let json =
            serde_json::to_string_pretty(&reports).map_err(|e| Error::invalid(e.to_string()))?;
        model_file::write_atomic(path, json.as_bytes())?;
        println!("wrote {}", path.display());
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{failed} conformance checks failed on {}",
            a.backend
        )))
    }
}

fn bench_command<D: Device>(a: bench::BenchArgs, device: &D) -> Result<()> {
    let spec = a.backend.clone();
    with_backend!(spec.as_str(), a.threads, device, |b| bench::bench(a, b))
}

fn report_command<D: Device>(a: ReportArgs, device: &D) -> Result<()> {
    let spec = a.check.backend.clone();
    with_backend!(spec.as_str(), a.check.threads, device, |b| run_report(a, b))
}

fn run_report<B: Backend>(a: ReportArgs, backend: B) -> Result<()> {
    let out = &a.out;
    let (cfg, selected) = conformance_plan(&a.check, &backend.name())?;
    // The saved runs are read, and the folder made, before the runs that
    // take minutes: a bad file or an unwritable folder fails at once and
    // leaves nothing behind.
    let saved_reports: Option<Vec<kiln_conformance::Report>> = a
        .conformance_json
        .as_deref()
        .map(|p| read_json(p, "kiln conformance"))
        .transpose()?;
    let saved_bench = a.bench_json.as_deref().map(bench::read_run).transpose()?;
    std::fs::create_dir_all(out)
        .map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    let reports = match saved_reports {
        Some(r) => r,
        None => run_suite(&backend, &cfg, selected),
    };
    let bench = match saved_bench {
        Some(b) => b,
        None => {
            let threads = a
                .check
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let mut bc = kiln_bench::suite::BenchConfig::new(a.quick, threads);
            bc.comparators = !a.no_comparators;
            let r = kiln_bench::suite::run(&backend, &bc)?;
            print!("\n{}", bench::table(&r, None));
            r
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let meta = report::Meta {
        backend: if cfg.backend == backend.name() {
            cfg.backend.clone()
        } else {
            format!("{} ({})", cfg.backend, backend.name())
        },
        machine: format!("{} ({cores} cores)", features::cpu_model()),
        conformance: match &a.conformance_json {
            Some(p) => format!("from {}", p.display()),
            None => cfg.describe(),
        },
        date: utc_date(),
    };
    let files: [(&str, String); 5] = [
        ("conformance.json", pretty_json(&reports)?),
        ("bench.json", pretty_json(&bench)?),
        ("roofline.svg", kiln_bench::roofline::svg(&bench)),
        (
            "report.md",
            report::markdown(&meta, &reports, &bench, "roofline.svg"),
        ),
        ("report.html", report::html(&meta, &reports, &bench)),
    ];
    println!();
    for (name, text) in &files {
        let path = out.join(name);
        model_file::write_atomic(&path, text.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// A model for `eval`, `predict`, `serve` or `generate`, from a model
/// file, a checkpoint or a run folder ([`model_file::load_for_inference`]),
/// with a note when the file carries no checksums to verify its tensors by.
fn load_model<B: Backend>(
    path: &std::path::Path,
    backend: &B,
) -> Result<(model_file::Loaded<B>, PathBuf)> {
    let (loaded, file) = model_file::load_for_inference(path, backend)?;
    if !loaded.metadata.contains_key(model_file::CHECKSUMS_KEY) {
        eprintln!(
            "note: {} has no `{}`: its tensors cannot be checked for damage (a file written by an older kiln, or rewritten by another program)",
            file.display(),
            model_file::CHECKSUMS_KEY
        );
    }
    Ok((loaded, file))
}

/// Parses a real-valued flag as f32, refusing a number f32 cannot hold:
/// `1e-50` would become 0 and `1e39` infinity, and the flag's own check
/// would then report a value that was never typed.
fn f32_flag(text: &str) -> std::result::Result<f32, String> {
    let wide: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    let v = wide as f32;
    if wide.is_finite() && (v.is_infinite() || (v == 0.0 && wide != 0.0)) {
        return Err(format!(
            "{text} is outside the range of f32 (about 1.4e-45 to 3.4e38 in magnitude, or 0)"
        ));
    }
    Ok(v)
}

/// A run saved by `COMMAND --json FILE`, read back.
fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path, command: &str) -> Result<T> {
    let text = kiln_core::files::read_to_string(path, &format!("{command} run"))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::invalid(format!(
            "{}: not a {command} run ({e}); write one with {command} --json FILE",
            path.display()
        ))
    })
}

fn pretty_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::invalid(e.to_string()))
}

/// Today's date and time in UTC, `YYYY-MM-DD HH:MM UTC`.
fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_belongs_to_the_folder_holding_its_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let ckpts = dir.path().join("run").join("checkpoints");
        std::fs::create_dir_all(&ckpts).unwrap();
        let file = ckpts.join("ckpt-000001.safetensors");
        std::fs::write(&file, b"").unwrap();
        let run = dir.path().join("run");
        assert_eq!(run_folder_of(&ckpts), Some(run.clone()));
        assert_eq!(run_folder_of(&file), Some(run));
        // Named from inside the run: the run is `.`.
        assert_eq!(
            run_folder_of(Path::new("checkpoints/ckpt-000001.safetensors")),
            Some(PathBuf::from("."))
        );
        // A model file elsewhere has no run.
        assert_eq!(run_folder_of(&dir.path().join("model.safetensors")), None);
    }
}
