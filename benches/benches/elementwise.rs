//! Criterion benchmarks of elementwise kernels per kernel set (1M floats).

use criterion::{criterion_main, Criterion, Throughput};
use kiln_core::{Backend, HostData, Layout, Shape, UnaryOp, View};
use kiln_cpu::{CpuBackend, KernelSet};

fn unary(c: &mut Criterion) {
    let n = 1 << 20;
    let layout = Layout::contiguous(Shape::new(&[n]).expect("1M elements"));
    for set in KernelSet::ALL.into_iter().filter(|k| k.available()) {
        let b = CpuBackend::with_kernels(set)
            .expect("available")
            .with_threads(1);
        let x = b
            .upload(&HostData::F32(
                (0..n).map(|i| (i % 2000) as f32 * 0.05 - 50.0).collect(),
            ))
            .expect("upload");
        let mut group = c.benchmark_group(format!("unary/{}", set.name()));
        group.sample_size(20);
        group.throughput(Throughput::Elements(n as u64));
        for op in [UnaryOp::Exp, UnaryOp::Sigmoid, UnaryOp::Relu] {
            group.bench_function(op.name(), |bench| {
                bench.iter(|| b.unary(op, View::new(&x, &layout)).expect("unary"))
            });
        }
        group.finish();
    }
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion::criterion_group!(benches, unary);
}
criterion_main!(group::benches);
