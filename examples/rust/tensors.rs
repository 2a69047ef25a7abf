//! Tensors and ops on a chosen backend: `cargo run -p kiln-examples
//! --example tensors [-- KERNELS]`, where KERNELS is `scalar`, `avx2`,
//! `avx512` or `neon` (default: the best this processor runs).

use kiln_core::{Backend, Result, Tensor};
use kiln_cpu::{features::KernelSet, CpuBackend};

fn main() -> Result<()> {
    // A backend: the kernel set asked for (an error if this processor
    // lacks it), or the best one; threads from KILN_THREADS or all cores.
    let backend = match std::env::args().nth(1) {
        Some(name) => CpuBackend::with_kernels(KernelSet::parse(&name)?)?,
        None => CpuBackend::new()?,
    };
    println!(
        "backend: {} with {} threads",
        backend.name(),
        backend.threads()
    );

    // Tensors live on a backend; `from_slice` copies host floats in.
    let a = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], &backend)?;
    let b = Tensor::from_slice(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2], &backend)?;

    // Matrix product, elementwise ops with broadcasting, reductions.
    let c = a.matmul(&b)?;
    assert_eq!(c.dims(), [2, 2]);
    assert_eq!(c.to_vec_f32()?, [4.0, 5.0, 10.0, 11.0]);
    let row = Tensor::from_slice(&[10.0, 20.0], &[2], &backend)?;
    let shifted = c.add(&row)?; // [2, 2] + [2]: the row is added to each row
    assert_eq!(shifted.to_vec_f32()?, [14.0, 25.0, 20.0, 31.0]);
    let total = shifted.sum_all()?.to_scalar_f32()?;
    assert_eq!(total, 90.0);

    // Views: a transpose is a view with swapped strides, no copy.
    let t = a.transpose(0, 1)?;
    assert_eq!(t.dims(), [3, 2]);
    assert_eq!(t.to_vec_f32()?, [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);

    // Softmax along the last axis: each row sums to 1.
    let p = a.softmax()?.to_vec_f32()?;
    for row in p.chunks(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    println!(
        "a·b = {:?}; softmax(a) row 0 = {:?}",
        c.to_vec_f32()?,
        &p[..3]
    );

    // Shape mismatches are errors that say what is wrong, never panics.
    let err = a.matmul(&a).unwrap_err();
    println!("a·a: {err}");
    Ok(())
}
