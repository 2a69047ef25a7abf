//! Layer normalisation gives the same bits on every kernel set and thread
//! count: its sums run in a fixed order (no result depends on scheduling).

use kiln_core::{Backend, HostData, Layout, Shape, View};
use kiln_cpu::CpuBackend;

mod common;
use common::every_set_and_thread_count;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed).wrapping_mul(0x9e37_79b9).rotate_left(13);
            (h % 2001) as f32 / 250.0 - 4.0 + 50.0
        })
        .collect()
}

fn run(b: &CpuBackend, rows: usize, cols: usize) -> Vec<Vec<u32>> {
    let x = HostData::F32(data(rows * cols, 1));
    let dy = HostData::F32(data(rows * cols, 2));
    let g = HostData::F32(data(cols, 3));
    let be = HostData::F32(data(cols, 4));
    let lx = Layout::contiguous(Shape::new(&[rows, cols]).unwrap());
    let lc = Layout::contiguous(Shape::new(&[cols]).unwrap());
    let lr = Layout::contiguous(Shape::new(&[rows]).unwrap());
    let out = b
        .layer_norm(
            View::new(&x, &lx),
            View::new(&g, &lc),
            View::new(&be, &lc),
            1e-5,
        )
        .unwrap();
    let grads = b
        .layer_norm_backward(
            View::new(&x, &lx),
            View::new(&g, &lc),
            View::new(&out.mean, &lr),
            View::new(&out.rstd, &lr),
            View::new(&dy, &lx),
        )
        .unwrap();
    [
        out.y,
        out.mean,
        out.rstd,
        grads.dx,
        grads.dgamma,
        grads.dbeta,
    ]
    .iter()
    .map(|h| h.to_f32_vec().iter().map(|v| v.to_bits()).collect())
    .collect()
}

#[test]
fn every_set_and_thread_count_gives_the_same_bits() {
    // 70 rows cross the task size; 200 columns cross the column blocks.
    let (rows, cols) = (70, 200);
    let want = run(&CpuBackend::reference(), rows, cols);
    for b in every_set_and_thread_count() {
        assert!(
            run(&b, rows, cols) == want,
            "{} on {} threads",
            b.name(),
            b.threads()
        );
    }
}
