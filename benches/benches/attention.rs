//! Criterion benchmarks of causal attention, per kernel set (threads from
//! `KILN_THREADS`): the fused op (`Backend::attention_causal`) and its
//! backward pass against the same product composed from the primitive ops
//! the GPT ran before it (a scaled batched GEMM, the causal softmax, a
//! second GEMM), at GPT config A's shape (48 heads of 64 × 32: batch 12 ×
//! 4 heads) and at a longer context (24 heads of 256 × 64); and the copies
//! around it in the GPT's attention layer at config A's shape: the QKV
//! projection's `[n, t, 3, heads, d]` split head-major, and the heads'
//! outputs merged back to `[n, t, heads·d]`.

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_core::{Backend, GemmEpilogue, HostData, Layout, Shape, View};
use kiln_cpu::{CpuBackend, KernelSet};

fn layout(dims: &[usize]) -> Layout {
    Layout::contiguous(Shape::new(dims).expect("shape"))
}

fn values(n: usize, seed: usize) -> HostData {
    HostData::F32(
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 * 0.002 - 1.0)
            .collect(),
    )
}

fn attention(c: &mut Criterion) {
    for set in KernelSet::ALL.into_iter().filter(|k| k.available()) {
        let b = CpuBackend::with_kernels(set).expect("available");
        let mut group = c.benchmark_group(format!("attention/{}", set.name()));
        group.sample_size(10);
        for (heads, t, d) in [(48, 64, 32), (24, 256, 64)] {
            if set == KernelSet::Scalar && t > 64 {
                continue;
            }
            let (l, ls) = (layout(&[heads, t, d]), layout(&[heads, t, t]));
            let up = |seed| b.upload(&values(heads * t * d, seed)).expect("upload");
            let (q, k, v, dy) = (up(1), up(2), up(3), up(4));
            let kt = l.transpose(1, 2).expect("transpose");
            let scale = 1.0 / (d as f32).sqrt();
            let options = kiln_core::AttentionOptions::new(scale);
            let id = format!("{heads}x{t}x{d}");
            // Causal: about half the multiply-adds of the full products.
            group.throughput(Throughput::Elements((heads * t * (t + 1) * d) as u64));
            group.bench_function(BenchmarkId::new("fused", &id), |bench| {
                bench.iter(|| {
                    b.attention_causal(
                        View::new(&q, &l),
                        View::new(&k, &l),
                        View::new(&v, &l),
                        &options,
                    )
                    .expect("attention")
                })
            });
            group.bench_function(BenchmarkId::new("composed", &id), |bench| {
                let ep = GemmEpilogue {
                    alpha: scale,
                    ..GemmEpilogue::default()
                };
                bench.iter(|| {
                    let s = b
                        .gemm(View::new(&q, &l), View::new(&k, &kt), &ep)
                        .expect("scores");
                    let p = b.softmax_causal(View::new(&s, &ls)).expect("softmax");
                    b.gemm(
                        View::new(&p, &ls),
                        View::new(&v, &l),
                        &GemmEpilogue::default(),
                    )
                    .expect("weighted sum")
                })
            });
            group.bench_function(BenchmarkId::new("fused_backward", &id), |bench| {
                bench.iter(|| {
                    b.attention_causal_backward(
                        View::new(&q, &l),
                        View::new(&k, &l),
                        View::new(&v, &l),
                        View::new(&dy, &l),
                        &options,
                    )
                    .expect("gradients")
                })
            });
        }
        group.finish();
    }
}

fn heads(c: &mut Criterion) {
    let (n, t, h, d) = (12, 64, 4, 32);
    for set in KernelSet::ALL.into_iter().filter(|k| k.available()) {
        let b = CpuBackend::with_kernels(set).expect("available");
        let mut group = c.benchmark_group(format!("heads/{}", set.name()));
        group.sample_size(20);
        group.throughput(Throughput::Elements((n * t * 3 * h * d) as u64));
        let qkv = b.upload(&values(n * t * 3 * h * d, 1)).expect("upload");
        let split = layout(&[n, t, 3, h, d])
            .permute(&[2, 3, 0, 1, 4])
            .expect("permute");
        group.bench_function("split", |bench| {
            bench.iter(|| b.contiguous(View::new(&qkv, &split)).expect("split"))
        });
        group.throughput(Throughput::Elements((n * t * h * d) as u64));
        let y = b.upload(&values(h * n * t * d, 2)).expect("upload");
        let merge = layout(&[h, n, t, d])
            .permute(&[1, 2, 0, 3])
            .expect("permute");
        group.bench_function("merge", |bench| {
            bench.iter(|| b.contiguous(View::new(&y, &merge)).expect("merge"))
        });
        group.finish();
    }
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion::criterion_group!(benches, attention, heads);
}
use group::benches;
criterion_main!(benches);
