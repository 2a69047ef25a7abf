//! `kiln bench`: a standard op set timed on any [`Backend`], against the
//! machine's peaks measured in the same process.
//!
//! Each op runs once to warm up, then repeatedly within a time budget
//! (at least [`MIN_REPS`] times); the report gives the median and the
//! fastest and slowest run, GFLOP/s and GB/s from the op's nominal work
//! and traffic, and those as fractions of the measured compute peak and
//! memory bandwidth. The peaks: on a CPU backend, an FMA loop on the widest
//! vectors ([`crate::peak`]) and a STREAM-like triad on every thread; on
//! any other device, its own `affine` over 64 MiB (read + write) as the
//! bandwidth and its best GEMM as the compute roof — the report says which.
//!
//! On the CPU, each GEMM row also times the libraries a user would
//! otherwise pick — matrixmultiply, the gemm crate and OpenBLAS (loaded at
//! run time, where installed) — on the same shape in the same run.

use std::time::Instant;

use kiln_core::slow_path::{self, SlowPath};
use kiln_core::{
    Activation, AdamStep, Backend, BinaryOp, DType, Error, GemmEpilogue, HostData, Layout, Result,
    Shape, UnaryOp, View, Window2d,
};
use serde::{Deserialize, Serialize};

use crate::comparators;

/// Runs per op at the least, whatever the budget.
pub const MIN_REPS: usize = 3;

/// How a bench run is set up.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Smaller shapes and budgets (a smoke run).
    pub quick: bool,
    /// Seconds each op may take, warm-up excluded.
    pub budget_s: f64,
    /// Threads for the host peaks and the CPU comparators.
    pub threads: usize,
    /// Time the other libraries beside a CPU backend's GEMMs.
    pub comparators: bool,
}

impl BenchConfig {
    /// The full run (0.3 s per op) or the quick one (0.02 s, small shapes).
    pub fn new(quick: bool, threads: usize) -> Self {
        BenchConfig {
            quick,
            budget_s: if quick { 0.02 } else { 0.3 },
            threads: threads.max(1),
            comparators: true,
        }
    }
}

/// A measured peak and how it was measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Peak {
    /// The value: GFLOP/s or GB/s.
    pub value: f64,
    /// How it was measured.
    pub how: String,
}

/// Another library's time on the same shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    /// The library (`matrixmultiply`, `gemm crate`, `openblas (Haswell)`).
    pub library: String,
    /// Its GFLOP/s.
    pub gflops: f64,
}

/// One op's timing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurement {
    /// The op family (`gemm`, `conv2d`, `softmax_cross_entropy`, …).
    pub op: String,
    /// The problem, e.g. `1024×1024×1024` or `x[32,32,13,13] w[64,32,3,3]`.
    pub shape: String,
    /// Median seconds per run.
    pub median_s: f64,
    /// Fastest run.
    pub min_s: f64,
    /// Slowest run.
    pub max_s: f64,
    /// Runs timed.
    pub reps: usize,
    /// Nominal floating-point operations per run.
    pub flops: f64,
    /// Nominal bytes moved per run (each operand read once, the result written once).
    pub bytes: f64,
    /// GFLOP/s at the median.
    pub gflops: f64,
    /// GB/s at the median.
    pub gbs: f64,
    /// GFLOP/s as a fraction of the compute peak.
    pub of_compute_peak: f64,
    /// GB/s as a fraction of the bandwidth.
    pub of_bandwidth: f64,
    /// Other libraries on the same problem (CPU GEMMs).
    pub compared: Vec<Comparison>,
    /// Calls of this row's timing that took a slow path
    /// ([`Backend::slow_paths`]): a scalar fallback, a host round trip.
    #[serde(default)]
    pub slow_paths: Vec<SlowPath>,
}

/// A whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    /// The backend's name.
    pub backend: String,
    /// The host's processor.
    pub cpu: String,
    /// The compute roof.
    pub compute_peak: Peak,
    /// The memory roof.
    pub bandwidth: Peak,
    /// Every op's timing, in run order.
    pub rows: Vec<Measurement>,
}

