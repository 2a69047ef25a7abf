//! `kiln bench`: the standard op set on a backend, as a table, JSON and a
//! roofline picture, optionally against a saved run.

use std::path::PathBuf;

use kiln_bench::suite::{self, BenchConfig, BenchReport};
use kiln_core::{Backend, Error, Result};
use kiln_train::model_file;

/// Options of `kiln bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Backend: cpu, cpu:KERNELS, cuda / cuda:N, or device (a program's own).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Worker threads (and threads of the peak measurements and comparators).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Small shapes and short timings: a smoke run.
    #[arg(long)]
    pub quick: bool,
    /// Seconds each op is timed for, after one warm-up run [default: 0.3, 0.02 with --quick].
    #[arg(long, value_name = "SECONDS")]
    pub budget: Option<f64>,
    /// Do not time matrixmultiply, the gemm crate and OpenBLAS beside a CPU backend.
    #[arg(long)]
    pub no_comparators: bool,
    /// Write the run as JSON (for --compare and kiln report).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the roofline picture as SVG.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Print each op's speed against a run saved with --json.
    #[arg(long, value_name = "FILE")]
    pub compare: Option<PathBuf>,
}

/// The bench configuration `a` asks for.
pub fn config(a: &BenchArgs) -> Result<BenchConfig> {
    let threads = match a.threads {
        Some(n) => kiln_cpu::check_threads("--threads", n)?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut cfg = BenchConfig::new(a.quick, threads);
    if let Some(b) = a.budget {
        if !(b.is_finite() && b > 0.0 && b <= 60.0) {
            return Err(Error::invalid(format!(
                "--budget {}: expected seconds per op, more than 0 and at most 60",
                kiln_core::Number(b)
            )));
        }
        cfg.budget_s = b;
    }
    cfg.comparators = !a.no_comparators;
    Ok(cfg)
}

/// A run saved with `kiln bench --json`, its numbers checked.
pub fn read_run(path: &std::path::Path) -> Result<BenchReport> {
    let run: BenchReport = crate::read_json(path, "kiln bench")?;
    run.check()
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    Ok(run)
}

/// Runs the bench on `backend` and prints, writes and compares as `a` says.
pub fn bench<B: Backend>(a: BenchArgs, backend: B) -> Result<()> {
    for (flag, path) in [("--json", &a.json), ("--svg", &a.svg)] {
        if let Some(path) = path {
            crate::check_output_file(flag, path)?;
        }
    }
    let cfg = config(&a)?;
    let baseline: Option<BenchReport> = a.compare.as_deref().map(read_run).transpose()?;
    eprintln!(
        "kiln bench: {} on {} ({} s per op{})",
        backend.name(),
        kiln_cpu::features::cpu_model(),
        cfg.budget_s,
        if cfg.quick { ", quick" } else { "" }
    );
    let report = suite::run(&backend, &cfg)?;
    print!("{}", table(&report, baseline.as_ref()));
    if let Some(path) = &a.json {
        let json =
            serde_json::to_string_pretty(&report).map_err(|e| Error::invalid(e.to_string()))?;
        model_file::write_atomic(path, json.as_bytes())?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &a.svg {
        model_file::write_atomic(path, kiln_bench::roofline::svg(&report).as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The run as a text table: one row per op, the comparators after each GEMM.
pub fn table(r: &BenchReport, baseline: Option<&BenchReport>) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "backend {} on {}\ncompute peak {:.1} GFLOP/s ({}); bandwidth {:.1} GB/s ({})\n",
        r.backend,
        r.cpu,
        r.compute_peak.value,
        r.compute_peak.how,
        r.bandwidth.value,
        r.bandwidth.how
    );
    let _ = writeln!(
        s,
        "{:<24} {:<28} {:>10} {:>19} {:>9} {:>8} {:>7} {:>7}{}",
        "op",
        "shape",
        "median ms",
        "min–max ms",
        "GFLOP/s",
        "GB/s",
        "%peak",
        "%bw",
        baseline.map_or(String::new(), |b| format!("   × {}", b.backend))
    );
    for m in &r.rows {
        let bw = bandwidth_cell(m.of_bandwidth);
        let vs = baseline
            .and_then(|b| b.find(&m.op, &m.shape))
            .map(|b| format!("   {:.2}×", b.median_s / m.median_s))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<24} {:<28} {:>10.3} {:>9.3}–{:<9.3} {:>9.1} {:>8.1} {:>6.0}% {bw:>7}{vs}",
            m.op,
            m.shape,
            1e3 * m.median_s,
            1e3 * m.min_s,
            1e3 * m.max_s,
            m.gflops,
            m.gbs,
            100.0 * m.of_compute_peak,
        );
        for p in &m.slow_paths {
            let _ = writeln!(s, "{:<24} slow path: {p}", "");
        }
        for c in &m.compared {
            let _ = writeln!(
                s,
                "{:<24} {:<28} {:>10} {:>19} {:>9.1} {:>8} {:>6.0}%   kiln is {:.2}×",
                format!("  {}", c.library),
                "",
                "",
                "",
                c.gflops,
                "",
                100.0 * c.gflops / r.compute_peak.value.max(f64::MIN_POSITIVE),
                m.gflops / c.gflops
            );
        }
    }
    if let Some(note) = in_cache_note(r) {
        let _ = writeln!(s, "\n{note}");
    }
    s
}

/// The footnote for a run with rows above the memory roof, if it has any.
pub fn in_cache_note(r: &BenchReport) -> Option<&'static str> {
    r.rows
        .iter()
        .any(|m| m.of_bandwidth > 1.0)
        .then_some(IN_CACHE)
}

/// The footnote to a `*` in the bandwidth column.
pub const IN_CACHE: &str =
    "* above 100 % of the measured memory bandwidth: the operands stayed in cache";

/// A row's share of the memory bandwidth, `*`-marked above 100 % (where
/// the operands were served from cache, which is faster than memory).
pub fn bandwidth_cell(of_bandwidth: f64) -> String {
    let mark = if of_bandwidth > 1.0 { "*" } else { "" };
    format!("{:.0}%{mark}", 100.0 * of_bandwidth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_bench::suite::{Measurement, Peak};

    fn row(op: &str, of_bandwidth: f64) -> Measurement {
        Measurement {
            op: op.into(),
            shape: "64".into(),
            median_s: 1e-3,
            min_s: 1e-3,
            max_s: 1e-3,
            reps: 3,
            flops: 1e6,
            bytes: 1e6,
            gflops: 1.0,
            gbs: 1.0,
            of_compute_peak: 0.01,
            of_bandwidth,
            compared: Vec::new(),
            slow_paths: Vec::new(),
        }
    }

    #[test]
    fn rows_above_the_memory_roof_are_marked_and_explained() {
        let peak = |value| Peak {
            value,
            how: "test".into(),
        };
        let mut run = BenchReport {
            backend: "cpu:test".into(),
            cpu: "test".into(),
            compute_peak: peak(100.0),
            bandwidth: peak(10.0),
            rows: vec![row("affine", 0.5)],
        };
        let t = table(&run, None);
        assert!(t.contains(" 50%") && !t.contains('*'), "{t}");
        run.rows.push(row("gemm", 3.5));
        let t = table(&run, None);
        assert!(t.contains("350%*") && t.contains(IN_CACHE), "{t}");
        assert!(run.check().is_ok());
        run.rows[1].min_s = 2e-3;
        assert!(run.check().is_err());
    }
}
