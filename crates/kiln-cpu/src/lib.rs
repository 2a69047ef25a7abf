//! # kiln-cpu
//!
//! The CPU backend. Its storage is host memory ([`kiln_core::HostData`]);
//! its kernels come in *kernel sets*, chosen once per backend:
//!
//! - [`KernelSet::Scalar`], the reference: plain loops, obviously correct,
//!   deterministic (every sum runs in a fixed order), and the twin of the
//!   conformance suite's oracle;
//! - SIMD sets — [`KernelSet::Avx2`] (AVX2+FMA), [`KernelSet::Avx512`],
//!   [`KernelSet::Neon`] — chosen at run time from what the processor
//!   offers ([`features`]); `KILN_CPU=scalar|avx2|avx512|neon` forces one.
//!   They run the packed, blocked GEMM with one register-blocked
//!   micro-kernel per ISA (`gemm/`), hand-written vector transcendentals
//!   (`vector/{avx512,avx2,neon}.rs`) and the reference loops for exactly
//!   rounded ops compiled with the set's features (`vector/wide.rs`), on
//!   contiguous f32 operands; anything else (strided views, f16/bf16) goes
//!   to the reference kernels. Their fused ops — convolution with its
//!   max-pool (`conv/`), layer norm (`norm.rs`), causal attention
//!   (`attention.rs`) — widen other operands to f32 themselves.
//!
//! Work is split over `KILN_THREADS` threads (default: all cores) by output
//! rows, so results never depend on the thread count or on scheduling.
//!
//! ```
//! use kiln_core::{Backend, Tensor};
//! use kiln_cpu::CpuBackend;
//!
//! // The best kernel set this processor runs; threads from KILN_THREADS, else every core.
//! let b = CpuBackend::new()?;
//! let a = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0], &[2, 2], &b)?;
//! assert_eq!(a.matmul(&a)?.to_vec_f32()?, [7.0, 10.0, 15.0, 22.0]);
//! // The scalar reference set, on one thread, gives the same numbers here.
//! let r = CpuBackend::configured(Some("scalar"), 1)?;
//! let a = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0], &[2, 2], &r)?;
//! assert_eq!(a.matmul(&a)?.to_vec_f32()?, [7.0, 10.0, 15.0, 22.0]);
//! assert_eq!(r.name(), "cpu:scalar");
//! # Ok::<(), kiln_core::Error>(())
//! ```

mod attention;
mod conv;
mod embedding;
mod fallback;
pub mod features;
mod fresh;
mod gemm;
mod norm;
mod pool;
mod reference;
mod scratch;
mod slow_path;
mod storage;
mod threads;
mod vector;
mod workers;

use std::sync::Arc;

use kiln_core::slow_path::SlowPaths;
use kiln_core::{
    Activation, AdamStep, Backend, BinaryOp, DType, Distribution, Error, GemmEpilogue, HostData,
    Layout, ReduceOp, Result, SgdStep, UnaryOp, View, Window2d,
};
use workers::Workers;

/// Parameters per task, about, of an optimiser update spread over the
/// workers (a CNN's 346k-weight dense layer: twelve equal tasks on two
/// threads, [`Workers::balanced_chunk`]).
const OPTIMISER_PER_TASK: usize = 1 << 15;

pub use fallback::Fallback;
pub use features::KernelSet;
pub use threads::{check as check_threads, max_threads};

/// The CPU backend: a kernel set, a thread count, a persistent pool of
/// that many worker threads for the SIMD sets, and the count of calls that
/// fell to the scalar loops (the pool and the count shared by clones).
#[derive(Clone, Debug)]
pub struct CpuBackend {
    kernels: KernelSet,
    threads: usize,
    /// The SIMD sets' workers; `None` for the scalar reference, whose
    /// row-parallel loops start scoped threads of their own.
    pool: Option<Arc<Workers>>,
    slow: SlowPaths,
}

impl CpuBackend {
    /// The backend the environment asks for: kernel set from `KILN_CPU`
    /// (default: the best this processor supports), threads from
    /// `KILN_THREADS` (default: all cores).
    pub fn new() -> Result<Self> {
        Self::build(KernelSet::from_env()?, threads::from_env()?)
    }

    /// The backend with a given kernel set, or an error if this processor
    /// or build lacks it.
    pub fn with_kernels(kernels: KernelSet) -> Result<Self> {
        kernels.check_available()?;
        Self::build(kernels, threads::from_env()?)
    }

