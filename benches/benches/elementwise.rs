//! Criterion benchmarks of the non-GEMM kernels per kernel set, one thread:
//! unary maps, a binary op (same shape and a broadcast row), a column sum
//! (bias gradients), the fused softmax cross-entropy and the f16/bf16
//! conversions, on 1M floats.

use criterion::{criterion_main, Criterion, Throughput};
use kiln_core::{Backend, BinaryOp, DType, HostData, Layout, ReduceOp, Shape, UnaryOp, View};
use kiln_cpu::{CpuBackend, KernelSet};

const ROWS: usize = 1024;
const COLS: usize = 1024;

fn backends() -> impl Iterator<Item = (KernelSet, CpuBackend)> {
    KernelSet::ALL
        .into_iter()
        .filter(|k| k.available())
        .map(|set| {
            let b = CpuBackend::with_kernels(set)
                .expect("available")
                .with_threads(1)
                .expect("one worker thread");
            (set, b)
        })
}

fn values(n: usize) -> HostData {
    HostData::F32((0..n).map(|i| (i % 2000) as f32 * 0.05 - 50.0).collect())
}

fn unary(c: &mut Criterion) {
    let n = ROWS * COLS;
    let layout = Layout::contiguous(Shape::new(&[n]).expect("1M elements"));
    for (set, b) in backends() {
        let x = b.upload(&values(n)).expect("upload");
        let mut group = c.benchmark_group(format!("unary/{}", set.name()));
        group.sample_size(20);
        group.throughput(Throughput::Elements(n as u64));
        for op in [
            UnaryOp::Exp,
            UnaryOp::Log,
            UnaryOp::Tanh,
            UnaryOp::Sigmoid,
            UnaryOp::Relu,
        ] {
            group.bench_function(op.name(), |bench| {
                bench.iter(|| b.unary(op, View::new(&x, &layout)).expect("unary"))
            });
        }
        group.finish();
    }
}

fn others(c: &mut Criterion) {
    let n = ROWS * COLS;
    let matrix = Layout::contiguous(Shape::new(&[ROWS, COLS]).expect("shape"));
    let row = Layout::contiguous(Shape::new(&[COLS]).expect("shape"))
        .broadcast_as(&Shape::new(&[ROWS, COLS]).expect("shape"))
        .expect("broadcast");
    let labels_layout = Layout::contiguous(Shape::new(&[ROWS]).expect("shape"));
    for (set, b) in backends() {
        let x = b.upload(&values(n)).expect("upload");
        let y = b.upload(&values(n)).expect("upload");
        let bias = b.upload(&values(COLS)).expect("upload");
        let labels = b
            .upload(&HostData::U32((0..ROWS as u32).map(|i| i % 1000).collect()))
            .expect("upload");
        let mut group = c.benchmark_group(format!("ops/{}", set.name()));
        group.sample_size(20);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function("add", |bench| {
            bench.iter(|| {
                b.binary(
                    BinaryOp::Add,
                    View::new(&x, &matrix),
                    View::new(&y, &matrix),
                )
                .expect("add")
            })
        });
        group.bench_function("add_row", |bench| {
            bench.iter(|| {
                b.binary(
                    BinaryOp::Add,
                    View::new(&x, &matrix),
                    View::new(&bias, &row),
                )
                .expect("add")
            })
        });
        group.bench_function("sum_rows", |bench| {
            bench.iter(|| {
                b.reduce(ReduceOp::Sum, View::new(&x, &matrix), &[0])
                    .expect("sum")
            })
        });
        group.bench_function("softmax_cross_entropy", |bench| {
            bench.iter(|| {
                b.softmax_cross_entropy(View::new(&x, &matrix), View::new(&labels, &labels_layout))
                    .expect("sce")
            })
        });
        group.finish();
    }
}

fn casts(c: &mut Criterion) {
    let n = ROWS * COLS;
    let layout = Layout::contiguous(Shape::new(&[n]).expect("1M elements"));
    for (set, b) in backends() {
        let x = b.upload(&values(n)).expect("upload");
        let half = b.cast(View::new(&x, &layout), DType::F16).expect("cast");
        let brain = b.cast(View::new(&x, &layout), DType::BF16).expect("cast");
        let mut group = c.benchmark_group(format!("cast/{}", set.name()));
        group.sample_size(20);
        group.throughput(Throughput::Elements(n as u64));
        for (name, src, to) in [
            ("f32_to_f16", &x, DType::F16),
            ("f16_to_f32", &half, DType::F32),
            ("f32_to_bf16", &x, DType::BF16),
            ("bf16_to_f32", &brain, DType::F32),
        ] {
            group.bench_function(name, |bench| {
                bench.iter(|| b.cast(View::new(src, &layout), to).expect("cast"))
            });
        }
        group.finish();
    }
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion::criterion_group!(benches, unary, others, casts);
}
criterion_main!(group::benches);
