//! # An example vendor backend
//!
//! [`PretendDevice`] is what a hardware vendor's first `Backend` looks
//! like: device memory of its own type ([`DeviceBuffer`]), ops that run on
//! "the device" (here, kiln's CPU reference kernels stand in for it), a
//! declaration of where its kernels switch path and what it does not do
//! yet ([`kiln_core::Capabilities`]), and a switch that plants realistic
//! faults ([`Fault`], or `PRETEND_FAULT` in the environment) so the
//! conformance suite can be seen catching them.
//!
//! It declares f16 convolutions unsupported (they return
//! `Error::Unsupported`); wrapped in [`kiln_cpu::Fallback`] they run on the
//! CPU instead ([`PretendDevice::with_fallback`]).
//!
//! The walk-through from an empty crate to a report is `docs/VENDOR.md`
//! (included below, and doc-tested).
#![doc = include_str!("../../../docs/VENDOR.md")]

use kiln_core::{
    Activation, AdamStep, Backend, BackendStorage, BinaryOp, Capabilities, DType, Distribution,
    Error, GemmEpilogue, HostData, Layout, ReduceOp, Result, SgdStep, SwitchPoints, UnaryOp, View,
    Window2d,
};
use kiln_cpu::{CpuBackend, Fallback};

/// A buffer in the pretend device's memory.
#[derive(Clone, Debug)]
pub struct DeviceBuffer(HostData);

impl BackendStorage for DeviceBuffer {
    fn dtype(&self) -> DType {
        self.0.dtype()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// A realistic bug to plant, each in a path only some sizes reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Softmax rows longer than 64 are normalised by their first 64 terms
    /// (the kernel's blocks never combine their partial sums).
    SoftmaxLongRows,
    /// GEMM terms past k = 256 are dropped (the second k block is lost).
    GemmDeepK,
    /// Outputs in full 48 × 48 GEMM tiles are off by 1e-3 (the fast path).
    GemmFullTile,
    /// Sums ignore everything past element 4096 of the reduced axis.
    ReduceLongRows,
    /// exp is 1e-4 too large, relatively.
    ExpRelative,
}

impl Fault {
    /// Every fault, with the name `PRETEND_FAULT` takes and the check that
    /// must catch it.
    pub const ALL: [(Fault, &'static str, &'static str); 5] = [
        (Fault::SoftmaxLongRows, "softmax-long-rows", "softmax"),
        (Fault::GemmDeepK, "gemm-deep-k", "gemm"),
        (Fault::GemmFullTile, "gemm-full-tile", "gemm"),
        (Fault::ReduceLongRows, "reduce-long-rows", "reduce_sum"),
        (Fault::ExpRelative, "exp-relative", "unary_exp"),
    ];

    /// The fault a `PRETEND_FAULT` value names.
    pub fn parse(s: &str) -> Result<Self> {
        Fault::ALL
            .iter()
            .find(|(_, name, _)| *name == s)
            .map(|&(f, _, _)| f)
            .ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|(_, n, _)| *n).collect();
                Error::invalid(format!(
                    "PRETEND_FAULT={s}: expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// The pretend device's GEMM tile: full tiles take the fast path.
pub const TILE: usize = 48;

/// A pretend accelerator. Cheap to clone (clones share the device).
#[derive(Clone, Debug)]
pub struct PretendDevice {
    cpu: CpuBackend,
    fault: Option<Fault>,
}

impl PretendDevice {
    /// A healthy device.
    pub fn new() -> Result<Self> {
        Ok(PretendDevice {
            cpu: CpuBackend::reference().with_threads(1)?,
            fault: None,
        })
    }

    /// A device with `fault` planted.
    pub fn with_fault(fault: Fault) -> Result<Self> {
        Ok(PretendDevice {
            fault: Some(fault),
            ..PretendDevice::new()?
        })
    }

    /// A device with the fault `PRETEND_FAULT` names, if any (an unknown
    /// name is an error that lists the known ones).
    pub fn from_env() -> Result<Self> {
        match std::env::var("PRETEND_FAULT") {
            Ok(name) if !name.is_empty() => PretendDevice::with_fault(Fault::parse(&name)?),
            _ => PretendDevice::new(),
        }
    }

    /// This device with the ops it lacks run on the CPU.
    pub fn with_fallback(self) -> Fallback<PretendDevice> {
        Fallback::new(self)
    }

    fn unsupported(&self, op: &'static str, dtype: DType) -> Error {
        Error::Unsupported {
            op,
            dtype,
            backend: self.name(),
        }
    }
}

/// The host view of a device view: the pretend device's memory is host memory.
fn host<'a>(v: View<'a, DeviceBuffer>) -> View<'a, HostData> {
    View::new(&v.storage.0, v.layout)
}

fn dev(h: HostData) -> DeviceBuffer {
    DeviceBuffer(h)
}

impl Backend for PretendDevice {
    type Storage = DeviceBuffer;