    /// The backend a host program asks for by name, as the C ABI and the
    /// Python package do: `kernels` `None` or `"auto"` for
    /// [`CpuBackend::new`]'s choice, else a kernel set's name (`scalar`,
    /// `avx2`, `avx512`, `neon`: an error if this processor lacks it);
    /// `threads` 0 for `KILN_THREADS` or every core.
    ///
    /// ```
    /// use kiln_core::Backend;
    /// use kiln_cpu::CpuBackend;
    ///
    /// let b = CpuBackend::configured(Some("scalar"), 1)?;
    /// assert_eq!((b.name(), b.threads()), ("cpu:scalar".to_string(), 1));
    /// assert!(CpuBackend::configured(Some("sse9"), 0).is_err());
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn configured(kernels: Option<&str>, threads: usize) -> Result<Self> {
        let kernels = match kernels.map(str::trim) {
            None | Some("auto") => KernelSet::from_env()?,
            Some(name) => {
                let set = KernelSet::parse(name)?;
                set.check_available()?;
                set
            }
        };
        let threads = match threads {
            0 => threads::from_env()?,
            n => n,
        };
        Self::build(kernels, threads)
    }

    /// The scalar reference backend (threads from `KILN_THREADS`, else 1 if
    /// that is malformed). It starts no worker pool, so it cannot fail.
    pub fn reference() -> Self {
        CpuBackend {
            kernels: KernelSet::Scalar,
            threads: threads::from_env().unwrap_or(1),
            pool: None,
            slow: SlowPaths::new("cpu:scalar"),
        }
    }

    fn build(kernels: KernelSet, threads: usize) -> Result<Self> {
        kiln_core::slow_path::check_log_env()?;
        gemm::blocking::check_env()?;
        #[cfg(target_arch = "x86_64")]
        gemm::amx::check_env()?;
        Ok(CpuBackend {
            kernels,
            threads,
            pool: Self::pool_for(kernels, threads)?,
            slow: SlowPaths::new(&format!("cpu:{}", kernels.name())),
        })
    }

    fn pool_for(kernels: KernelSet, threads: usize) -> Result<Option<Arc<Workers>>> {
        match kernels {
            KernelSet::Scalar => Ok(None),
            _ => Workers::new(threads).map(|w| Some(Arc::new(w))),
        }
    }

    /// The same backend with `threads` worker threads (at least 1), or the
    /// error the operating system gave for starting them.
    pub fn with_threads(self, threads: usize) -> Result<Self> {
        let threads = threads.max(1);
        Ok(CpuBackend {
            threads,
            pool: Self::pool_for(self.kernels, threads)?,
            ..self
        })
    }

    /// The kernel set in use.
    pub fn kernels(&self) -> KernelSet {
        self.kernels
    }

    /// The number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The SIMD kernel set and its worker pool, or `None` for the scalar
    /// reference.
    fn simd(&self) -> Option<(KernelSet, &Workers)> {
        self.pool.as_deref().map(|p| (self.kernels, p))
    }

    /// `result` of an op `op` the SIMD set declined and the reference
    /// loops ran: counted as a slow path (when it succeeded) with the
    /// reason `operands` give.
    fn scalar<T>(
        &self,
        op: &'static str,
        operands: &[View<'_, HostData>],
        result: Result<T>,
    ) -> Result<T> {
        let empty = operands.iter().all(|v| v.layout.numel() == 0);
        if result.is_ok() && self.pool.is_some() && !empty {
            self.slow.record(op, slow_path::reason(operands));
        }
        result
    }
}

impl Backend for CpuBackend {
    type Storage = HostData;

    fn name(&self) -> String {
        format!("cpu:{}", self.kernels.name())
    }

    /// kiln's default switch points with this machine's GEMM blocking for
    /// the backend's kernel set added: `KC`, `MC` and `NC` are derived
    /// from the caches at start-up (an AVX-512 Zen 4 takes k blocks of
    /// 512, and row blocks of 200 where k is short), so the suite aims at
    /// the boundaries the products here actually cross. They differ from
    /// machine to machine: `KILN_GEMM_BLOCKING` pins them, for a
    /// conformance failure to be rerun elsewhere.
    fn capabilities(&self) -> kiln_core::Capabilities {
        let mut caps = kiln_core::Capabilities::default();
        caps.switch_points.merge(&gemm::switch_points(self.kernels));
        caps
    }

