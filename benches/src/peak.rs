//! The machine's peak f32 FMA throughput, measured: every thread runs
//! independent chains of fused multiply-adds (enough to cover the FMA
//! latency) on the widest vectors the processor has.

use std::time::Instant;

/// Measured peak in GFLOP/s with `threads` threads, and the vector
/// instruction set used.
pub fn measure(threads: usize) -> (f64, &'static str) {
    let iters = 20_000_000usize;
    let (flops_per_iter, isa) = per_iteration();
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| std::hint::black_box(run(iters)));
        }
    });
    let secs = start.elapsed().as_secs_f64();
    (
        flops_per_iter * iters as f64 * threads.max(1) as f64 / secs / 1e9,
        isa,
    )
}

/// FLOPs per iteration of [`run`] and the instruction set it uses.
fn per_iteration() -> (f64, &'static str) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return (12.0 * 16.0 * 2.0, "avx512f");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return (12.0 * 8.0 * 2.0, "avx2+fma");
        }
    }
    (12.0 * 2.0, "scalar")
}

fn run(iters: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was just detected.
            return unsafe { x86::avx512(iters) };
        }
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: AVX and FMA were just detected.
            return unsafe { x86::avx2(iters) };
        }
    }
    let mut acc = [0.0f32; 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 12 independent chains of 16-wide FMAs.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(iters: usize) -> f32 {
        let (m, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }

    /// 12 independent chains of 8-wide FMAs.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(iters: usize) -> f32 {
        let (m, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_setzero_ps(); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        let mut out = [0f32; 8];
        let mut total = 0.0;
        for v in acc {
            // SAFETY: out holds 8 floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
            total += out.iter().sum::<f32>();
        }
        total
    }
}
