//! # kiln-bench
//!
//! Measurement helpers shared by the comparison binary and the criterion
//! benches: the machine's peak FMA throughput ([`peak`]), timing by median
//! ([`median_seconds`]), and kiln's GEMM on a given kernel set ([`KilnGemm`])
//! for a [`Product`] whose operands may be stored transposed.
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

/// A product `[m, k]·[k, n]` as its operands lie in memory: each
/// row-major, or stored transposed (BLAS's `T` flag) — a weight gradient
/// `Xᵀ·dY` reads its `A` from the activations `X`, `[k, m]` row-major; an
/// input gradient `dY·Wᵀ` its `B` from the weight `W`, `[n, k]`.
///
/// ```
/// use kiln_bench::Product;
///
/// // The seed MLP's first weight gradient, 784 × 64 from a batch of 128.
/// let dw = Product::new(784, 128, 64).transposed(true, false);
/// assert_eq!(dw.to_string(), "784×128×64 Aᵀ");
/// assert_eq!(dw.flags(), "tn");
/// // A's element (i, p) is at i·1 + p·784 in X's storage.
/// assert_eq!(dw.a_strides(), (1, 784));
/// assert_eq!(Product::parse("784,128,64,tn")?, dw);
/// # Ok::<(), String>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Product {
    /// Rows of the result.
    pub m: usize,
    /// The depth summed over.
    pub k: usize,
    /// Columns of the result.
    pub n: usize,
    /// `A` is stored as `[k, m]`, row-major.
    pub a_transposed: bool,
    /// `B` is stored as `[n, k]`, row-major.
    pub b_transposed: bool,
}

impl Product {
    /// `[m, k]·[k, n]`, both row-major.
    pub fn new(m: usize, k: usize, n: usize) -> Self {
        Product {
            m,
            k,
            n,
            a_transposed: false,
            b_transposed: false,
        }
    }

    /// The same product with `A` and/or `B` stored transposed.
    pub fn transposed(self, a: bool, b: bool) -> Self {
        Product {
            a_transposed: a,
            b_transposed: b,
            ..self
        }
    }

    /// `M,K,N` or `M,K,N,FLAGS` (`nn`, `tn`, `nt` or `tt`: BLAS's
    /// transpose flags for A then B); extents positive, their product at
    /// most 2⁴⁰.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        let (dims, flags) = match parts[..] {
            [m, k, n] => ([m, k, n], "nn"),
            [m, k, n, f] => ([m, k, n], f),
            _ => return Err(format!("{text:?} is not M,K,N or M,K,N,FLAGS")),
        };
        let dims: Vec<usize> = dims
            .iter()
            .map(|x| x.parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("{text:?}: M, K and N must be whole numbers"))?;
        let [m, k, n] = dims[..] else {
            unreachable!("three extents")
        };
        if m == 0 || k == 0 || n == 0 || m.saturating_mul(k).saturating_mul(n) > 1 << 40 {
            return Err(format!(
                "{text:?}: the extents must be positive, their product at most 2^40"
            ));
        }
        let (a, b) = match flags {
            "nn" => (false, false),
            "tn" => (true, false),
            "nt" => (false, true),
            "tt" => (true, true),
            other => {
                return Err(format!(
                    "{text:?}: flags {other:?} are not nn, tn, nt or tt (A then B; t: stored transposed)"
                ))
            }
        };
        Ok(Product::new(m, k, n).transposed(a, b))
    }

    /// BLAS's transpose flags, A then B: `nn`, `tn`, `nt` or `tt`.
    pub fn flags(&self) -> &'static str {
        match (self.a_transposed, self.b_transposed) {
            (false, false) => "nn",
            (true, false) => "tn",
            (false, true) => "nt",
            (true, true) => "tt",
        }
    }

    /// Floating-point operations: `2·m·k·n`.
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.k * self.n) as f64
    }

    /// Where `A`'s element `(i, p)` is in its storage: `(row stride,
    /// column stride)`.
    pub fn a_strides(&self) -> (usize, usize) {
        if self.a_transposed {
            (1, self.m)
        } else {
            (self.k, 1)
        }
    }

    /// Where `B`'s element `(p, j)` is in its storage: `(row stride,
    /// column stride)`.
    pub fn b_strides(&self) -> (usize, usize) {
        if self.b_transposed {
            (1, self.k)
        } else {
            (self.n, 1)
        }
    }
}

/// `m×k×n`, then `Aᵀ`, `Bᵀ` or `Aᵀ Bᵀ` for operands stored transposed.
impl std::fmt::Display for Product {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{}×{}", self.m, self.k, self.n)?;
        match (self.a_transposed, self.b_transposed) {
            (false, false) => Ok(()),
            (true, false) => f.write_str(" Aᵀ"),
            (false, true) => f.write_str(" Bᵀ"),
            (true, true) => f.write_str(" Aᵀ Bᵀ"),
        }
    }
}

/// A [`Product`]'s operands uploaded to a kiln CPU backend.
pub struct KilnGemm {
    backend: CpuBackend,
    a: HostData,
    b: HostData,
    la: Layout,
    lb: Layout,
}

impl KilnGemm {
    /// Operands of ones-ish values for `[m, k]·[k, n]`, row-major, on `set`
    /// with `threads`.
    pub fn new(
        set: KernelSet,
        threads: usize,
        m: usize,
        k: usize,
        n: usize,
    ) -> kiln_core::Result<Self> {
        Self::of(set, threads, Product::new(m, k, n))
    }

    /// Operands of ones-ish values for `product`, laid out as it says, on
    /// `set` with `threads`.
    pub fn of(set: KernelSet, threads: usize, product: Product) -> kiln_core::Result<Self> {
        let Product { m, k, n, .. } = product;
        let backend = CpuBackend::with_kernels(set)?.with_threads(threads)?;
        let a = backend.upload(&HostData::F32(
            (0..m * k).map(|i| (i % 7) as f32 * 0.25).collect(),
        ))?;
        let b = backend.upload(&HostData::F32(
            (0..k * n).map(|i| (i % 5) as f32 * 0.5).collect(),
        ))?;
        // `[1, rows, cols]`, or `[1, cols, rows]` seen transposed.
        let layout = |rows, cols, transposed| -> kiln_core::Result<Layout> {
            if transposed {
                Layout::contiguous(Shape::new(&[1, cols, rows])?).transpose(1, 2)
            } else {
                Ok(Layout::contiguous(Shape::new(&[1, rows, cols])?))
            }
        };
        Ok(KilnGemm {
            backend,
            a,
            b,
            la: layout(m, k, product.a_transposed)?,
            lb: layout(k, n, product.b_transposed)?,
        })
    }

    /// The same operands in `dtype` (f32, f16 or bf16; rounded once), laid
    /// out as before.
    pub fn with_dtype(mut self, dtype: kiln_core::DType) -> kiln_core::Result<Self> {
        // Cast each storage whole, in its own order, so that the layouts
        // (transposed or not) still describe it.
        let whole = |s: &HostData| Layout::contiguous(Shape::new(&[s.len()]).expect("1-D"));
        self.a = self
            .backend
            .cast(View::new(&self.a, &whole(&self.a)), dtype)?;
        self.b = self
            .backend
            .cast(View::new(&self.b, &whole(&self.b)), dtype)?;
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
