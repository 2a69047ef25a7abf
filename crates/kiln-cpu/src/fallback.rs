//! [`Fallback`]: a backend adapter that runs the ops a device does not
//! implement yet on the CPU.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use kiln_core::{
    Activation, AdamStep, Backend, BackendStorage, BinaryOp, Capabilities, ConvGrads, DType,
    Distribution, Error, GemmEpilogue, HostData, Layout, ReduceOp, Result, SgdStep, Shape, UnaryOp,
    View, Window2d,
};

use crate::CpuBackend;

/// A device backend whose unimplemented ops run on the CPU.
///
/// A vendor bringing up a new device writes its memory ops first and its
/// kernels one at a time. Wrapped as `Fallback::new(device)`, the device is
/// usable — by the trainer, the CLI, the conformance suite — from the first
/// day: every compute op is tried on the device, and when the device
/// answers [`Error::Unsupported`] it runs on a [`CpuBackend`] instead:
///
/// 1. each operand view is downloaded with the device's
///    [`Backend::download`] (contiguous, row-major, the view's logical shape),
///    including the optional ones (a bias, a GEMM epilogue's `C₀`);
/// 2. the same op runs on the CPU through contiguous [`Layout`]s of those
///    shapes;
/// 3. each result is moved back with the device's [`Backend::upload_owned`].
///
/// The in-place optimiser steps ([`Backend::sgd_update`],
/// [`Backend::adam_update`]) download every storage they touch, step on the
/// CPU, upload the updated buffers and only then replace the device's
/// storages, so a failed transfer leaves them as they were. A device that
/// declines one of these must not have modified its operands.
///
/// Any other error from the device — a shape mismatch, an invalid argument,
/// a lost device — is returned unchanged: it is never masked by a retry on
/// the CPU.
///
/// # What the device must implement
///
/// The transfers themselves need [`Backend::full`], [`Backend::upload`],
/// [`Backend::upload_owned`] (the default, through `upload`, is fine),
/// [`Backend::download`], [`Backend::copy_strided`] and
/// [`Backend::synchronize`]; these are forwarded to the device only and
/// never fall back. Everything else — [`Backend::cast`] and every compute
/// op, the fused [`Backend::conv2d_pool`] and
/// [`Backend::conv2d_pool_backward`] included — may be left
/// [`Error::Unsupported`].
///
/// # Seeing what fell back
///
/// [`Fallback::fallbacks`] lists, per op (the [`Backend`] method's name),
/// how many calls the device declined and the CPU ran; the count is shared
/// by all clones of the adapter. Each fallback costs a round trip through
/// host memory, so the list doubles as the device's kernel to-do list.
///
/// The result of an op that fell back is the CPU's: within the op's
/// conformance bounds, as the device's own kernel will be, but not
/// necessarily bitwise equal to it. The fused convolution ops fall back as
/// a whole, even when the device implements some of their parts, so their
/// results stay bitwise one backend's composition (the trait's promise).
///
/// The adapter's storage is the device's own (`Storage = D::Storage`), so
/// tensors never notice which ops fell back.
///
/// # Example
///
/// ```
/// use kiln_core::{Backend, DType};
/// use kiln_cpu::{CpuBackend, Fallback};
///
/// // Any backend goes in; kiln's example vendor crate
/// // (examples/vendor-backend) wraps a device without f16 convolutions.
/// let backend = Fallback::new(CpuBackend::reference());
/// let x = backend.full(4, DType::F32, 2.0)?;
/// # let _ = x;
/// for (op, calls) in backend.fallbacks() {
///     eprintln!("{op}: {calls} calls ran on the CPU");
/// }
/// assert!(backend.fallbacks().is_empty()); // the CPU declines nothing
/// # Ok::<(), kiln_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Fallback<D> {
    device: D,
    cpu: CpuBackend,
    counts: Arc<Mutex<BTreeMap<&'static str, u64>>>,
}

/// An operand brought to the host: its elements, row-major, and the
/// contiguous layout of its logical shape.
struct Staged {
    data: HostData,
    layout: Layout,
}

impl Staged {
    /// The operand as the CPU backend reads it.
    fn view(&self) -> View<'_, HostData> {
        View::new(&self.data, &self.layout)
    }
}

