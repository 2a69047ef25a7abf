//! # kiln-bench
//!
//! Measurement helpers shared by the comparison binary and the criterion
//! benches: the machine's peak FMA throughput ([`peak`]), timing by median
//! ([`median_seconds`]), and kiln's GEMM on a given kernel set ([`KilnGemm`]).
//!
//! ```
//! use kiln_bench::median_seconds;
//!
//! // The median of 5 timed runs, after one warm-up.
//! let mut calls = 0;
//! let t = median_seconds(5, || calls += 1);
//! assert_eq!(calls, 6);
//! assert!(t >= 0.0);
//! # Ok::<(), kiln_core::Error>(())
//! ```

pub mod comparators;
pub mod peak;
pub mod roofline;
pub mod suite;

use std::time::Instant;

use kiln_core::{Backend, GemmEpilogue, HostData, Layout, Shape, View};
use kiln_cpu::{CpuBackend, KernelSet};

/// The median wall time of `f` over `reps` runs after one warm-up run.
pub fn median_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Repetitions that make a run of `flops` last about `budget` seconds at
/// `rate` FLOP/s (at least 3, at most 200).
pub fn reps_for(flops: f64, rate: f64, budget: f64) -> usize {
    ((budget * rate / flops) as usize).clamp(3, 200)
}

/// Row-major `m × k` by `k × n` operands uploaded to a kiln CPU backend.
pub struct KilnGemm {
    backend: CpuBackend,
    a: HostData,
    b: HostData,
    la: Layout,
    lb: Layout,
}

impl KilnGemm {
    /// Operands of ones-ish values for `[m, k]·[k, n]` on `set` with `threads`.
    pub fn new(
        set: KernelSet,
        threads: usize,
        m: usize,
        k: usize,
        n: usize,
    ) -> kiln_core::Result<Self> {
        let backend = CpuBackend::with_kernels(set)?.with_threads(threads)?;
        let a = backend.upload(&HostData::F32(
            (0..m * k).map(|i| (i % 7) as f32 * 0.25).collect(),
        ))?;
        let b = backend.upload(&HostData::F32(
            (0..k * n).map(|i| (i % 5) as f32 * 0.5).collect(),
        ))?;
        Ok(KilnGemm {
            backend,
            a,
            b,
            la: Layout::contiguous(Shape::new(&[1, m, k])?),
            lb: Layout::contiguous(Shape::new(&[1, k, n])?),
        })
    }

    /// The same operands in `dtype` (f32, f16 or bf16; rounded once).
    pub fn with_dtype(mut self, dtype: kiln_core::DType) -> kiln_core::Result<Self> {
        self.a = self.backend.cast(View::new(&self.a, &self.la), dtype)?;
        self.b = self.backend.cast(View::new(&self.b, &self.lb), dtype)?;
        Ok(self)
    }

    /// One product (the result is discarded).
    pub fn run(&self) {
        let out = self.backend.gemm(
            View::new(&self.a, &self.la),
            View::new(&self.b, &self.lb),
            &GemmEpilogue::default(),
        );
        std::hint::black_box(out.expect("benchmark operands are valid"));
    }
}
