//! `kiln-bench-compare`: SGEMM GFLOP/s of kiln (each SIMD kernel set) beside
//! the `matrixmultiply` and `gemm` crates and, when given their numbers,
//! NumPy/OpenBLAS — with the machine's peak measured in the same process.
//!
//! ```text
//! kiln-bench-compare [--threads N] [--quick] [--numpy FILE.json] [--markdown]
//!                    [--shapes M,K,N[;M,K,N…]] [--kiln-only] [--dtype f32|bf16|f16]
//! ```
//! `--shapes` replaces the standard shape list; `--kiln-only` skips the
//! comparator libraries (for quick experiments on kiln's kernels).
//! `--dtype` gives kiln's operands in that type (f32 results, as every kiln
//! GEMM accumulates in f32); the comparators and the peak stay f32, so the
//! "% peak" column of a bf16 run can pass 100 % where the processor has
//! AVX-512 BF16 (two multiply-adds per lane per instruction).
//! `--numpy` takes `{"m,k,n,threads": gflops, ...}` as benches/compare.sh
//! writes it. `matrixmultiply` takes its thread count from
//! MATMUL_NUM_THREADS, which compare.sh sets to match.

use std::collections::HashMap;

use kiln_bench::{comparators, median_seconds, peak, reps_for, KilnGemm};
use kiln_cpu::KernelSet;

struct Args {
    threads: usize,
    quick: bool,
    numpy: HashMap<String, f64>,
    markdown: bool,
    shapes: Option<Vec<(usize, usize, usize)>>,
    kiln_only: bool,
    dtype: kiln_core::DType,
}

const USAGE: &str = "usage: kiln-bench-compare [--threads N] [--quick] [--numpy FILE.json] [--markdown] [--shapes M,K,N[;M,K,N...]] [--kiln-only] [--dtype f32|bf16|f16]";

/// `"256,256,256;128,784,64"` as shapes.
fn parse_shapes(text: &str) -> Result<Vec<(usize, usize, usize)>, String> {
    text.split(';')
        .map(|s| {
            let d: Vec<usize> = s
                .split(',')
                .map(|x| x.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|_| format!("--shapes: {s:?} is not M,K,N in whole numbers"))?;
            match d[..] {
                [m, k, n]
                    if m > 0
                        && k > 0
                        && n > 0
                        && m.saturating_mul(k).saturating_mul(n) <= 1 << 40 =>
                {
                    Ok((m, k, n))
                }
                _ => Err(format!(
                    "--shapes: {s:?} is not three positive extents M,K,N (product at most 2^40)"
                )),
            }
        })
        .collect()
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        threads: 1,
        quick: false,
        numpy: HashMap::new(),
        markdown: false,
        shapes: None,
        kiln_only: false,
        dtype: kiln_core::DType::F32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--threads" => {
                a.threads = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--threads takes a positive number")?
            }
            "--quick" => a.quick = true,
            "--markdown" => a.markdown = true,
            "--kiln-only" => a.kiln_only = true,
            "--dtype" => {
                a.dtype = match it.next().as_deref() {
                    Some("f32") => kiln_core::DType::F32,
                    Some("bf16") => kiln_core::DType::BF16,
                    Some("f16") => kiln_core::DType::F16,
                    _ => return Err("--dtype takes f32, bf16 or f16".into()),
                }
            }
            "--shapes" => {
                a.shapes = Some(parse_shapes(
                    &it.next().ok_or("--shapes takes M,K,N[;M,K,N...]")?,
                )?)
            }
            "--numpy" => {
                let path = it.next().ok_or("--numpy takes a file")?;
                let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
                a.numpy = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag {other} (see --help)")),
        }
    }
    Ok(a)
}

/// The standard table: squares from 64³ to 4096³, then the layer shapes of
/// the seed MLP and CNN (batch 128) and of GPT config A (12 × 64 positions,
/// 128 wide, 4 heads of 32, a 73-character vocabulary), forward and
/// backward.
fn standard_shapes() -> Vec<(&'static str, usize, usize, usize)> {
    let mut v: Vec<(&str, usize, usize, usize)> = [64, 128, 256, 512, 1024, 2048, 4096]
        .iter()
        .map(|&s| ("square", s, s, s))
        .collect();
    v.extend([
        ("mlp fwd 1", 128, 784, 64),
        ("mlp dW1", 784, 128, 64),
        ("mlp fwd 2", 128, 64, 10),
        ("mlp dh", 128, 10, 64),
        ("mlp dW2", 64, 128, 10),
        ("cnn conv (1 image)", 32, 9, 676),
        ("cnn dense fwd", 128, 5408, 64),
        ("cnn dense dW", 5408, 128, 64),
        ("cnn dense dx", 128, 64, 5408),
        ("gpt qkv", 768, 128, 384),
        ("gpt mlp up", 768, 128, 512),
        ("gpt mlp down", 768, 512, 128),
        ("gpt mlp dW", 128, 768, 512),
        ("gpt lm head", 768, 128, 73),
        ("gpt q·kᵀ (1 head)", 64, 32, 64),
    ]);
    v
}