impl<D: Backend> Fallback<D> {
    /// Wraps `device`, falling back on the scalar reference CPU backend
    /// ([`CpuBackend::reference`]): deterministic, and the twin of the
    /// conformance suite's oracle, but slow.
    pub fn new(device: D) -> Self {
        Self::with_cpu(device, CpuBackend::reference())
    }

    /// Wraps `device`, falling back on `cpu` — e.g. `CpuBackend::new()?` for
    /// the fastest kernel set this processor offers.
    pub fn with_cpu(device: D, cpu: CpuBackend) -> Self {
        Fallback {
            device,
            cpu,
            counts: Arc::default(),
        }
    }

    /// The wrapped device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The CPU backend the declined ops run on.
    pub fn cpu(&self) -> &CpuBackend {
        &self.cpu
    }

    /// For every op that has fallen back at least once, its name (the
    /// [`Backend`] method's, e.g. `"gemm"`, `"adam_update"`) and how many
    /// calls the device declined and the CPU ran, sorted by name.
    ///
    /// Shared by all clones of this adapter; a call counts even if the CPU
    /// then rejects it too (the CPU's error is returned).
    pub fn fallbacks(&self) -> Vec<(&'static str, u64)> {
        self.lock_counts().iter().map(|(&op, &n)| (op, n)).collect()
    }

    /// Sets every fallback count back to zero (for all clones).
    pub fn reset_fallbacks(&self) {
        self.lock_counts().clear();
    }