    fn full(&self, numel: usize, dtype: DType, value: f64) -> Result<HostData> {
        match self.simd() {
            // A large f32 buffer (a slice's gradient placed in zeros) is
            // filled by the team, each part by the thread that will likely
            // write over it next.
            Some((_, pool)) if dtype == DType::F32 && numel >= storage::FULL_PARALLEL_MIN => {
                let v = value as f32;
                // SAFETY: `filled_with` writes every element of its chunk.
                let data = unsafe {
                    pool.filled(numel, storage::FULL_PARALLEL_MIN / 2, |_, part| {
                        fresh::filled_with(part, v);
                    })
                };
                Ok(HostData::F32(data))
            }
            _ => Ok(storage::full(numel, dtype, value)),
        }
    }

    fn upload(&self, data: &HostData) -> Result<HostData> {
        Ok(data.clone())
    }

    fn upload_owned(&self, data: HostData) -> Result<HostData> {
        Ok(data)
    }

    fn download(&self, src: View<'_, HostData>) -> Result<HostData> {
        storage::gather(src)
    }

    fn copy_strided(
        &self,
        src: View<'_, HostData>,
        dst: &mut HostData,
        dst_layout: &Layout,
    ) -> Result<()> {
        storage::copy_strided(src, dst, dst_layout)
    }

    fn contiguous(&self, src: View<'_, HostData>) -> Result<HostData> {
        match self.simd() {
            Some((_, workers)) => storage::gather_on(workers, src),
            None => storage::gather(src),
        }
    }