impl BenchReport {
    /// Checks a run read back from a file: positive, finite peaks; every
    /// row's times positive and finite with min ≤ median ≤ max; rates and
    /// fractions finite and not negative. A hand-edited or damaged run
    /// would otherwise print ratios that mean nothing.
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| {
            Err(Error::invalid(format!(
                "not a valid kiln bench run: {what}"
            )))
        };
        for (name, p) in [
            ("compute peak", &self.compute_peak),
            ("bandwidth", &self.bandwidth),
        ] {
            if !(p.value.is_finite() && p.value > 0.0) {
                return bad(format!("the {name} is {}", p.value));
            }
        }
        for m in &self.rows {
            let times = [m.min_s, m.median_s, m.max_s];
            if !times.iter().all(|t| t.is_finite() && *t > 0.0)
                || m.min_s > m.median_s
                || m.median_s > m.max_s
            {
                return bad(format!(
                    "{} {}: times min {} median {} max {} s (expected 0 < min ≤ median ≤ max)",
                    m.op, m.shape, m.min_s, m.median_s, m.max_s
                ));
            }
            let rates = [
                m.flops,
                m.bytes,
                m.gflops,
                m.gbs,
                m.of_compute_peak,
                m.of_bandwidth,
            ];
            if !rates.iter().all(|r| r.is_finite() && *r >= 0.0)
                || !m
                    .compared
                    .iter()
                    .all(|c| c.gflops.is_finite() && c.gflops > 0.0)
            {
                return bad(format!(
                    "{} {}: a rate is negative or not finite",
                    m.op, m.shape
                ));
            }
        }
        Ok(())
    }

    /// The row for `op` on `shape`, if the run has one.
    pub fn find(&self, op: &str, shape: &str) -> Option<&Measurement> {
        self.rows.iter().find(|r| r.op == op && r.shape == shape)
    }
}

/// Median, fastest and slowest of `f` after one warm-up, repeated within
/// `budget_s` seconds (at least [`MIN_REPS`] runs, at most 1000).
pub fn time_op(budget_s: f64, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64, usize)> {
    f()?;
    let mut t = Vec::new();
    let start = Instant::now();
    while t.len() < MIN_REPS || (start.elapsed().as_secs_f64() < budget_s && t.len() < 1000) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok((t[t.len() / 2], t[0], t[t.len() - 1], t.len()))
}

/// A STREAM-like triad `a = b + s·c` over three 32 MiB arrays on
/// `threads` threads: the host's memory bandwidth in GB/s (24 bytes per
/// element: two reads, one write).
pub fn host_triad(threads: usize) -> f64 {
    let n = 8 << 20;
    let threads = threads.max(1);
    let (b, c) = (vec![1.0f32; n], vec![2.0f32; n]);
    let mut a = vec![0.0f32; n];
    let chunk = n.div_ceil(threads);
    let run = |a: &mut [f32]| {
        std::thread::scope(|s| {
            for ((a, b), c) in a
                .chunks_mut(chunk)
                .zip(b.chunks(chunk))
                .zip(c.chunks(chunk))
            {
                s.spawn(move || {
                    for ((x, &y), &z) in a.iter_mut().zip(b).zip(c) {
                        *x = y + 3.0 * z;
                    }
                });
            }
        });
    };
    run(&mut a);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let s = Instant::now();
        run(&mut a);
        best = best.min(s.elapsed().as_secs_f64());
    }
    std::hint::black_box(&a);
    24.0 * n as f64 / best / 1e9
}

/// Operands for one op, uploaded once.
struct Inputs<B: Backend> {
    backend: B,
}

impl<B: Backend> Inputs<B> {
    fn tensor(&self, dims: &[usize], seed: u32) -> Result<(B::Storage, Layout)> {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                    / 16_777_216.0
                    - 0.5
            })
            .collect();
        Ok((
            self.backend.upload_owned(HostData::F32(v))?,
            Layout::contiguous(Shape::new(dims)?),
        ))
    }
}