    fn lock_counts(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, u64>> {
        // A panic elsewhere cannot leave a count half-written.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The device's answer, unless it declined the op: then `on_cpu`'s.
    fn or_cpu<T>(
        &self,
        op: &'static str,
        on_device: Result<T>,
        on_cpu: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        match on_device {
            Err(Error::Unsupported { .. }) => {
                *self.lock_counts().entry(op).or_insert(0) += 1;
                on_cpu()
            }
            answer => answer,
        }
    }

    /// Downloads `src` from the device as a contiguous host operand of the
    /// same logical shape.
    fn stage(&self, src: View<'_, D::Storage>) -> Result<Staged> {
        let data = self.device.download(src)?;
        let numel = src.layout.numel();
        if data.len() != numel {
            return Err(Error::Backend(format!(
                "{}: downloading a {} view returned {} elements, expected {numel}",
                self.device.name(),
                src.layout.shape(),
                data.len()
            )));
        }
        Ok(Staged {
            data,
            layout: Layout::contiguous(src.layout.shape().clone()),
        })
    }

    /// [`Self::stage`] for an optional operand.
    fn stage_opt(&self, src: Option<View<'_, D::Storage>>) -> Result<Option<Staged>> {
        src.map(|v| self.stage(v)).transpose()
    }

    /// Downloads the whole of a (contiguous) storage, as the in-place ops
    /// read it.
    fn stage_all(&self, storage: &D::Storage) -> Result<Staged> {
        let layout = Layout::contiguous(Shape::new(&[storage.len()])?);
        self.stage(View::new(storage, &layout))
    }

    /// Moves a CPU result to the device.
    fn put(&self, data: HostData) -> Result<D::Storage> {
        self.device.upload_owned(data)
    }

    /// Moves a pair of CPU results to the device.
    fn put2(&self, (a, b): (HostData, HostData)) -> Result<(D::Storage, D::Storage)> {
        Ok((self.put(a)?, self.put(b)?))
    }
}

impl<D: Backend> Backend for Fallback<D> {
    type Storage = D::Storage;

    fn name(&self) -> String {
        format!("{}+cpu-fallback", self.device.name())
    }

    // ----- memory: the device's own -------------------------------------

    fn full(&self, numel: usize, dtype: DType, value: f64) -> Result<D::Storage> {
        self.device.full(numel, dtype, value)
    }

    fn upload(&self, data: &HostData) -> Result<D::Storage> {
        self.device.upload(data)
    }

    fn upload_owned(&self, data: HostData) -> Result<D::Storage> {
        self.device.upload_owned(data)
    }

    fn download(&self, src: View<'_, D::Storage>) -> Result<HostData> {
        self.device.download(src)
    }

    fn copy_strided(
        &self,
        src: View<'_, D::Storage>,
        dst: &mut D::Storage,
        dst_layout: &Layout,
    ) -> Result<()> {
        self.device.copy_strided(src, dst, dst_layout)
    }

    fn contiguous(&self, src: View<'_, D::Storage>) -> Result<D::Storage> {
        self.device.contiguous(src)
    }

    fn synchronize(&self) -> Result<()> {
        self.device.synchronize()
    }

    // ----- everything else may fall back --------------------------------

    fn cast(&self, src: View<'_, D::Storage>, dtype: DType) -> Result<D::Storage> {
        self.or_cpu("cast", self.device.cast(src, dtype), || {
            let src = self.stage(src)?;
            self.put(self.cpu.cast(src.view(), dtype)?)
        })
    }

    fn gemm(
        &self,
        a: View<'_, D::Storage>,
        b: View<'_, D::Storage>,
        epilogue: &GemmEpilogue<'_, D::Storage>,
    ) -> Result<D::Storage> {
        self.or_cpu("gemm", self.device.gemm(a, b, epilogue), || {
            let (a, b) = (self.stage(a)?, self.stage(b)?);
            let c0 = epilogue
                .beta_c
                .map(|(beta, c)| Ok::<_, Error>((beta, self.stage(c)?)))
                .transpose()?;
            let bias = self.stage_opt(epilogue.bias)?;
            let host = GemmEpilogue {
                alpha: epilogue.alpha,
                beta_c: c0.as_ref().map(|(beta, c)| (*beta, c.view())),
                bias: bias.as_ref().map(Staged::view),
                activation: epilogue.activation,
            };
            self.put(self.cpu.gemm(a.view(), b.view(), &host)?)
        })
    }

    fn unary(&self, op: UnaryOp, x: View<'_, D::Storage>) -> Result<D::Storage> {
        self.or_cpu("unary", self.device.unary(op, x), || {
            let x = self.stage(x)?;
            self.put(self.cpu.unary(op, x.view())?)
        })
    }

    fn unary_backward(
        &self,
        op: UnaryOp,
        x: View<'_, D::Storage>,
        y: View<'_, D::Storage>,
        dy: View<'_, D::Storage>,
    ) -> Result<D::Storage> {
        self.or_cpu(
            "unary_backward",
            self.device.unary_backward(op, x, y, dy),
            || {
                let (x, y, dy) = (self.stage(x)?, self.stage(y)?, self.stage(dy)?);
                self.put(self.cpu.unary_backward(op, x.view(), y.view(), dy.view())?)
            },
        )
    }

    fn affine(&self, x: View<'_, D::Storage>, mul: f32, add: f32) -> Result<D::Storage> {
        self.or_cpu("affine", self.device.affine(x, mul, add), || {
            let x = self.stage(x)?;
            self.put(self.cpu.affine(x.view(), mul, add)?)
        })
    }

    fn binary(
        &self,
        op: BinaryOp,
        a: View<'_, D::Storage>,
        b: View<'_, D::Storage>,
    ) -> Result<D::Storage> {
        self.or_cpu("binary", self.device.binary(op, a, b), || {
            let (a, b) = (self.stage(a)?, self.stage(b)?);
            self.put(self.cpu.binary(op, a.view(), b.view())?)
        })
    }

    fn reduce(&self, op: ReduceOp, x: View<'_, D::Storage>, axes: &[usize]) -> Result<D::Storage> {
        self.or_cpu("reduce", self.device.reduce(op, x, axes), || {
            let x = self.stage(x)?;
            self.put(self.cpu.reduce(op, x.view(), axes)?)
        })
    }

    fn argmax(&self, x: View<'_, D::Storage>) -> Result<D::Storage> {
        self.or_cpu("argmax", self.device.argmax(x), || {
            let x = self.stage(x)?;
            self.put(self.cpu.argmax(x.view())?)
        })
    }

    fn softmax(&self, x: View<'_, D::Storage>, log: bool) -> Result<D::Storage> {
        self.or_cpu("softmax", self.device.softmax(x, log), || {
            let x = self.stage(x)?;
            self.put(self.cpu.softmax(x.view(), log)?)
        })
    }

    fn softmax_cross_entropy(
        &self,
        logits: View<'_, D::Storage>,
        labels: View<'_, D::Storage>,
    ) -> Result<(D::Storage, D::Storage)> {
        self.or_cpu(
            "softmax_cross_entropy",
            self.device.softmax_cross_entropy(logits, labels),
            || {
                let (logits, labels) = (self.stage(logits)?, self.stage(labels)?);
                self.put2(
                    self.cpu
                        .softmax_cross_entropy(logits.view(), labels.view())?,
                )
            },
        )
    }

    fn softmax_causal(&self, x: View<'_, D::Storage>) -> Result<D::Storage> {
        self.or_cpu("softmax_causal", self.device.softmax_causal(x), || {
            let x = self.stage(x)?;
            self.put(self.cpu.softmax_causal(x.view())?)
        })
    }

    fn layer_norm(
        &self,
        x: View<'_, D::Storage>,
        gamma: View<'_, D::Storage>,
        beta: View<'_, D::Storage>,
        eps: f32,
    ) -> Result<kiln_core::LayerNormOut<D::Storage>> {
        self.or_cpu(
            "layer_norm",
            self.device.layer_norm(x, gamma, beta, eps),
            || {
                let (x, g, b) = (self.stage(x)?, self.stage(gamma)?, self.stage(beta)?);
                let out = self.cpu.layer_norm(x.view(), g.view(), b.view(), eps)?;
                Ok(kiln_core::LayerNormOut {
                    y: self.put(out.y)?,
                    mean: self.put(out.mean)?,
                    rstd: self.put(out.rstd)?,
                })
            },
        )
    }

    fn layer_norm_backward(
        &self,
        x: View<'_, D::Storage>,
        gamma: View<'_, D::Storage>,
        mean: View<'_, D::Storage>,
        rstd: View<'_, D::Storage>,
        dy: View<'_, D::Storage>,
    ) -> Result<kiln_core::LayerNormGrads<D::Storage>> {
        self.or_cpu(
            "layer_norm_backward",
            self.device.layer_norm_backward(x, gamma, mean, rstd, dy),
            || {
                let (x, g) = (self.stage(x)?, self.stage(gamma)?);
                let (m, r, d) = (self.stage(mean)?, self.stage(rstd)?, self.stage(dy)?);
                let grads = self.cpu.layer_norm_backward(
                    x.view(),
                    g.view(),
                    m.view(),
                    r.view(),
                    d.view(),
                )?;
                Ok(kiln_core::LayerNormGrads {
                    dx: self.put(grads.dx)?,
                    dgamma: self.put(grads.dgamma)?,
                    dbeta: self.put(grads.dbeta)?,
                })
            },
        )
    }

    fn embedding(
        &self,
        table: View<'_, D::Storage>,
        ids: View<'_, D::Storage>,
    ) -> Result<D::Storage> {
        self.or_cpu("embedding", self.device.embedding(table, ids), || {
            let (t, i) = (self.stage(table)?, self.stage(ids)?);
            self.put(self.cpu.embedding(t.view(), i.view())?)
        })
    }

    fn embedding_backward(
        &self,
        ids: View<'_, D::Storage>,
        dy: View<'_, D::Storage>,
        vocab: usize,
    ) -> Result<D::Storage> {
        self.or_cpu(
            "embedding_backward",
            self.device.embedding_backward(ids, dy, vocab),
            || {
                let (i, d) = (self.stage(ids)?, self.stage(dy)?);
                self.put(self.cpu.embedding_backward(i.view(), d.view(), vocab)?)
            },
        )
    }

    fn conv2d(
        &self,
        x: View<'_, D::Storage>,
        weight: View<'_, D::Storage>,
        bias: Option<View<'_, D::Storage>>,
        activation: Activation,
        window: &Window2d,
    ) -> Result<D::Storage> {
        self.or_cpu(
            "conv2d",
            self.device.conv2d(x, weight, bias, activation, window),
            || {
                let (x, weight, bias) =
                    (self.stage(x)?, self.stage(weight)?, self.stage_opt(bias)?);
                self.put(self.cpu.conv2d(
                    x.view(),
                    weight.view(),
                    bias.as_ref().map(Staged::view),
                    activation,
                    window,
                )?)
            },
        )
    }

    fn conv2d_backward_data(
        &self,
        dy: View<'_, D::Storage>,
        weight: View<'_, D::Storage>,
        window: &Window2d,
        input: [usize; 2],
    ) -> Result<D::Storage> {
        self.or_cpu(
            "conv2d_backward_data",
            self.device.conv2d_backward_data(dy, weight, window, input),
            || {
                let (dy, weight) = (self.stage(dy)?, self.stage(weight)?);
                self.put(
                    self.cpu
                        .conv2d_backward_data(dy.view(), weight.view(), window, input)?,
                )
            },
        )
    }

    fn conv2d_backward_filter(
        &self,
        x: View<'_, D::Storage>,
        dy: View<'_, D::Storage>,
        window: &Window2d,
    ) -> Result<(D::Storage, D::Storage)> {
        self.or_cpu(
            "conv2d_backward_filter",
            self.device.conv2d_backward_filter(x, dy, window),
            || {
                let (x, dy) = (self.stage(x)?, self.stage(dy)?);
                self.put2(
                    self.cpu
                        .conv2d_backward_filter(x.view(), dy.view(), window)?,
                )
            },
        )
    }

    fn max_pool2d(
        &self,
        x: View<'_, D::Storage>,
        window: &Window2d,
    ) -> Result<(D::Storage, D::Storage)> {
        self.or_cpu("max_pool2d", self.device.max_pool2d(x, window), || {
            let x = self.stage(x)?;
            self.put2(self.cpu.max_pool2d(x.view(), window)?)
        })
    }

    fn max_pool2d_backward(
        &self,
        dy: View<'_, D::Storage>,
        argmax: View<'_, D::Storage>,
        window: &Window2d,
        input: [usize; 2],
    ) -> Result<D::Storage> {
        self.or_cpu(
            "max_pool2d_backward",
            self.device.max_pool2d_backward(dy, argmax, window, input),
            || {
                let (dy, argmax) = (self.stage(dy)?, self.stage(argmax)?);
                self.put(
                    self.cpu
                        .max_pool2d_backward(dy.view(), argmax.view(), window, input)?,
                )
            },
        )
    }

    /// The device's `conv2d_pool` (its own fused kernel, or the trait's
    /// composition of its `conv2d` and `max_pool2d`); if it declines, the
    /// whole fused op runs on the CPU.
    fn conv2d_pool(
        &self,
        x: View<'_, D::Storage>,
        weight: View<'_, D::Storage>,
        bias: Option<View<'_, D::Storage>>,
        activation: Activation,
        conv: &Window2d,
        pool: &Window2d,
    ) -> Result<(D::Storage, D::Storage)> {
        self.or_cpu(
            "conv2d_pool",
            self.device
                .conv2d_pool(x, weight, bias, activation, conv, pool),
            || {
                let (x, weight, bias) =
                    (self.stage(x)?, self.stage(weight)?, self.stage_opt(bias)?);
                self.put2(self.cpu.conv2d_pool(
                    x.view(),
                    weight.view(),
                    bias.as_ref().map(Staged::view),
                    activation,
                    conv,
                    pool,
                )?)
            },
        )
    }

    /// The device's `conv2d_pool_backward` (fused, or the trait's
    /// composition of its unfused backward ops); if it declines, the whole
    /// op runs on the CPU.
    fn conv2d_pool_backward(
        &self,
        x: View<'_, D::Storage>,
        weight: View<'_, D::Storage>,
        pooled: View<'_, D::Storage>,
        argmax: View<'_, D::Storage>,
        dpooled: View<'_, D::Storage>,
        activation: Activation,
        conv: &Window2d,
        pool: &Window2d,
        need_dx: bool,
    ) -> Result<ConvGrads<D::Storage>> {
        self.or_cpu(
            "conv2d_pool_backward",
            self.device.conv2d_pool_backward(
                x, weight, pooled, argmax, dpooled, activation, conv, pool, need_dx,
            ),
            || {
                let (x, weight) = (self.stage(x)?, self.stage(weight)?);
                let (pooled, argmax) = (self.stage(pooled)?, self.stage(argmax)?);
                let dpooled = self.stage(dpooled)?;
                let (dx, dw, db) = self.cpu.conv2d_pool_backward(
                    x.view(),
                    weight.view(),
                    pooled.view(),
                    argmax.view(),
                    dpooled.view(),
                    activation,
                    conv,
                    pool,
                    need_dx,
                )?;
                let dx = dx.map(|dx| self.put(dx)).transpose()?;
                Ok((dx, self.put(dw)?, self.put(db)?))
            },
        )
    }

    fn sgd_update(
        &self,
        param: &mut D::Storage,
        grad: &D::Storage,
        mut velocity: Option<&mut D::Storage>,
        step: &SgdStep,
    ) -> Result<()> {
        self.or_cpu(
            "sgd_update",
            self.device
                .sgd_update(param, grad, velocity.as_deref_mut(), step),
            || {
                let mut p = self.stage_all(param)?.data;
                let g = self.stage_all(grad)?.data;
                let mut vel = velocity
                    .as_deref()
                    .map(|v| self.stage_all(v).map(|s| s.data))
                    .transpose()?;
                self.cpu.sgd_update(&mut p, &g, vel.as_mut(), step)?;
                // Upload everything before replacing anything.
                let p = self.put(p)?;
                let vel = vel.map(|v| self.put(v)).transpose()?;
                *param = p;
                if let (Some(dst), Some(v)) = (velocity, vel) {
                    *dst = v;
                }
                Ok(())
            },
        )
    }

    fn adam_update(
        &self,
        param: &mut D::Storage,
        grad: &D::Storage,
        m: &mut D::Storage,
        v: &mut D::Storage,
        step: &AdamStep,
    ) -> Result<()> {
        self.or_cpu(
            "adam_update",
            self.device.adam_update(param, grad, m, v, step),
            || {
                let mut hp = self.stage_all(param)?.data;
                let hg = self.stage_all(grad)?.data;
                let mut hm = self.stage_all(m)?.data;
                let mut hv = self.stage_all(v)?.data;
                self.cpu.adam_update(&mut hp, &hg, &mut hm, &mut hv, step)?;
                // Upload everything before replacing anything.
                let (hp, hm, hv) = (self.put(hp)?, self.put(hm)?, self.put(hv)?);
                (*param, *m, *v) = (hp, hm, hv);
                Ok(())
            },
        )
    }

    fn random(
        &self,
        dist: Distribution,
        numel: usize,
        dtype: DType,
        seed: u64,
        offset: u64,
    ) -> Result<D::Storage> {
        self.or_cpu(
            "random",
            self.device.random(dist, numel, dtype, seed, offset),
            || self.put(self.cpu.random(dist, numel, dtype, seed, offset)?),
        )
    }

    /// The device's declaration adjusted for the fallback: what the device
    /// declines runs on the CPU, so only the CPU's unsupported checks stay
    /// unsupported; the expected failures are both backends'; and the
    /// switch points are both backends' (sorted, without repeats), since an
    /// op may run on either.
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.device.capabilities();
        let cpu = self.cpu.capabilities();
        caps.switch_points.merge(&cpu.switch_points);
        caps.unsupported = cpu.unsupported;
        caps.expected_failures.extend(cpu.expected_failures);
        caps.expected_failures.sort();
        caps.expected_failures.dedup();
        caps
    }

    /// The device's own slow paths, each op the device declined (reason
    /// `ran on the CPU (the device declined it)`), and the CPU backend's
    /// own slow paths on those.
    fn slow_paths(&self) -> Vec<kiln_core::slow_path::SlowPath> {
        let mut all = self.device.slow_paths();
        all.extend(self.fallbacks().into_iter().map(|(op, calls)| {
            kiln_core::slow_path::SlowPath {
                op: op.into(),
                reason: "ran on the CPU (the device declined it)".into(),
                calls,
            }
        }));
        all.extend(self.cpu.slow_paths());
        all.sort();
        all
    }
}
