//! Criterion benchmarks of causal attention, per kernel set (threads from
//! `KILN_THREADS`): the fused op (`Backend::attention_causal`) and its
//! backward pass against the same product composed from the primitive ops
//! the GPT ran before it (a scaled batched GEMM, the causal softmax, a
//! second GEMM), at GPT config A's shape (48 heads of 64 × 32: batch 12 ×
//! 4 heads) and at a longer context (24 heads of 256 × 64); and one
//! attention block of config A, forward and backward, with its heads split
//! and merged by copies against read in place (`block`).

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

/// One attention block of GPT config A (`[12 × 64, 128]` in, 4 heads of
/// 32), forward and backward to the input and the QKV weight: the QKV
/// projection, the attention, a loss of the merged heads — with the heads
/// split head-major and merged back by copies (`copies`, as the GPT did
/// until 2026-12-07) or read and written where the projection puts them
/// (`in_place`, `AttentionOptions::with_heads`).
fn block(c: &mut Criterion) {
    use kiln_core::{Activation, AttentionOptions, Tensor, Var};
    let (n, t, w, h) = (12, 64, 128, 4);
    let d = w / h;
    for set in KernelSet::ALL.into_iter().filter(|k| k.available()) {
        let b = CpuBackend::with_kernels(set).expect("available");
        let mut group = c.benchmark_group(format!("block/{}", set.name()));
        group.sample_size(10);
        let tensor = |dims: &[usize], seed| {
            let HostData::F32(v) = values(dims.iter().product(), seed) else {
                unreachable!("f32 values")
            };
            Tensor::from_slice(&v, dims, &b).expect("tensor")
        };
        let x = Var::from_tensor(&tensor(&[n * t, w], 1)).expect("x");
        let qkv_w = Var::from_tensor(&tensor(&[w, 3 * w], 2)).expect("weight");
        let r = tensor(&[n * t, w], 3);
        let scale = 1.0 / (d as f32).sqrt();
        let step = |in_place: bool| -> kiln_core::Result<()> {
            let qkv = x
                .as_tensor()
                .linear(&qkv_w.as_tensor(), None, Activation::None)?;
            let y = if in_place {
                let qkv = qkv.reshape(&[n, t, 3 * w])?;
                let part = |i: usize| qkv.narrow(2, i * w, w);
                let options = AttentionOptions::new(scale).with_heads(h);
                part(0)?
                    .attention_causal_with(&part(1)?, &part(2)?, &options)?
                    .reshape(&[n * t, w])?
            } else {
                let split = qkv
                    .reshape(&[n, t, 3, h, d])?
                    .permute(&[2, 3, 0, 1, 4])?
                    .contiguous()?
                    .reshape(&[3, h * n, t, d])?;
                let part = |i: usize| split.narrow(0, i, 1)?.reshape(&[h * n, t, d]);
                let options = AttentionOptions::new(scale);
                part(0)?
                    .attention_causal_with(&part(1)?, &part(2)?, &options)?
                    .reshape(&[h, n, t, d])?
                    .permute(&[1, 2, 0, 3])?
                    .contiguous()?
                    .reshape(&[n * t, w])?
            };
            y.mul(&r)?.sum_all()?.backward()?;
            Ok(())
        };
        for (name, in_place) in [("copies", false), ("in_place", true)] {
            group.bench_function(name, |bench| bench.iter(|| step(in_place).expect("block")));
        }
        group.finish();
    }
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion::criterion_group!(benches, attention, block);
}
use group::benches;
criterion_main!(benches);