/// The problems a run times.
struct Plan {
    squares: Vec<usize>,
    layers: Vec<(&'static str, usize, usize, usize)>,
    convs: Vec<([usize; 4], [usize; 4])>,
    rows: (usize, usize),
    elements: usize,
}

fn plan(quick: bool) -> Plan {
    if quick {
        Plan {
            squares: vec![64, 128],
            layers: vec![("mlp fwd 1", 128, 784, 64)],
            convs: vec![([8, 1, 28, 28], [8, 1, 3, 3])],
            rows: (64, 1000),
            elements: 1 << 16,
        }
    } else {
        Plan {
            squares: vec![256, 512, 1024],
            layers: vec![
                ("mlp fwd 1", 128, 784, 64),
                ("mlp dW1", 784, 128, 64),
                ("mlp fwd 2", 128, 64, 10),
            ],
            // The seed CNN's two convolutions at batch 64.
            convs: vec![
                ([64, 1, 28, 28], [32, 1, 3, 3]),
                ([64, 32, 13, 13], [64, 32, 3, 3]),
            ],
            rows: (1024, 1000),
            elements: 1 << 22,
        }
    }
}

fn dims_text(d: &[usize]) -> String {
    d.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// Runs the standard op set on `backend`.
pub fn run<B: Backend>(backend: &B, cfg: &BenchConfig) -> Result<BenchReport> {
    let io = Inputs {
        backend: backend.clone(),
    };
    let p = plan(cfg.quick);
    let mut rows: Vec<Measurement> = Vec::new();
    let mut add = |op: &str,
                   shape: String,
                   flops: f64,
                   bytes: f64,
                   f: &mut dyn FnMut() -> Result<()>|
     -> Result<()> {
        let before = backend.slow_paths();
        let (median_s, min_s, max_s, reps) = time_op(cfg.budget_s, || {
            f()?;
            backend.synchronize()
        })?;
        let slow_paths = slow_path::since(&before, &backend.slow_paths());
        rows.push(Measurement {
            op: op.into(),
            shape,
            median_s,
            min_s,
            max_s,
            reps,
            flops,
            bytes,
            gflops: flops / median_s / 1e9,
            gbs: bytes / median_s / 1e9,
            of_compute_peak: 0.0,
            of_bandwidth: 0.0,
            compared: Vec::new(),
            slow_paths,
        });
        Ok(())
    };
    let gemms: Vec<(String, usize, usize, usize)> = p
        .squares
        .iter()
        .map(|&s| ("gemm".to_string(), s, s, s))
        .chain(
            p.layers
                .iter()
                .map(|&(_, m, k, n)| ("gemm".to_string(), m, k, n)),
        )
        .collect();
    for (op, m, k, n) in &gemms {
        let (a, la) = io.tensor(&[1, *m, *k], 1)?;
        let (b, lb) = io.tensor(&[1, *k, *n], 2)?;
        let flops = 2.0 * (m * k * n) as f64;
        let bytes = 4.0 * (m * k + k * n + m * n) as f64;
        add(op, format!("{m}×{k}×{n}"), flops, bytes, &mut || {
            backend
                .gemm(
                    View::new(&a, &la),
                    View::new(&b, &lb),
                    &GemmEpilogue::default(),
                )
                .map(drop)
        })?;
    }
    for &(xd, wd) in &p.convs {
        let win = Window2d::valid([wd[2], wd[3]], [1, 1]);
        let [oh, ow] = win.output("bench", [xd[2], xd[3]])?;
        let (x, lx) = io.tensor(&xd, 3)?;
        let (w, lw) = io.tensor(&wd, 4)?;
        let (dy, ld) = io.tensor(&[xd[0], wd[0], oh, ow], 5)?;
        let flops = 2.0 * (xd[0] * wd[0] * oh * ow * wd[1] * wd[2] * wd[3]) as f64;
        let (xs, ws, ys) = (
            xd.iter().product::<usize>(),
            wd.iter().product::<usize>(),
            xd[0] * wd[0] * oh * ow,
        );
        let bytes = 4.0 * (xs + ws + ys) as f64;
        let shape = format!("x[{}] w[{}]", dims_text(&xd), dims_text(&wd));
        add("conv2d", shape.clone(), flops, bytes, &mut || {
            backend
                .conv2d(
                    View::new(&x, &lx),
                    View::new(&w, &lw),
                    None,
                    Activation::Relu,
                    &win,
                )
                .map(drop)
        })?;
        add(
            "conv2d_backward_data",
            shape.clone(),
            flops,
            bytes,
            &mut || {
                backend
                    .conv2d_backward_data(
                        View::new(&dy, &ld),
                        View::new(&w, &lw),
                        &win,
                        [xd[2], xd[3]],
                    )
                    .map(drop)
            },
        )?;
        add("conv2d_backward_filter", shape, flops, bytes, &mut || {
            backend
                .conv2d_backward_filter(View::new(&x, &lx), View::new(&dy, &ld), &win)
                .map(drop)
        })?;
        let pool = Window2d::valid([2, 2], [2, 2]);
        let (y, ly) = io.tensor(&[xd[0], wd[0], oh, ow], 6)?;
        add(
            "max_pool2d",
            format!("[{}] 2×2", dims_text(&[xd[0], wd[0], oh, ow])),
            ys as f64,
            4.0 * 1.5 * ys as f64,
            &mut || backend.max_pool2d(View::new(&y, &ly), &pool).map(drop),
        )?;
    }
    let (r, c) = p.rows;
    let (logits, ll) = io.tensor(&[r, c], 7)?;
    let labels =
        backend.upload_owned(HostData::U32((0..r as u32).map(|i| i % c as u32).collect()))?;
    let llab = Layout::contiguous(Shape::new(&[r])?);
    let rc = (r * c) as f64;
    add(
        "softmax",
        format!("[{r},{c}]"),
        4.0 * rc,
        8.0 * rc,
        &mut || backend.softmax(View::new(&logits, &ll), false).map(drop),
    )?;
    add(
        "softmax_cross_entropy",
        format!("[{r},{c}]"),
        5.0 * rc,
        8.0 * rc,
        &mut || {
            backend
                .softmax_cross_entropy(View::new(&logits, &ll), View::new(&labels, &llab))
                .map(drop)
        },
    )?;
    add(
        "reduce_sum",
        format!("[{r},{c}] rows"),
        rc,
        4.0 * rc,
        &mut || {
            backend
                .reduce(kiln_core::ReduceOp::Sum, View::new(&logits, &ll), &[1])
                .map(drop)
        },
    )?;
    let e = p.elements;
    let (x, lx) = io.tensor(&[e], 8)?;
    let (y, ly) = io.tensor(&[e], 9)?;
    let ef = e as f64;
    add("unary_exp", format!("[{e}]"), ef, 8.0 * ef, &mut || {
        backend.unary(UnaryOp::Exp, View::new(&x, &lx)).map(drop)
    })?;
    add("binary_add", format!("[{e}]"), ef, 12.0 * ef, &mut || {
        backend
            .binary(BinaryOp::Add, View::new(&x, &lx), View::new(&y, &ly))
            .map(drop)
    })?;
    // The same sum with one operand transposed: what a layout the backend's
    // fast path does not take costs (its slow path is listed under the row).
    let side = (e as f64).sqrt() as usize;
    let square = Layout::contiguous(Shape::new(&[side, side])?);
    let transposed = square.transpose(0, 1)?;
    let sf = (side * side) as f64;
    add(
        "binary_add",
        format!("[{side},{side}] + [{side},{side}]ᵀ"),
        sf,
        12.0 * sf,
        &mut || {
            backend
                .binary(
                    BinaryOp::Add,
                    View::new(&x, &square),
                    View::new(&y, &transposed),
                )
                .map(drop)
        },
    )?;
    add("affine", format!("[{e}]"), 2.0 * ef, 8.0 * ef, &mut || {
        backend.affine(View::new(&x, &lx), 1.5, 0.25).map(drop)
    })?;
    let (mut param, _) = io.tensor(&[e], 10)?;
    let (grad, _) = io.tensor(&[e], 11)?;
    let mut m = backend.full(e, DType::F32, 0.0)?;
    let mut v = backend.full(e, DType::F32, 0.0)?;
    let step = AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-7,
        weight_decay: 0.0,
        decoupled: false,
        step: 1,
    };
    // Adam reads p, g, m, v and writes p, m, v: 28 bytes, about 12 flops.
    add(
        "adam_update",
        format!("[{e}]"),
        12.0 * ef,
        28.0 * ef,
        &mut || backend.adam_update(&mut param, &grad, &mut m, &mut v, &step),
    )?;

    // The roofs.
    let is_cpu = backend.name().starts_with("cpu");
    let best_gemm = rows
        .iter()
        .filter(|r| r.op == "gemm")
        .map(|r| r.gflops)
        .fold(0.0, f64::max);
    let (compute_peak, bandwidth) = if is_cpu {
        let (peak, isa) = crate::peak::measure(cfg.threads);
        (
            Peak {
                value: peak,
                how: format!("FMA loop ({isa}), {} threads", cfg.threads),
            },
            Peak {
                value: host_triad(cfg.threads),
                how: format!("triad a = b + s·c over 3 × 32 MiB, {} threads", cfg.threads),
            },
        )
    } else {
        let affine = rows
            .iter()
            .find(|r| r.op == "affine")
            .map_or(0.0, |r| r.gbs);
        (
            Peak {
                value: best_gemm,
                how: "the device's best GEMM here (no FMA loop runs on a foreign device)".into(),
            },
            Peak {
                value: affine,
                how: "the device's own affine (read + write)".into(),
            },
        )
    };
    for r in &mut rows {
        r.of_compute_peak = r.gflops / compute_peak.value.max(f64::MIN_POSITIVE);
        r.of_bandwidth = r.gbs / bandwidth.value.max(f64::MIN_POSITIVE);
    }
    if is_cpu && cfg.comparators {
        let budget = cfg.budget_s;
        let blas = comparators::OpenBlas::load(cfg.threads);
        for r in rows.iter_mut().filter(|r| r.op == "gemm") {
            let dims: Vec<usize> = r.shape.split('×').filter_map(|d| d.parse().ok()).collect();
            let [m, k, n] = dims[..] else { continue };
            let g = |s: f64| r.flops / s / 1e9;
            let p = crate::Product::new(m, k, n);
            r.compared.push(Comparison {
                gflops: g(comparators::matrixmultiply(p, cfg.threads, budget)),
                library: comparators::matrixmultiply_label(cfg.threads),
            });
            r.compared.push(Comparison {
                library: "gemm crate".into(),
                gflops: g(comparators::gemm_crate(p, cfg.threads, budget)),
            });
            if let Some(blas) = &blas {
                r.compared.push(Comparison {
                    library: blas.label(),
                    gflops: g(blas.sgemm(p, budget)),
                });
            }
        }
    }
    Ok(BenchReport {
        backend: backend.name(),
        cpu: kiln_cpu::features::cpu_model(),
        compute_peak,
        bandwidth,
        rows,
    })
}
