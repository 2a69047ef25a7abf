//! `kiln-bench-compare`: SGEMM GFLOP/s of kiln (each SIMD kernel set) beside
//! the `matrixmultiply` and `gemm` crates and, when given their numbers,
//! NumPy/OpenBLAS — with the machine's peak measured in the same process.
//!
//! ```text
//! kiln-bench-compare [--threads N] [--quick] [--numpy FILE.json] [--markdown]
//!                    [--shapes M,K,N[,FLAGS][;…]] [--kiln-only] [--dtype f32|bf16|f16]
//! ```
//! `--shapes` replaces the standard shape list; FLAGS (`nn`, the default,
//! `tn`, `nt`, `tt`) say which operands are stored transposed, as BLAS's
//! transpose flags do (a weight gradient is `tn`, an input gradient `nt`:
//! `kiln_bench::Product`). `--kiln-only` skips the
//! comparator libraries (for quick experiments on kiln's kernels).
//! `--dtype` gives kiln's operands in that type (f32 results, as every kiln
//! GEMM accumulates in f32); the comparators and the peak stay f32, so the
//! "% peak" column of a bf16 run can pass 100 % where the processor has
//! AVX-512 BF16 (two multiply-adds per lane per instruction).
//! `--numpy` takes `{"m,k,n,flags,threads": gflops, ...}` as benches/compare.sh
//! writes it. `matrixmultiply` takes its thread count from
//! MATMUL_NUM_THREADS, which this program sets to `--threads` unless it is
//! set already (its column then names its own count where it differs).

use std::collections::HashMap;

use kiln_bench::{comparators, median_seconds, peak, reps_for, KilnGemm, Product};
use kiln_cpu::KernelSet;

struct Args {
    threads: usize,
    quick: bool,
    numpy: HashMap<String, f64>,
    markdown: bool,
    shapes: Option<Vec<Product>>,
    kiln_only: bool,
    dtype: kiln_core::DType,
}

const USAGE: &str = "usage: kiln-bench-compare [--threads N] [--quick] [--numpy FILE.json] [--markdown] [--shapes M,K,N[,FLAGS][;...]] [--kiln-only] [--dtype f32|bf16|f16]";

/// `"256,256,256;784,128,64,tn"` as products ([`Product::parse`]).
fn parse_shapes(text: &str) -> Result<Vec<Product>, String> {
    text.split(';')
        .map(|s| Product::parse(s).map_err(|e| format!("--shapes: {e}")))
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
                    &it.next()
                        .ok_or("--shapes takes M,K,N[,FLAGS][;M,K,N[,FLAGS]...]")?,
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

/// The standard table: squares from 64³ to 4096³, then the products the
/// seed MLP and CNN (batch 128) and GPT config A (12 × 64 positions, 128
/// wide, 4 heads of 32, a 73-character vocabulary) train with, forward and
/// backward, each operand laid out as training has it: a weight gradient
/// `Xᵀ·dY` reads the activations transposed (`Aᵀ`), an input gradient
/// `dY·Wᵀ` the weight (`Bᵀ`), the tied LM head its embedding table.
fn standard_shapes() -> Vec<(&'static str, Product)> {
    let mut v: Vec<(&str, Product)> = [64, 128, 256, 512, 1024, 2048, 4096]
        .iter()
        .map(|&s| ("square", Product::new(s, s, s)))
        .collect();
    let (nn, tn, nt) = ((false, false), (true, false), (false, true));
    v.extend(
        [
            ("mlp fwd 1", 128, 784, 64, nn),
            ("mlp dW1", 784, 128, 64, tn),
            ("mlp fwd 2", 128, 64, 10, nn),
            ("mlp dh", 128, 10, 64, nt),
            ("mlp dW2", 64, 128, 10, tn),
            ("cnn conv (1 image)", 32, 9, 676, nn),
            ("cnn dense fwd", 128, 5408, 64, nn),
            ("cnn dense dW", 5408, 128, 64, tn),
            ("cnn dense dx", 128, 64, 5408, nt),
            ("gpt qkv", 768, 128, 384, nn),
            ("gpt qkv dx", 768, 384, 128, nt),
            ("gpt qkv dW", 128, 768, 384, tn),
            ("gpt mlp up", 768, 128, 512, nn),
            ("gpt mlp down", 768, 512, 128, nn),
            ("gpt mlp up dx", 768, 512, 128, nt),
            ("gpt mlp up dW", 128, 768, 512, tn),
            ("gpt lm head", 768, 128, 73, nt),
            ("gpt lm head dW", 73, 768, 128, tn),
        ]
        .map(|(name, m, k, n, (a, b))| (name, Product::new(m, k, n).transposed(a, b))),
    );
    v
}

/// The key of `p` at `threads` in `--numpy`'s file: `m,k,n,flags,threads`.
fn numpy_key(p: Product, threads: usize) -> String {
    format!("{},{},{},{},{threads}", p.m, p.k, p.n, p.flags())
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
    let shapes: Vec<(&str, Product)> = if let Some(list) = &args.shapes {
        list.iter().map(|&p| ("given", p)).collect()
    } else if args.quick {
        vec![
            ("square", Product::new(64, 64, 64)),
            ("mlp fwd", Product::new(128, 784, 64)),
            (
                "mlp dW1",
                Product::new(784, 128, 64).transposed(true, false),
            ),
        ]
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
        comparators::matrixmultiply_label(args.threads),
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
    for (name, p) in shapes {
        let (m, k, n) = (p.m, p.k, p.n);
        let reps = reps_for(p.flops(), peak * 1e9 * 0.5, budget);
        let kiln: Vec<f64> = sets
            .iter()
            .map(|&s| {
                let g = KilnGemm::of(s, args.threads, p)
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
                gflops(
                    m,
                    k,
                    n,
                    comparators::matrixmultiply(p, args.threads, budget),
                ),
                gflops(m, k, n, comparators::gemm_crate(p, args.threads, budget)),
            )
        };
        let np = args.numpy.get(&numpy_key(p, args.threads)).copied();
        let mut row = vec![name.to_string(), p.to_string()];
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