    fn name(&self) -> String {
        match self.fault {
            None => "pretend".into(),
            Some(f) => format!("pretend({f:?})"),
        }
    }

    fn capabilities(&self) -> Capabilities {
        let mut switch_points = SwitchPoints::default();
        switch_points.gemm_m.push(TILE);
        switch_points.gemm_n.push(TILE);
        Capabilities {
            switch_points,
            unsupported: vec![
                "conv2d/f16".into(),
                "conv2d_backward_data/f16".into(),
                "conv2d_backward_filter/f16".into(),
                "conv2d_pool/f16".into(),
            ],
            expected_failures: Vec::new(),
        }
    }

    fn full(&self, n: usize, d: DType, v: f64) -> Result<DeviceBuffer> {
        self.cpu.full(n, d, v).map(dev)
    }
    fn upload(&self, data: &HostData) -> Result<DeviceBuffer> {
        Ok(DeviceBuffer(data.clone()))
    }
    fn upload_owned(&self, data: HostData) -> Result<DeviceBuffer> {
        Ok(DeviceBuffer(data))
    }
    fn download(&self, src: View<'_, DeviceBuffer>) -> Result<HostData> {
        self.cpu.download(host(src))
    }
    fn copy_strided(
        &self,
        src: View<'_, DeviceBuffer>,
        dst: &mut DeviceBuffer,
        layout: &Layout,
    ) -> Result<()> {
        self.cpu.copy_strided(host(src), &mut dst.0, layout)
    }
    fn cast(&self, src: View<'_, DeviceBuffer>, d: DType) -> Result<DeviceBuffer> {
        self.cpu.cast(host(src), d).map(dev)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn gemm(
        &self,
        a: View<'_, DeviceBuffer>,
        b: View<'_, DeviceBuffer>,
        ep: &GemmEpilogue<'_, DeviceBuffer>,
    ) -> Result<DeviceBuffer> {
        let ep = GemmEpilogue {
            alpha: ep.alpha,
            beta_c: ep.beta_c.map(|(beta, c)| (beta, host(c))),
            bias: ep.bias.map(host),
            activation: ep.activation,
        };
        let (m, k, n) = (a.layout.dims()[1], a.layout.dims()[2], b.layout.dims()[2]);
        if self.fault == Some(Fault::GemmDeepK) && k > 256 {
            let (sa, sb) = (a.layout.narrow(2, 0, 256)?, b.layout.narrow(1, 0, 256)?);
            let (a, b) = (View::new(&a.storage.0, &sa), View::new(&b.storage.0, &sb));
            return self.cpu.gemm(a, b, &ep).map(dev);
        }
        let out = self.cpu.gemm(host(a), host(b), &ep)?;
        match (self.fault, out) {
            (Some(Fault::GemmFullTile), HostData::F32(mut c)) => {
                for (idx, v) in c.iter_mut().enumerate() {
                    let (i, j) = ((idx / n) % m, idx % n);
                    if i < m / TILE * TILE && j < n / TILE * TILE {
                        *v += 1e-3;
                    }
                }
                Ok(dev(HostData::F32(c)))
            }
            (_, out) => Ok(dev(out)),
        }
    }
    fn unary(&self, op: UnaryOp, x: View<'_, DeviceBuffer>) -> Result<DeviceBuffer> {
        let out = self.cpu.unary(op, host(x))?;
        match (self.fault, op, out) {
            (Some(Fault::ExpRelative), UnaryOp::Exp, HostData::F32(v)) => Ok(dev(HostData::F32(
                v.into_iter().map(|y| y * (1.0 + 1e-4)).collect(),
            ))),
            (_, _, out) => Ok(dev(out)),
        }
    }
    fn unary_backward(
        &self,
        op: UnaryOp,
        x: View<'_, DeviceBuffer>,
        y: View<'_, DeviceBuffer>,
        dy: View<'_, DeviceBuffer>,
    ) -> Result<DeviceBuffer> {
        self.cpu
            .unary_backward(op, host(x), host(y), host(dy))
            .map(dev)
    }
    fn affine(&self, x: View<'_, DeviceBuffer>, mul: f32, add: f32) -> Result<DeviceBuffer> {
        self.cpu.affine(host(x), mul, add).map(dev)
    }
    fn binary(
        &self,
        op: BinaryOp,
        a: View<'_, DeviceBuffer>,
        b: View<'_, DeviceBuffer>,
    ) -> Result<DeviceBuffer> {
        self.cpu.binary(op, host(a), host(b)).map(dev)
    }
    fn reduce(
        &self,
        op: ReduceOp,
        x: View<'_, DeviceBuffer>,
        axes: &[usize],
    ) -> Result<DeviceBuffer> {
        if let (Some(Fault::ReduceLongRows), ReduceOp::Sum, Some(&last)) =
            (self.fault, op, axes.last())
        {
            if x.layout.dims()[last] > 4096 {
                let short = x.layout.narrow(last, 0, 4096)?;
                return self
                    .cpu
                    .reduce(op, View::new(&x.storage.0, &short), axes)
                    .map(dev);
            }
        }
        self.cpu.reduce(op, host(x), axes).map(dev)
    }
    fn argmax(&self, x: View<'_, DeviceBuffer>) -> Result<DeviceBuffer> {
        self.cpu.argmax(host(x)).map(dev)
    }
    fn softmax(&self, x: View<'_, DeviceBuffer>, log: bool) -> Result<DeviceBuffer> {
        let c = x.layout.dims().last().copied().unwrap_or(0);
        if self.fault != Some(Fault::SoftmaxLongRows) || c <= 64 || x.storage.dtype() != DType::F32
        {
            return self.cpu.softmax(host(x), log).map(dev);
        }
        let xs = self.cpu.download(host(x))?.to_f32_vec();
        let mut y = Vec::with_capacity(xs.len());
        for row in xs.chunks(c) {
            let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let head: f32 = row[..64].iter().map(|&v| (v - m).exp()).sum();
            y.extend(row.iter().map(|&v| {
                if log {
                    v - m - head.ln()
                } else {
                    (v - m).exp() / head
                }
            }));
        }
        Ok(dev(HostData::F32(y)))
    }
    fn softmax_cross_entropy(
        &self,
        logits: View<'_, DeviceBuffer>,
        labels: View<'_, DeviceBuffer>,
    ) -> Result<(DeviceBuffer, DeviceBuffer)> {
        let (l, g) = self.cpu.softmax_cross_entropy(host(logits), host(labels))?;
        Ok((dev(l), dev(g)))
    }
    fn conv2d(
        &self,
        x: View<'_, DeviceBuffer>,
        w: View<'_, DeviceBuffer>,
        bias: Option<View<'_, DeviceBuffer>>,
        act: Activation,
        win: &Window2d,
    ) -> Result<DeviceBuffer> {
        if x.storage.dtype() == DType::F16 {
            return Err(self.unsupported("conv2d", DType::F16));
        }
        self.cpu
            .conv2d(host(x), host(w), bias.map(host), act, win)
            .map(dev)
    }
    fn conv2d_backward_data(
        &self,
        dy: View<'_, DeviceBuffer>,
        w: View<'_, DeviceBuffer>,
        win: &Window2d,
        input: [usize; 2],
    ) -> Result<DeviceBuffer> {
        if dy.storage.dtype() == DType::F16 {
            return Err(self.unsupported("conv2d_backward_data", DType::F16));
        }
        self.cpu
            .conv2d_backward_data(host(dy), host(w), win, input)
            .map(dev)
    }
    fn conv2d_backward_filter(
        &self,
        x: View<'_, DeviceBuffer>,
        dy: View<'_, DeviceBuffer>,
        win: &Window2d,
    ) -> Result<(DeviceBuffer, DeviceBuffer)> {
        if x.storage.dtype() == DType::F16 {
            return Err(self.unsupported("conv2d_backward_filter", DType::F16));
        }
        let (dw, db) = self.cpu.conv2d_backward_filter(host(x), host(dy), win)?;
        Ok((dev(dw), dev(db)))
    }
    fn max_pool2d(
        &self,
        x: View<'_, DeviceBuffer>,
        win: &Window2d,
    ) -> Result<(DeviceBuffer, DeviceBuffer)> {
        let (y, at) = self.cpu.max_pool2d(host(x), win)?;
        Ok((dev(y), dev(at)))
    }
    fn max_pool2d_backward(
        &self,
        dy: View<'_, DeviceBuffer>,
        at: View<'_, DeviceBuffer>,
        win: &Window2d,
        input: [usize; 2],
    ) -> Result<DeviceBuffer> {
        self.cpu
            .max_pool2d_backward(host(dy), host(at), win, input)
            .map(dev)
    }
    fn sgd_update(
        &self,
        p: &mut DeviceBuffer,
        g: &DeviceBuffer,
        v: Option<&mut DeviceBuffer>,
        step: &SgdStep,
    ) -> Result<()> {
        self.cpu
            .sgd_update(&mut p.0, &g.0, v.map(|v| &mut v.0), step)
    }
    fn adam_update(
        &self,
        p: &mut DeviceBuffer,
        g: &DeviceBuffer,
        m: &mut DeviceBuffer,
        v: &mut DeviceBuffer,
        step: &AdamStep,
    ) -> Result<()> {
        self.cpu
            .adam_update(&mut p.0, &g.0, &mut m.0, &mut v.0, step)
    }
    fn random(
        &self,
        dist: Distribution,
        n: usize,
        d: DType,
        seed: u64,
        offset: u64,
    ) -> Result<DeviceBuffer> {
        self.cpu.random(dist, n, d, seed, offset).map(dev)
    }
}
