//! Criterion benchmarks of kiln's GEMM per kernel set: squares and the seed
//! MLP's training shapes at batch 128, one thread.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_bench::KilnGemm;
use kiln_cpu::KernelSet;

fn gemm(c: &mut Criterion) {
    let shapes = [
        (64, 64, 64),
        (256, 256, 256),
        (1024, 1024, 1024),
        (128, 784, 64),
        (784, 128, 64),
        (128, 64, 10),
    ];
    for set in KernelSet::ALL.into_iter().filter(|k| k.available()) {
        let mut group = c.benchmark_group(format!("sgemm/{}", set.name()));
        group.sample_size(10);
        for &(m, k, n) in &shapes {
            if set == KernelSet::Scalar && m * k * n > 1 << 24 {
                continue;
            }
            let g = KilnGemm::new(set, 1, m, k, n).expect("an available kernel set");
            group.throughput(Throughput::Elements((2 * m * k * n) as u64));
            group.bench_with_input(
                BenchmarkId::from_parameter(format!("{m}x{k}x{n}")),
                &(),
                |b, _| b.iter(|| g.run()),
            );
        }
        group.finish();
    }
}

/// bf16 against f32 at the same shapes, one thread: on a CPU with AVX-512
/// BF16 the bf16 product runs `vdpbf16ps` (two multiply-adds per lane and
/// instruction); elsewhere it is widened to f32.
fn bf16_vs_f32(c: &mut Criterion) {
    let set = KernelSet::best();
    let mut group = c.benchmark_group(format!("gemm_dtype/{}", set.name()));
    group.sample_size(10);
    for &(m, k, n) in &[(512, 512, 512), (1024, 1024, 1024)] {
        for dtype in [kiln_core::DType::F32, kiln_core::DType::BF16] {
            let g = KilnGemm::new(set, 1, m, k, n)
                .and_then(|g| g.with_dtype(dtype))
                .expect("an available kernel set");
            group.throughput(Throughput::Elements((2 * m * k * n) as u64));
            group.bench_with_input(
                BenchmarkId::from_parameter(format!("{dtype}/{m}x{k}x{n}")),
                &(),
                |b, _| b.iter(|| g.run()),
            );
        }
    }
    group.finish();
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, gemm, bf16_vs_f32);
}
use group::benches;
criterion_main!(benches);