    fn cast(&self, src: View<'_, HostData>, dtype: DType) -> Result<HostData> {
        if let Some((set, pool)) = self.simd() {
            if let Some(out) = vector::ops::cast(set, pool, src, dtype) {
                return Ok(out);
            }
        }
        self.scalar("cast", &[src], storage::cast(src, dtype))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn gemm(
        &self,
        a: View<'_, HostData>,
        b: View<'_, HostData>,
        epilogue: &GemmEpilogue<'_, HostData>,
    ) -> Result<HostData> {
        match self.kernels {
            KernelSet::Scalar => reference::gemm::gemm(a, b, epilogue, self.threads),
            simd => match &self.pool {
                Some(pool) => gemm::gemm(simd, a, b, epilogue, pool),
                None => reference::gemm::gemm(a, b, epilogue, self.threads),
            },
        }
    }

    fn unary(&self, op: UnaryOp, x: View<'_, HostData>) -> Result<HostData> {
        if let Some(out) = self
            .simd()
            .and_then(|(set, w)| vector::ops::unary(set, w, op, x))
        {
            return Ok(out);
        }
        self.scalar("unary", &[x], reference::elementwise::unary(op, x))
    }

    fn unary_backward(
        &self,
        op: UnaryOp,
        x: View<'_, HostData>,
        y: View<'_, HostData>,
        dy: View<'_, HostData>,
    ) -> Result<HostData> {
        if let Some(out) = self
            .simd()
            .and_then(|(set, w)| vector::ops::unary_backward(set, w, op, x, y, dy))
        {
            return Ok(out);
        }
        let out = reference::elementwise::unary_backward(op, x, y, dy);
        self.scalar("unary_backward", &[x, y, dy], out)
    }

    fn affine(&self, x: View<'_, HostData>, mul: f32, add: f32) -> Result<HostData> {
        if let Some(out) = self
            .simd()
            .and_then(|(set, w)| vector::ops::affine(set, w, x, mul, add))
        {
            return Ok(out);
        }
        self.scalar("affine", &[x], reference::elementwise::affine(x, mul, add))
    }

    fn binary(
        &self,
        op: BinaryOp,
        a: View<'_, HostData>,
        b: View<'_, HostData>,
    ) -> Result<HostData> {
        if let Some(out) = self
            .simd()
            .and_then(|(set, w)| vector::ops::binary(set, w, op, a, b))
        {
            return Ok(out);
        }
        self.scalar("binary", &[a, b], reference::elementwise::binary(op, a, b))
    }

    fn reduce(&self, op: ReduceOp, x: View<'_, HostData>, axes: &[usize]) -> Result<HostData> {
        if let Some(out) = self
            .simd()
            .and_then(|(set, _)| vector::ops::reduce(set, op, x, axes))
        {
            return Ok(out);
        }
        let out = reference::reduce::reduce(op, x, axes);
        if out.is_ok() && self.pool.is_some() && x.layout.numel() > 0 {
            self.slow
                .record("reduce", slow_path::reduce_reason(op, x, axes));
        }
        out
    }

    fn argmax(&self, x: View<'_, HostData>) -> Result<HostData> {
        reference::reduce::argmax(x)
    }

    fn softmax(&self, x: View<'_, HostData>, log: bool) -> Result<HostData> {
        if let Some(out) = self
            .simd()
            .and_then(|(set, _)| vector::ops::softmax(set, x, log))
        {
            return Ok(out);
        }
        self.scalar("softmax", &[x], reference::softmax::softmax(x, log))
    }

    fn softmax_causal(&self, x: View<'_, HostData>) -> Result<HostData> {
        if let Some(out) = self
            .simd()
            .and_then(|(set, pool)| vector::ops::softmax_causal(set, pool, x))
        {
            return Ok(out);
        }
        let out = reference::softmax::softmax_causal(x);
        self.scalar("softmax_causal", &[x], out)
    }

    fn attention_causal(
        &self,
        q: View<'_, HostData>,
        k: View<'_, HostData>,
        v: View<'_, HostData>,
        options: &kiln_core::AttentionOptions,
    ) -> Result<HostData> {
        match self.simd() {
            Some((set, pool)) => attention::attention_causal(set, pool, q, k, v, options),
            None => reference::attention::attention_causal(q, k, v, options),
        }
    }

    fn attention_causal_backward(
        &self,
        q: View<'_, HostData>,
        k: View<'_, HostData>,
        v: View<'_, HostData>,
        dy: View<'_, HostData>,
        options: &kiln_core::AttentionOptions,
    ) -> Result<kiln_core::AttentionGrads<HostData>> {
        match self.simd() {
            Some((set, pool)) => {
                attention::attention_causal_backward(set, pool, q, k, v, dy, options)
            }
            None => reference::attention::attention_causal_backward(q, k, v, dy, options),
        }
    }

    fn softmax_cross_entropy(
        &self,
        logits: View<'_, HostData>,
        labels: View<'_, HostData>,
    ) -> Result<(HostData, HostData)> {
        if let Some((set, _)) = self.simd() {
            let y = reference::softmax::checked_labels(logits, labels)?;
            if let Some(out) = vector::ops::softmax_cross_entropy(set, logits, &y) {
                return Ok(out);
            }
        }
        let out = reference::softmax::softmax_cross_entropy(logits, labels);
        self.scalar("softmax_cross_entropy", &[logits], out)
    }

    fn embedding(&self, table: View<'_, HostData>, ids: View<'_, HostData>) -> Result<HostData> {
        embedding::embedding(table, ids)
    }

    fn embedding_backward(
        &self,
        ids: View<'_, HostData>,
        dy: View<'_, HostData>,
        vocab: usize,
    ) -> Result<HostData> {
        embedding::embedding_backward(self.pool.as_deref(), ids, dy, vocab)
    }

    fn layer_norm(
        &self,
        x: View<'_, HostData>,
        gamma: View<'_, HostData>,
        beta: View<'_, HostData>,
        eps: f32,
    ) -> Result<kiln_core::LayerNormOut<HostData>> {
        norm::layer_norm(self.kernels, self.pool.as_deref(), x, gamma, beta, eps)
    }

    fn layer_norm_backward(
        &self,
        x: View<'_, HostData>,
        gamma: View<'_, HostData>,
        mean: View<'_, HostData>,
        rstd: View<'_, HostData>,
        dy: View<'_, HostData>,
    ) -> Result<kiln_core::LayerNormGrads<HostData>> {
        let pool = self.pool.as_deref();
        norm::layer_norm_backward(self.kernels, pool, x, gamma, mean, rstd, dy)
    }

    fn conv2d(
        &self,
        x: View<'_, HostData>,
        weight: View<'_, HostData>,
        bias: Option<View<'_, HostData>>,
        activation: Activation,
        window: &Window2d,
    ) -> Result<HostData> {
        match self.simd() {
            Some((set, workers)) => conv::conv2d(set, workers, x, weight, bias, activation, window),
            None => reference::conv::conv2d(x, weight, bias, activation, window),
        }
    }

    fn conv2d_backward_data(
        &self,
        dy: View<'_, HostData>,
        weight: View<'_, HostData>,
        window: &Window2d,
        input: [usize; 2],
    ) -> Result<HostData> {
        match self.simd() {
            Some((set, workers)) => {
                conv::conv2d_backward_data(set, workers, dy, weight, window, input)
            }
            None => reference::conv::conv2d_backward_data(dy, weight, window, input),
        }
    }

    fn conv2d_backward_filter(
        &self,
        x: View<'_, HostData>,
        dy: View<'_, HostData>,
        window: &Window2d,
    ) -> Result<(HostData, HostData)> {
        match self.simd() {
            Some((set, workers)) => conv::conv2d_backward_filter(set, workers, x, dy, window),
            None => reference::conv::conv2d_backward_filter(x, dy, window),
        }
    }

    fn conv2d_pool(
        &self,
        x: View<'_, HostData>,
        weight: View<'_, HostData>,
        bias: Option<View<'_, HostData>>,
        activation: Activation,
        conv: &Window2d,
        pool: &Window2d,
    ) -> Result<(HostData, HostData)> {
        match self.simd() {
            Some((set, workers)) => {
                conv::conv2d_pool(set, workers, x, weight, bias, activation, conv, pool)
            }
            // The reference composes the two reference ops.
            None => kiln_core::backend::compose_conv2d_pool(
                self, x, weight, bias, activation, conv, pool,
            ),
        }
    }

    fn conv2d_pool_backward(
        &self,
        x: View<'_, HostData>,
        weight: View<'_, HostData>,
        pooled: View<'_, HostData>,
        argmax: View<'_, HostData>,
        dpooled: View<'_, HostData>,
        activation: Activation,
        conv: &Window2d,
        pool: &Window2d,
        need_dx: bool,
    ) -> Result<kiln_core::ConvGrads<HostData>> {
        match self.simd() {
            Some((set, workers)) => conv::conv2d_pool_backward(
                set, workers, x, weight, pooled, argmax, dpooled, activation, conv, pool, need_dx,
            ),
            None => kiln_core::backend::compose_conv2d_pool_backward(
                self, x, weight, pooled, argmax, dpooled, activation, conv, pool, need_dx,
            ),
        }
    }

    fn max_pool2d(&self, x: View<'_, HostData>, window: &Window2d) -> Result<(HostData, HostData)> {
        match self.simd() {
            Some((set, workers)) => pool::max_pool2d(set, workers, x, window),
            None => reference::conv::max_pool2d(x, window),
        }
    }

    fn max_pool2d_backward(
        &self,
        dy: View<'_, HostData>,
        argmax: View<'_, HostData>,
        window: &Window2d,
        input: [usize; 2],
    ) -> Result<HostData> {
        match self.simd() {
            Some((set, workers)) => {
                pool::max_pool2d_backward(set, workers, dy, argmax, window, input)
            }
            None => reference::conv::max_pool2d_backward(dy, argmax, window, input),
        }
    }

    fn sgd_update(
        &self,
        param: &mut HostData,
        grad: &HostData,
        velocity: Option<&mut HostData>,
        step: &SgdStep,
    ) -> Result<()> {
        vector::wide::sgd(self.kernels, param, grad, velocity, step)
    }

    fn adam_update(
        &self,
        param: &mut HostData,
        grad: &HostData,
        m: &mut HostData,
        v: &mut HostData,
        step: &AdamStep,
    ) -> Result<()> {
        let (p, g, m, v, k) = reference::optim::adam_operands(param, grad, m, v, step)?;
        match self
            .simd()
            .filter(|(_, w)| w.threads() > 1 && p.len() > OPTIMISER_PER_TASK)
        {
            // Each element is updated on its own: any split gives the same bits.
            Some((set, workers)) => {
                let c = workers.balanced_chunk(p.len(), OPTIMISER_PER_TASK, 16);
                let jobs = p
                    .chunks_mut(c)
                    .zip(g.chunks(c))
                    .zip(m.chunks_mut(c))
                    .zip(v.chunks_mut(c));
                workers.for_each(jobs.collect(), |(((p, g), m), v)| {
                    vector::wide::adam(set, p, g, m, v, &k)
                });
            }
            None => vector::wide::adam(self.kernels, p, g, m, v, &k),
        }
        Ok(())
    }

    fn slow_paths(&self) -> Vec<kiln_core::slow_path::SlowPath> {
        self.slow.snapshot()
    }

    fn lend_idle_threads(&self, work: std::sync::Weak<dyn kiln_core::IdleWork>) -> bool {
        self.pool.as_ref().is_some_and(|p| p.lend(work))
    }

    fn random(
        &self,
        dist: Distribution,
        numel: usize,
        dtype: DType,
        seed: u64,
        offset: u64,
    ) -> Result<HostData> {
        match self.simd() {
            Some((set, pool)) => {
                vector::random::random(set, pool, dist, numel, dtype, seed, offset)
            }
            None => reference::random::random(dist, numel, dtype, seed, offset),
        }
    }
}

/// The error for an op given an operand of a dtype it does not accept.
pub(crate) fn unsupported(op: &'static str, dtype: DType) -> Error {
    Error::Unsupported {
        op,
        dtype,
        backend: "cpu".into(),
    }
}