fn gflops(m: usize, k: usize, n: usize, secs: f64) -> f64 {
    2.0 * (m * k * n) as f64 / secs / 1e9
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let (peak, isa) = peak::measure(args.threads);
    let sets: Vec<KernelSet> = [KernelSet::Avx512, KernelSet::Avx2, KernelSet::Neon]
        .into_iter()
        .filter(|k| k.available())
        .collect();
    let shapes: Vec<(&str, usize, usize, usize)> = if let Some(list) = &args.shapes {
        list.iter().map(|&(m, k, n)| ("given", m, k, n)).collect()
    } else if args.quick {
        vec![("square", 64, 64, 64), ("mlp fwd", 128, 784, 64)]
    } else {
        standard_shapes()
    };
    let budget = if args.quick { 0.01 } else { 0.4 };
    println!(
        "machine peak ({isa}, {} thread{}): {peak:.1} GFLOP/s (measured, f32 FMA); kiln's operands {}",
        args.threads,
        if args.threads > 1 { "s" } else { "" },
        args.dtype
    );
    let sep = if args.markdown { " | " } else { "  " };
    let mut header = vec!["shape".to_string(), "m×k×n".into()];
    header.extend(sets.iter().map(|s| format!("kiln {}", s.name())));
    header.extend([
        "% peak".into(),
        "matrixmultiply".into(),
        "gemm crate".into(),
        "numpy".into(),
        "kiln/mm".into(),
        "kiln/gemm".into(),
        "kiln/numpy".into(),
    ]);
    if args.markdown {
        println!("| {} |", header.join(" | "));
        println!("|{}|", vec!["---"; header.len()].join("|"));
    } else {
        println!(
            "{}",
            header
                .iter()
                .map(|h| format!("{h:>14}"))
                .collect::<Vec<_>>()
                .join(sep)
        );
    }
    for (name, m, k, n) in shapes {
        let flops = 2.0 * (m * k * n) as f64;
        let reps = reps_for(flops, peak * 1e9 * 0.5, budget);
        let kiln: Vec<f64> = sets
            .iter()
            .map(|&s| {
                let g = KilnGemm::new(s, args.threads, m, k, n)
                    .and_then(|g| g.with_dtype(args.dtype))
                    .expect("an available kernel set");
                gflops(m, k, n, median_seconds(reps, || g.run()))
            })
            .collect();
        let best = kiln.iter().copied().fold(0.0, f64::max);
        let (mm, gc) = if args.kiln_only {
            (f64::NAN, f64::NAN)
        } else {
            (
                gflops(m, k, n, comparators::matrixmultiply(m, k, n, budget)),
                gflops(
                    m,
                    k,
                    n,
                    comparators::gemm_crate(m, k, n, args.threads, budget),
                ),
            )
        };
        let np = args
            .numpy
            .get(&format!("{m},{k},{n},{}", args.threads))
            .copied();
        let mut row = vec![name.to_string(), format!("{m}×{k}×{n}")];
        row.extend(kiln.iter().map(|g| format!("{g:.1}")));
        row.push(format!("{:.0}%", 100.0 * best / peak));
        row.push(format!("{mm:.1}"));
        row.push(format!("{gc:.1}"));
        row.push(np.map_or("-".into(), |v| format!("{v:.1}")));
        row.push(format!("{:.2}×", best / mm));
        row.push(format!("{:.2}×", best / gc));
        row.push(np.map_or("-".into(), |v| format!("{:.2}×", best / v)));
        if args.markdown {
            println!("| {} |", row.join(" | "));
        } else {
            println!(
                "{}",
                row.iter()
                    .map(|h| format!("{h:>14}"))
                    .collect::<Vec<_>>()
                    .join(sep)
            );
        }
    }
}
