//! `kiln-gpu-bench`: kiln's CUDA kernels against cuBLAS on the same GPU, in
//! one process — SGEMM (f32 SIMT), TF32, BF16 and F16 tensor-core GEMMs at
//! `--size`³ — plus the CNN's convolution and softmax-cross-entropy step
//! times and GPT config B's attention (fused against composed). Each of kiln's results is checked against cuBLAS's; a result
//! that is not (no cuBLAS on the machine) is marked UNCHECKED and fails the
//! run, so a kernel is never faster-but-unchecked.
//!
//!     kiln-gpu-bench [--size 4096] [--reps 20] [--json FILE]

use std::time::Instant;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use kiln_core::{
    Activation, Backend, DType, Distribution, GemmEpilogue, Layout, Result, Shape, View, Window2d,
};
use kiln_cuda::{CudaBackend, CudaStorage};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median wall time of `reps` runs of `f` (each followed by a stream sync), in ms.
fn time(b: &CudaBackend, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    b.synchronize()?;
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        b.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

fn view(s: &CudaStorage, dims: &[usize]) -> (CudaStorage, Layout) {
    (
        s.clone(),
        Layout::contiguous(Shape::new(dims).expect("valid dims")),
    )
}

/// Largest |x − y| over max |y|, from the host copies.
fn rel_err(x: &[f32], y: &[f32]) -> f64 {
    let scale = y
        .iter()
        .fold(0f64, |m, &v| m.max(f64::from(v).abs()))
        .max(1e-30);
    x.iter().zip(y).fold(0f64, |m, (&a, &b)| {
        m.max((f64::from(a) - f64::from(b)).abs())
    }) / scale
}

struct Row {
    name: &'static str,
    ours_ms: f64,
    cublas_ms: f64,
    err: f64,
    tol: f64,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let size = arg(&args, "--size", 4096);
    let reps = arg(&args, "--reps", 20).max(1);
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let base = CudaBackend::new(0)?;
    println!("{}", base.info());
    // SAFETY: only tries to dlopen libcublas; cudarc would panic on first
    // use without it.
    let blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Some(
            CudaBlas::new(base.stream().expect("a driver backend").clone())
                .map_err(|e| kiln_core::Error::Backend(format!("cuBLAS: {e:?}")))?,
        )
    } else {
        println!(
            "cuBLAS not found (libcublas.so, .so.12): kiln's GEMMs are timed but UNCHECKED, and the run fails"
        );
        None
    };
    let (m, n, k) = (size, size, size);
    let flops = 2.0 * (m * n * k) as f64;
    let mut rows = Vec::new();
    for (name, dtype, tf32) in [
        ("sgemm (f32 SIMT)", DType::F32, false),
        ("tf32 tensor cores", DType::F32, true),
        ("bf16 tensor cores", DType::BF16, false),
        ("f16 tensor cores", DType::F16, false),
    ] {
        let b = base.clone().with_tf32(tf32);
        let dist = Distribution::Uniform {
            low: -1.0,
            high: 1.0,
        };
        let a = b.random(dist, m * k, dtype, 1, 0)?;
        let bm = b.random(dist, k * n, dtype, 2, 0)?;
        let (sa, la) = view(&a, &[1, m, k]);
        let (sb, lb) = view(&bm, &[1, k, n]);
        let ep = GemmEpilogue::default();
        let ours = b.gemm(View::new(&sa, &la), View::new(&sb, &lb), &ep)?;
        let ours_ms = time(&b, reps, || {
            b.gemm(View::new(&sa, &la), View::new(&sb, &lb), &ep)
                .map(drop)
        })?;
        // cuBLAS, column-major: Cᵀ = Bᵀ·Aᵀ is row-major C = A·B.
        let c = b.full(m * n, DType::F32, 0.0)?;
        let (in_type, compute) = match (dtype, tf32) {
            (DType::BF16, _) => (
                cudaDataType::CUDA_R_16BF,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            (DType::F16, _) => (
                cudaDataType::CUDA_R_16F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            (_, true) => (
                cudaDataType::CUDA_R_32F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            ),
            _ => (
                cudaDataType::CUDA_R_32F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
        };
        let (alpha, beta) = (1f32, 0f32);
        let cublas = |blas: &CudaBlas| -> Result<()> {
            // SAFETY: a (m×k), b (k×n) and c (m×n) are live device buffers of
            // the types named, on the handle's stream.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    cublasOperation_t::CUBLAS_OP_N,
                    cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    m as i32,
                    k as i32,
                    (&alpha as *const f32).cast(),
                    bm.device_ptr() as *const _,
                    in_type,
                    n as i32,
                    a.device_ptr() as *const _,
                    in_type,
                    k as i32,
                    (&beta as *const f32).cast(),
                    c.device_ptr() as *mut _,
                    cudaDataType::CUDA_R_32F,
                    n as i32,
                    compute,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| kiln_core::Error::Backend(format!("cublasGemmEx: {e:?}")))
        };
        let (cublas_ms, err) = match &blas {
            Some(blas) => {
                cublas(blas)?;
                let (so, lo) = view(&ours, &[m * n]);
                let (sc, lc) = view(&c, &[m * n]);
                let got = b.download(View::new(&so, &lo))?.to_f32_vec();
                let want = b.download(View::new(&sc, &lc))?.to_f32_vec();
                (time(&b, reps, || cublas(blas))?, rel_err(&got, &want))
            }
            None => (f64::NAN, f64::NAN),
        };
        // f32: both sum 4096 products in f32, in different orders; tf32 and
        // bf16: 10- and 8-bit inputs, and kiln's bf16 output is rounded.
        let tol = match (dtype, tf32) {
            (DType::BF16, _) => 1e-2,
            (DType::F16, _) => 2e-3,
            (_, true) => 5e-3,
            _ => 1e-4,
        };
        rows.push(Row {
            name,
            ours_ms,
            cublas_ms,
            err,
            tol,
        });
    }
    println!(
        "\n{:<20} {:>9} {:>10} {:>10} {:>10} {:>9} {:>10}  check",
        format!("GEMM {size}³"),
        "kiln ms",
        "TFLOP/s",
        "cuBLAS ms",
        "TFLOP/s",
        "% cuBLAS",
        "max err"
    );
    let mut failed = false;
    for r in &rows {
        // NaN (no cuBLAS to check against) is not ok.
        let ok = r.err <= r.tol;
        failed |= !ok;
        println!(
            "{:<20} {:>9.3} {:>10.1} {:>10.3} {:>10.1} {:>8.1}% {:>10.2e}  {}",
            r.name,
            r.ours_ms,
            flops / r.ours_ms / 1e9,
            r.cublas_ms,
            flops / r.cublas_ms / 1e9,
            100.0 * r.cublas_ms / r.ours_ms,
            r.err,
            if ok {
                "ok"
            } else if r.err.is_nan() {
                "UNCHECKED"
            } else {
                "FAILED"
            }
        );
    }

    // The CNN's hot ops at batch 128 (no comparator in-process: cuDNN is
    // not linked; PyTorch's epoch time in ci/gpu.sh is the yardstick).
    let b = base.with_tf32(false);
    let dist = Distribution::Uniform {
        low: 0.0,
        high: 1.0,
    };
    let x = b.random(dist, 128 * 28 * 28, DType::F32, 3, 0)?;
    let w = b.random(dist, 32 * 9, DType::F32, 4, 0)?;
    let (sx, lx) = view(&x, &[128, 1, 28, 28]);
    let (sw, lw) = view(&w, &[32, 1, 3, 3]);
    let win = Window2d::valid([3, 3], [1, 1]);
    let conv_ms = time(&b, reps, || {
        b.conv2d(
            View::new(&sx, &lx),
            View::new(&sw, &lw),
            None,
            Activation::Relu,
            &win,
        )
        .map(drop)
    })?;
    let y = b.conv2d(
        View::new(&sx, &lx),
        View::new(&sw, &lw),
        None,
        Activation::None,
        &win,
    )?;
    let (sy, ly) = view(&y, &[128, 32, 26, 26]);
    let filt_ms = time(&b, reps, || {
        b.conv2d_backward_filter(View::new(&sx, &lx), View::new(&sy, &ly), &win)
            .map(drop)
    })?;
    let logits = b.random(dist, 128 * 10, DType::F32, 5, 0)?;
    let labels = b.upload(&kiln_core::HostData::U32(
        (0..128).map(|i| i % 10).collect(),
    ))?;
    let (sl, ll) = view(&logits, &[128, 10]);
    let (sy2, ly2) = view(&labels, &[128]);
    let sce_ms = time(&b, reps, || {
        b.softmax_cross_entropy(View::new(&sl, &ll), View::new(&sy2, &ly2))
            .map(drop)
    })?;
    println!("\nCNN ops, batch 128 (kiln, median of {reps}):");
    println!("  conv2d 1→32 3×3 + ReLU      {conv_ms:8.3} ms");
    println!("  conv2d filter gradient      {filt_ms:8.3} ms");
    println!("  softmax-CE 128×10           {sce_ms:8.3} ms (includes the label check's download)");
    // GPT config B's attention (batch 64 × 6 heads of 256 positions × 64):
    // the fused kernels against the same product composed from GEMMs and
    // the causal softmax (the trait's default), checked against each other.
    let (heads, t, d) = (64 * 6, 256, 64);
    let operand = |seed| b.random(dist, heads * t * d, DType::F32, seed, 0);
    let (q, k, v) = (operand(6)?, operand(7)?, operand(8)?);
    let la = Layout::contiguous(Shape::new(&[heads, t, d])?);
    let (vq, vk, vv) = (View::new(&q, &la), View::new(&k, &la), View::new(&v, &la));
    let plain = kiln_core::AttentionOptions::new(1.0 / (d as f32).sqrt());
    // Config B trains with dropout 0.2 on the probabilities.
    let training = plain.with_dropout(kiln_core::AttentionDropout::new(0.2, 9, 0)?);
    println!(
        "
GPT config B attention, 384 heads of 256 × 64 (kiln, median of {reps}):"
    );
    for (what, options) in [("no dropout", plain), ("dropout 0.2", training)] {
        let compose = || kiln_core::attention::compose_attention_causal(&b, vq, vk, vv, &options);
        let fused_ms = time(&b, reps, || {
            b.attention_causal(vq, vk, vv, &options).map(drop)
        })?;
        let composed_ms = time(&b, reps, || compose().map(drop))?;
        let backward_ms = time(&b, reps, || {
            b.attention_causal_backward(vq, vk, vv, vq, &options)
                .map(drop)
        })?;
        let fused = b.download(View::new(&b.attention_causal(vq, vk, vv, &options)?, &la))?;
        let composed = b.download(View::new(&compose()?, &la))?;
        let attention_err = rel_err(&fused.to_f32_vec(), &composed.to_f32_vec());
        println!("  {what}:");
        println!("    fused forward             {fused_ms:8.3} ms");
        println!("    composed (GEMM, softmax)  {composed_ms:8.3} ms");
        println!("    fused backward            {backward_ms:8.3} ms");
        println!("    fused against composed: max relative difference {attention_err:.2e}");
        if attention_err > 1e-4 {
            failed = true;
        }
    }
    // The layout the GPT's layer hands the op: q, k and v thirds of one
    // [64, 256, 3·384] projection, 6 heads side by side in each row, read
    // in place; checked against the same problems with their heads first
    // copied into the batch (the same arithmetic: the same bits).
    let (n, h) = (64, 6);
    let w = h * d;
    let qkv = b.random(dist, n * t * 3 * w, DType::F32, 10, 0)?;
    let fused_layout = Layout::contiguous(Shape::new(&[n, t, 3 * w])?);
    let third = |i| fused_layout.narrow(2, i * w, w);
    let (lq, lk, lv) = (third(0)?, third(1)?, third(2)?);
    let (hq, hk, hv) = (
        View::new(&qkv, &lq),
        View::new(&qkv, &lk),
        View::new(&qkv, &lv),
    );
    let dy = b.random(dist, n * t * w, DType::F32, 11, 0)?;
    let lm = Layout::contiguous(Shape::new(&[n, t, w])?);
    let hdy = View::new(&dy, &lm);
    let options = training.with_heads(h);
    let in_place_ms = time(&b, reps, || {
        b.attention_causal(hq, hk, hv, &options).map(drop)
    })?;
    let in_place_backward_ms = time(&b, reps, || {
        b.attention_causal_backward(hq, hk, hv, hdy, &options)
            .map(drop)
    })?;
    let folded = || {
        kiln_core::attention::attention_heads_folded(&b, [hq, hk, hv], &options, |x, o| {
            let [q, k, v] = x;
            b.attention_causal(q, k, v, o)
        })
    };
    let folded_ms = time(&b, reps, || folded().map(drop))?;
    let in_place = b.download(View::new(&b.attention_causal(hq, hk, hv, &options)?, &lm))?;
    let by_copies = b.download(View::new(&folded()?, &lm))?;
    let same = in_place
        .to_f32_vec()
        .iter()
        .map(|x| x.to_bits())
        .eq(by_copies.to_f32_vec().iter().map(|x| x.to_bits()));
    println!("  6 heads side by side in a [64, 256, 1152] projection, dropout 0.2:");
    println!("    forward, read in place    {in_place_ms:8.3} ms");
    println!("    forward, heads by copies  {folded_ms:8.3} ms");
    println!("    backward, read in place   {in_place_backward_ms:8.3} ms");
    println!(
        "    in place against by copies: {}",
        if same { "the same bits" } else { "DIFFERENT" }
    );
    failed |= !same;
    let mem = b.memory_stats();
    println!(
        "allocator: {} device allocations, {} reuses",
        mem.device_allocs, mem.reuses
    );
    if let Some(path) = json {
        let body = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"kernel\":\"{}\",\"size\":{size},\"kiln_ms\":{:.4},\"cublas_ms\":{:.4},\"max_rel_err\":{:.3e}}}",
                    r.name, r.ours_ms, r.cublas_ms, r.err
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        std::fs::write(&path, format!("[{body}]\n"))
            .map_err(|e| kiln_core::Error::io(format!("writing {path}"), e))?;
    }
    if failed {
        return Err(kiln_core::Error::Backend(
            "a kiln GEMM disagrees with cuBLAS beyond its tolerance, or could not be checked, or the fused attention disagrees with the composed one (see above)".into(),
        ));
    }
    Ok(())
}
