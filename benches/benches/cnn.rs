//! Criterion benchmarks of the seed CNN's layers at batch 128, per kernel
//! set (threads from `KILN_THREADS`): Conv2D 32 3×3 on 1×28×28 forward and
//! filter gradient, max-pool 2×2 forward and backward, the two fused into
//! one op forward and backward (as the trainer runs them: a first layer,
//! no input gradient), and the 5408→64 dense layer forward and its two
//! gradients.

use criterion::{criterion_main, Criterion, Throughput};
use kiln_core::{Activation, Backend, GemmEpilogue, HostData, Layout, Shape, View, Window2d};
use kiln_cpu::{CpuBackend, KernelSet};

const N: usize = 128;

fn layout(dims: &[usize]) -> Layout {
    Layout::contiguous(Shape::new(dims).expect("shape"))
}

fn values(n: usize) -> HostData {
    HostData::F32(
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.002 - 1.0)
            .collect(),
    )
}

fn cnn(c: &mut Criterion) {
    let conv = Window2d::valid([3, 3], [1, 1]);
    let pool = Window2d::valid([2, 2], [2, 2]);
    let (xl, wl, bl) = (
        layout(&[N, 1, 28, 28]),
        layout(&[32, 1, 3, 3]),
        layout(&[32]),
    );
    let yl = layout(&[N, 32, 26, 26]);
    let pl = layout(&[N, 32, 13, 13]);
    for set in KernelSet::ALL.into_iter().filter(|k| k.available()) {
        let b = CpuBackend::with_kernels(set).expect("available");
        let up = |n: usize| b.upload(&values(n)).expect("upload");
        let (x, w, bias) = (up(N * 784), up(288), up(32));
        let y = up(N * 32 * 26 * 26);
        let dp = up(N * 32 * 13 * 13);
        let flat = up(N * 5408);
        let dense_w = up(5408 * 64);
        let mut group = c.benchmark_group(format!("cnn/{}", set.name()));
        group.sample_size(10);
        group.throughput(Throughput::Elements(N as u64));
        group.bench_function("conv2d_forward", |bench| {
            bench.iter(|| {
                b.conv2d(
                    View::new(&x, &xl),
                    View::new(&w, &wl),
                    Some(View::new(&bias, &bl)),
                    Activation::Relu,
                    &conv,
                )
                .expect("conv")
            })
        });
        group.bench_function("conv2d_backward_filter", |bench| {
            bench.iter(|| {
                b.conv2d_backward_filter(View::new(&x, &xl), View::new(&y, &yl), &conv)
                    .expect("conv")
            })
        });
        let (_, argmax) = b.max_pool2d(View::new(&y, &yl), &pool).expect("pool");
        group.bench_function("max_pool2d_forward", |bench| {
            bench.iter(|| b.max_pool2d(View::new(&y, &yl), &pool).expect("pool"))
        });
        group.bench_function("max_pool2d_backward", |bench| {
            bench.iter(|| {
                b.max_pool2d_backward(
                    View::new(&dp, &pl),
                    View::new(&argmax, &pl),
                    &pool,
                    [26, 26],
                )
                .expect("pool")
            })
        });
        group.bench_function("conv2d_pool_forward", |bench| {
            bench.iter(|| {
                b.conv2d_pool(
                    View::new(&x, &xl),
                    View::new(&w, &wl),
                    Some(View::new(&bias, &bl)),
                    Activation::Relu,
                    &conv,
                    &pool,
                )
                .expect("conv-pool")
            })
        });
        let (pooled, at) = b
            .conv2d_pool(
                View::new(&x, &xl),
                View::new(&w, &wl),
                Some(View::new(&bias, &bl)),
                Activation::Relu,
                &conv,
                &pool,
            )
            .expect("conv-pool");
        group.bench_function("conv2d_pool_backward", |bench| {
            bench.iter(|| {
                b.conv2d_pool_backward(
                    View::new(&x, &xl),
                    View::new(&w, &wl),
                    View::new(&pooled, &pl),
                    View::new(&at, &pl),
                    View::new(&dp, &pl),
                    Activation::Relu,
                    &conv,
                    &pool,
                    false,
                )
                .expect("conv-pool backward")
            })
        });
        let (fl, dl) = (layout(&[1, N, 5408]), layout(&[1, 5408, 64]));
        group.bench_function("dense_5408x64_forward", |bench| {
            bench.iter(|| {
                b.gemm(
                    View::new(&flat, &fl),
                    View::new(&dense_w, &dl),
                    &GemmEpilogue {
                        alpha: 1.0,
                        beta_c: None,
                        bias: None,
                        activation: Activation::Relu,
                    },
                )
                .expect("gemm")
            })
        });
        // Its gradients as autograd asks for them: dW = xᵀ·dy and
        // dx = dy·Wᵀ, the transposes as views.
        let dy = up(N * 64);
        let dyl = layout(&[1, N, 64]);
        let (xt, wt) = (
            fl.transpose(1, 2).expect("transpose"),
            dl.transpose(1, 2).expect("transpose"),
        );
        let plain = GemmEpilogue::default();
        group.bench_function("dense_5408x64_weight_gradient", |bench| {
            bench.iter(|| {
                b.gemm(View::new(&flat, &xt), View::new(&dy, &dyl), &plain)
                    .expect("gemm")
            })
        });
        group.bench_function("dense_5408x64_input_gradient", |bench| {
            bench.iter(|| {
                b.gemm(View::new(&dy, &dyl), View::new(&dense_w, &wt), &plain)
                    .expect("gemm")
            })
        });
        group.finish();
    }
}

// criterion_group! generates an undocumented function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion::criterion_group!(benches, cnn);
}
criterion_main!(group::benches);
