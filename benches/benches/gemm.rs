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

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, gemm);
}
use group::benches;
criterion_main!(benches);
