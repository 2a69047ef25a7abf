//! `Fallback`: a device that implements only part of the `Backend` trait
//! gets the rest from the CPU, through the device's own transfers, with the
//! CPU's results bit for bit, and with every other device error passed
//! through untouched.

use std::sync::{Arc, Mutex};

use kiln_core::{
    Activation, AdamStep, Backend, BackendStorage, BinaryOp, ConvGrads, DType, Distribution, Error,
    GemmEpilogue, HostData, Layout, ReduceOp, Result, SgdStep, Shape, UnaryOp, View, Window2d,
};
use kiln_cpu::{CpuBackend, Fallback};

// ----- a device that implements part of the trait -------------------------

/// The partial device's memory: host data behind its own type, so the
/// adapter can only reach it through the device's transfers.
#[derive(Clone, Debug)]
struct Buf(HostData);

impl BackendStorage for Buf {
    fn dtype(&self) -> DType {
        self.0.dtype()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Downloads and uploads the device has served.
#[derive(Debug, Default)]
struct Transfers {
    downloads: usize,
    uploads: usize,
}

/// A device whose kernels are the reference CPU's, except that it declines
/// `gemm`, `softmax_cross_entropy`, `conv2d_backward_filter`,
/// `adam_update`, `sgd_update` with momentum and casts to f16, and has
/// "lost" its random-number generator (a `Backend` error).
#[derive(Clone, Debug)]
struct Partial {
    cpu: CpuBackend,
    transfers: Arc<Mutex<Transfers>>,
}

impl Partial {
    fn new() -> Self {
        Partial {
            cpu: CpuBackend::reference(),
            transfers: Arc::default(),
        }
    }

    fn transfers(&self) -> (usize, usize) {
        let t = self.transfers.lock().unwrap();
        (t.downloads, t.uploads)
    }
}

fn declined(op: &'static str, dtype: DType) -> Error {
    Error::Unsupported {
        op,
        dtype,
        backend: "partial".into(),
    }
}

/// The host view behind a device view.
fn h<'a>(v: View<'a, Buf>) -> View<'a, HostData> {
    View::new(&v.storage.0, v.layout)
}

fn wrap(r: Result<HostData>) -> Result<Buf> {
    r.map(Buf)
}

fn wrap2(r: Result<(HostData, HostData)>) -> Result<(Buf, Buf)> {
    r.map(|(a, b)| (Buf(a), Buf(b)))
}

impl Backend for Partial {
    type Storage = Buf;

    fn name(&self) -> String {
        "partial".into()
    }

    fn full(&self, numel: usize, dtype: DType, value: f64) -> Result<Buf> {
        wrap(self.cpu.full(numel, dtype, value))
    }

    fn upload(&self, data: &HostData) -> Result<Buf> {
        self.transfers.lock().unwrap().uploads += 1;
        Ok(Buf(data.clone()))
    }

    fn upload_owned(&self, data: HostData) -> Result<Buf> {
        self.transfers.lock().unwrap().uploads += 1;
        Ok(Buf(data))
    }

    fn download(&self, src: View<'_, Buf>) -> Result<HostData> {
        self.transfers.lock().unwrap().downloads += 1;
        self.cpu.download(h(src))
    }

    fn copy_strided(&self, src: View<'_, Buf>, dst: &mut Buf, dst_layout: &Layout) -> Result<()> {
        self.cpu.copy_strided(h(src), &mut dst.0, dst_layout)
    }

    fn cast(&self, src: View<'_, Buf>, dtype: DType) -> Result<Buf> {
        if dtype == DType::F16 {
            return Err(declined("cast", dtype));
        }
        wrap(self.cpu.cast(h(src), dtype))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn gemm(&self, a: View<'_, Buf>, _: View<'_, Buf>, _: &GemmEpilogue<'_, Buf>) -> Result<Buf> {
        Err(declined("gemm", a.storage.dtype()))
    }

    fn layer_norm(
        &self,
        x: View<'_, Buf>,
        _: View<'_, Buf>,
        _: View<'_, Buf>,
        _: f32,
    ) -> Result<kiln_core::LayerNormOut<Buf>> {
        Err(declined("layer_norm", x.storage.dtype()))
    }

    fn unary(&self, op: UnaryOp, x: View<'_, Buf>) -> Result<Buf> {
        wrap(self.cpu.unary(op, h(x)))
    }

    fn unary_backward(
        &self,
        op: UnaryOp,
        x: View<'_, Buf>,
        y: View<'_, Buf>,
        dy: View<'_, Buf>,
    ) -> Result<Buf> {
        wrap(self.cpu.unary_backward(op, h(x), h(y), h(dy)))
    }

    fn affine(&self, x: View<'_, Buf>, mul: f32, add: f32) -> Result<Buf> {
        wrap(self.cpu.affine(h(x), mul, add))
    }

    fn binary(&self, op: BinaryOp, a: View<'_, Buf>, b: View<'_, Buf>) -> Result<Buf> {
        wrap(self.cpu.binary(op, h(a), h(b)))
    }

    fn reduce(&self, op: ReduceOp, x: View<'_, Buf>, axes: &[usize]) -> Result<Buf> {
        wrap(self.cpu.reduce(op, h(x), axes))
    }

    fn argmax(&self, x: View<'_, Buf>) -> Result<Buf> {
        wrap(self.cpu.argmax(h(x)))
    }

    fn softmax(&self, x: View<'_, Buf>, log: bool) -> Result<Buf> {
        wrap(self.cpu.softmax(h(x), log))
    }

    fn softmax_cross_entropy(&self, logits: View<'_, Buf>, _: View<'_, Buf>) -> Result<(Buf, Buf)> {
        Err(declined("softmax_cross_entropy", logits.storage.dtype()))
    }

    fn conv2d(
        &self,
        x: View<'_, Buf>,
        weight: View<'_, Buf>,
        bias: Option<View<'_, Buf>>,
        activation: Activation,
        window: &Window2d,
    ) -> Result<Buf> {
        wrap(
            self.cpu
                .conv2d(h(x), h(weight), bias.map(h), activation, window),
        )
    }

    fn conv2d_backward_data(
        &self,
        dy: View<'_, Buf>,
        weight: View<'_, Buf>,
        window: &Window2d,
        input: [usize; 2],
    ) -> Result<Buf> {
        wrap(
            self.cpu
                .conv2d_backward_data(h(dy), h(weight), window, input),
        )
    }

    fn conv2d_backward_filter(
        &self,
        x: View<'_, Buf>,
        _: View<'_, Buf>,
        _: &Window2d,
    ) -> Result<(Buf, Buf)> {
        Err(declined("conv2d_backward_filter", x.storage.dtype()))
    }

    fn max_pool2d(&self, x: View<'_, Buf>, window: &Window2d) -> Result<(Buf, Buf)> {
        wrap2(self.cpu.max_pool2d(h(x), window))
    }

    fn max_pool2d_backward(
        &self,
        dy: View<'_, Buf>,
        argmax: View<'_, Buf>,
        window: &Window2d,
        input: [usize; 2],
    ) -> Result<Buf> {
        wrap(
            self.cpu
                .max_pool2d_backward(h(dy), h(argmax), window, input),
        )
    }

    // `conv2d_pool` and `conv2d_pool_backward` are the trait's compositions
    // of the ops above, so the backward one declines (it needs the filter
    // gradient).

    fn sgd_update(
        &self,
        param: &mut Buf,
        grad: &Buf,
        velocity: Option<&mut Buf>,
        step: &SgdStep,
    ) -> Result<()> {
        match velocity {
            Some(_) => Err(declined("sgd_update", param.dtype())),
            None => self.cpu.sgd_update(&mut param.0, &grad.0, None, step),
        }
    }

    fn adam_update(
        &self,
        param: &mut Buf,
        _: &Buf,
        _: &mut Buf,
        _: &mut Buf,
        _: &AdamStep,
    ) -> Result<()> {
        Err(declined("adam_update", param.dtype()))
    }

    fn random(&self, _: Distribution, _: usize, _: DType, _: u64, _: u64) -> Result<Buf> {
        Err(Error::Backend(
            "partial: the random-number unit is lost".into(),
        ))
    }
}

// ----- operands -------------------------------------------------------------

/// `n` f32 values in about [-2, 2], from a fixed LCG stream.
fn values(n: usize, seed: u64) -> HostData {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    HostData::F32(
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect(),
    )
}

fn contiguous(dims: &[usize]) -> Layout {
    Layout::contiguous(Shape::new(dims).unwrap())
}

/// An operand stored once, readable by the partial device and by the CPU.
struct Operand {
    host: HostData,
    dev: Buf,
    layout: Layout,
}

impl Operand {
    fn new(host: HostData, layout: Layout) -> Self {
        Operand {
            dev: Buf(host.clone()),
            host,
            layout,
        }
    }

    /// Random values stored as `stored`, read through `view(stored layout)`.
    fn random(stored: &[usize], seed: u64, view: impl Fn(&Layout) -> Layout) -> Self {
        let layout = view(&contiguous(stored));
        Operand::new(values(stored.iter().product(), seed), layout)
    }

    fn dev(&self) -> View<'_, Buf> {
        View::new(&self.dev, &self.layout)
    }

    fn host(&self) -> View<'_, HostData> {
        View::new(&self.host, &self.layout)
    }
}

/// Bitwise equality (NaN-safe, -0 ≠ +0).
#[track_caller]
fn assert_bits(got: &HostData, want: &HostData) {
    assert_eq!(got.dtype(), want.dtype());
    assert_eq!(got.len(), want.len());
    assert!(
        got.as_bytes() == want.as_bytes(),
        "results differ:\n got {got:?}\nwant {want:?}"
    );
}

#[track_caller]
fn assert_unsupported<T: std::fmt::Debug>(r: Result<T>, want_op: &str) {
    match r {
        Err(Error::Unsupported { op, .. }) => assert_eq!(op, want_op),
        other => panic!("expected {want_op} to be unsupported, got {other:?}"),
    }
}

fn gemm_operands() -> [Operand; 4] {
    // a: [2, 3, 5] read transposed from [2, 5, 3].
    let a = Operand::random(&[2, 5, 3], 1, |l| l.transpose(1, 2).unwrap());
    // b: [2, 5, 6] sliced out of [2, 5, 8].
    let b = Operand::random(&[2, 5, 8], 2, |l| l.narrow(2, 1, 6).unwrap());
    // C₀: [2, 3, 6] read transposed from [2, 6, 3].
    let c0 = Operand::random(&[2, 6, 3], 3, |l| l.transpose(1, 2).unwrap());
    // bias: [6] sliced out of [11].
    let bias = Operand::random(&[11], 4, |l| l.narrow(0, 3, 6).unwrap());
    [a, b, c0, bias]
}

fn sce_operands() -> (Operand, Operand) {
    // logits: [4, 5] read transposed from [5, 4].
    let logits = Operand::random(&[5, 4], 5, |l| l.transpose(0, 1).unwrap());
    // labels: [4] sliced out of [7] u32.
    let labels = Operand::new(
        HostData::U32(vec![9, 9, 4, 0, 2, 3, 9]),
        contiguous(&[7]).narrow(0, 2, 4).unwrap(),
    );
    (logits, labels)
}

fn conv_window() -> Window2d {
    Window2d {
        kernel: [3, 3],
        stride: [2, 1],
        padding: [1, 0, 1, 1],
    }
}

fn conv_filter_operands() -> (Operand, Operand) {
    let window = conv_window();
    // x: [2, 3, 5, 6] read transposed from [2, 3, 6, 5].
    let x = Operand::random(&[2, 3, 6, 5], 6, |l| l.transpose(2, 3).unwrap());
    let [oh, ow] = window.output("test", [5, 6]).unwrap();
    // dy: [2, 4, oh, ow] sliced out of [2, 4, oh, ow + 3].
    let dy = Operand::random(&[2, 4, oh, ow + 3], 7, |l| l.narrow(3, 2, ow).unwrap());
    (x, dy)
}

fn adam_step() -> AdamStep {
    AdamStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-7,
        weight_decay: 0.01,
        decoupled: true,
        step: 3,
    }
}

/// Optimiser state: parameters, gradient, two moments (the second ≥ 0).
fn adam_state(n: usize) -> [HostData; 4] {
    let abs = |d: HostData| HostData::F32(d.to_f32_vec().iter().map(|x| x.abs()).collect());
    [
        values(n, 11),
        values(n, 12),
        values(n, 13),
        abs(values(n, 14)),
    ]
}

// ----- (a) the partial device alone ----------------------------------------

#[test]
fn the_partial_device_alone_declines_its_missing_ops() {
    let dev = Partial::new();
    let [a, b, _, _] = gemm_operands();
    assert_unsupported(dev.gemm(a.dev(), b.dev(), &GemmEpilogue::default()), "gemm");
    let (logits, labels) = sce_operands();
    assert_unsupported(
        dev.softmax_cross_entropy(logits.dev(), labels.dev()),
        "softmax_cross_entropy",
    );
    let (x, dy) = conv_filter_operands();
    assert_unsupported(
        dev.conv2d_backward_filter(x.dev(), dy.dev(), &conv_window()),
        "conv2d_backward_filter",
    );
    let [p, g, m, v] = adam_state(9).map(Buf);
    let (mut p, mut m, mut v) = (p, m, v);
    assert_unsupported(
        dev.adam_update(&mut p, &g, &mut m, &mut v, &adam_step()),
        "adam_update",
    );
    assert_unsupported(dev.cast(a.dev(), DType::F16), "cast");
    // What it does implement works.
    assert!(dev.cast(a.dev(), DType::BF16).is_ok());
    assert!(dev.softmax(logits.dev(), false).is_ok());
}

// ----- (b) fallbacks compute the CPU's results, bit for bit -----------------

#[test]
fn gemm_with_epilogue_on_strided_operands_falls_back_bitwise() {
    let dev = Partial::new();
    let fb = Fallback::new(dev.clone());
    let cpu = CpuBackend::reference();
    let [a, b, c0, bias] = gemm_operands();
    for activation in [Activation::Tanh, Activation::Relu] {
        let got = fb
            .gemm(
                a.dev(),
                b.dev(),
                &GemmEpilogue {
                    alpha: 0.75,
                    beta_c: Some((-1.5, c0.dev())),
                    bias: Some(bias.dev()),
                    activation,
                },
            )
            .unwrap();
        let want = cpu
            .gemm(
                a.host(),
                b.host(),
                &GemmEpilogue {
                    alpha: 0.75,
                    beta_c: Some((-1.5, c0.host())),
                    bias: Some(bias.host()),
                    activation,
                },
            )
            .unwrap();
        assert_eq!(got.len(), 2 * 3 * 6);
        assert_bits(&got.0, &want);
    }
    // Each call: a, b, C₀ and the bias down, the product up.
    assert_eq!(dev.transfers(), (8, 2));
    assert_eq!(fb.fallbacks(), vec![("gemm", 2)]);
    // …and they are the adapter's slow paths, for `kiln bench` to show.
    assert_eq!(
        fb.slow_paths(),
        vec![kiln_core::slow_path::SlowPath {
            op: "gemm".into(),
            reason: "ran on the CPU (the device declined it)".into(),
            calls: 2
        }]
    );
}

#[test]
fn softmax_cross_entropy_falls_back_bitwise() {
    let fb = Fallback::new(Partial::new());
    let (logits, labels) = sce_operands();
    let (loss, grad) = fb
        .softmax_cross_entropy(logits.dev(), labels.dev())
        .unwrap();
    let (want_loss, want_grad) = CpuBackend::reference()
        .softmax_cross_entropy(logits.host(), labels.host())
        .unwrap();
    assert_bits(&loss.0, &want_loss);
    assert_bits(&grad.0, &want_grad);
}

#[test]
fn a_declined_layer_norm_runs_on_the_cpu_bitwise() {
    let fb = Fallback::new(Partial::new());
    // x: [4, 5] read transposed from [5, 4]; γ and β contiguous.
    let x = Operand::random(&[5, 4], 8, |l| l.transpose(0, 1).unwrap());
    let g = Operand::random(&[5], 9, |l| l.clone());
    let b = Operand::random(&[5], 10, |l| l.clone());
    let out = fb.layer_norm(x.dev(), g.dev(), b.dev(), 1e-5).unwrap();
    let want = CpuBackend::reference()
        .layer_norm(x.host(), g.host(), b.host(), 1e-5)
        .unwrap();
    assert_bits(&out.y.0, &want.y);
    assert_bits(&out.mean.0, &want.mean);
    assert_bits(&out.rstd.0, &want.rstd);
    assert_eq!(fb.fallbacks(), vec![("layer_norm", 1)]);
}

#[test]
fn conv2d_backward_filter_falls_back_bitwise() {
    let fb = Fallback::new(Partial::new());
    let (x, dy) = conv_filter_operands();
    let (dw, db) = fb
        .conv2d_backward_filter(x.dev(), dy.dev(), &conv_window())
        .unwrap();
    let (want_dw, want_db) = CpuBackend::reference()
        .conv2d_backward_filter(x.host(), dy.host(), &conv_window())
        .unwrap();
    assert_eq!(dw.len(), 4 * 3 * 3 * 3);
    assert_bits(&dw.0, &want_dw);
    assert_bits(&db.0, &want_db);
}

#[test]
fn the_fused_conv_pool_backward_falls_back_as_a_whole() {
    let fb = Fallback::new(Partial::new());
    let cpu = CpuBackend::reference();
    let conv = Window2d::valid([3, 3], [1, 1]);
    let pool = Window2d::valid([2, 2], [2, 2]);
    let x = Operand::random(&[2, 2, 7, 6], 21, |l| l.transpose(2, 3).unwrap());
    let w = Operand::random(&[3, 2, 3, 3], 22, Clone::clone);
    let bias = Operand::random(&[3], 23, Clone::clone);
    let act = Activation::Relu;

    // The forward is the device's own (its conv2d and max_pool2d).
    let (pooled, argmax) = fb
        .conv2d_pool(x.dev(), w.dev(), Some(bias.dev()), act, &conv, &pool)
        .unwrap();
    let (want_pooled, want_argmax) = cpu
        .conv2d_pool(x.host(), w.host(), Some(bias.host()), act, &conv, &pool)
        .unwrap();
    assert_bits(&pooled.0, &want_pooled);
    assert_bits(&argmax.0, &want_argmax);
    assert!(fb.fallbacks().is_empty());

    // The backward needs the filter gradient the device lacks.
    let cdims = kiln_core::conv::conv2d_output(x.layout.dims(), w.layout.dims(), None, &conv);
    let pdims = kiln_core::conv::pool2d_output(&cdims.unwrap(), &pool).unwrap();
    assert_eq!(pooled.len(), pdims.iter().product::<usize>());
    let (pl, dp) = (
        contiguous(&pdims),
        Operand::random(&pdims, 24, Clone::clone),
    );
    let got: ConvGrads<Buf> = fb
        .conv2d_pool_backward(
            x.dev(),
            w.dev(),
            View::new(&pooled, &pl),
            View::new(&argmax, &pl),
            dp.dev(),
            act,
            &conv,
            &pool,
            true,
        )
        .unwrap();
    let want = cpu
        .conv2d_pool_backward(
            x.host(),
            w.host(),
            View::new(&want_pooled, &pl),
            View::new(&want_argmax, &pl),
            dp.host(),
            act,
            &conv,
            &pool,
            true,
        )
        .unwrap();
    assert_bits(&got.0.unwrap().0, &want.0.unwrap());
    assert_bits(&got.1 .0, &want.1);
    assert_bits(&got.2 .0, &want.2);
    assert_eq!(fb.fallbacks(), vec![("conv2d_pool_backward", 1)]);
}

#[test]
fn adam_update_falls_back_in_place_bitwise() {
    let dev = Partial::new();
    let fb = Fallback::new(dev.clone());
    let [p, g, m, v] = adam_state(37);
    let (mut dp, dg, mut dm, mut dv) = (
        Buf(p.clone()),
        Buf(g.clone()),
        Buf(m.clone()),
        Buf(v.clone()),
    );
    let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), v.clone());
    let cpu = CpuBackend::reference();
    for t in 1..=3 {
        let step = AdamStep {
            step: t,
            ..adam_step()
        };
        fb.adam_update(&mut dp, &dg, &mut dm, &mut dv, &step)
            .unwrap();
        cpu.adam_update(&mut wp, &g, &mut wm, &mut wv, &step)
            .unwrap();
    }
    assert_bits(&dp.0, &wp);
    assert_bits(&dm.0, &wm);
    assert_bits(&dv.0, &wv);
    assert_bits(&dg.0, &g);
    assert_ne!(wp.as_bytes(), p.as_bytes(), "the step changed nothing");
    // Each step: four storages down, three up.
    assert_eq!(dev.transfers(), (12, 9));
    assert_eq!(fb.fallbacks(), vec![("adam_update", 3)]);
}

#[test]
fn sgd_update_falls_back_only_when_the_device_declines() {
    let fb = Fallback::new(Partial::new());
    let cpu = CpuBackend::reference();
    let [p, g, vel, _] = adam_state(20);
    let step = SgdStep {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-3,
        nesterov: true,
    };
    // With momentum the device declines: parameters and velocity update.
    let (mut dp, mut dvel) = (Buf(p.clone()), Buf(vel.clone()));
    fb.sgd_update(&mut dp, &Buf(g.clone()), Some(&mut dvel), &step)
        .unwrap();
    let (mut wp, mut wvel) = (p.clone(), vel.clone());
    cpu.sgd_update(&mut wp, &g, Some(&mut wvel), &step).unwrap();
    assert_bits(&dp.0, &wp);
    assert_bits(&dvel.0, &wvel);
    // Without, the device does it itself.
    let plain = SgdStep {
        momentum: 0.0,
        ..step
    };
    fb.sgd_update(&mut dp, &Buf(g.clone()), None, &plain)
        .unwrap();
    cpu.sgd_update(&mut wp, &g, None, &plain).unwrap();
    assert_bits(&dp.0, &wp);
    assert_eq!(fb.fallbacks(), vec![("sgd_update", 1)]);
}

#[test]
fn casts_fall_back_per_dtype() {
    let fb = Fallback::new(Partial::new());
    let cpu = CpuBackend::reference();
    let [a, ..] = gemm_operands();
    for dtype in [DType::F16, DType::BF16, DType::F16] {
        let got = fb.cast(a.dev(), dtype).unwrap();
        assert_bits(&got.0, &cpu.cast(a.host(), dtype).unwrap());
    }
    assert_eq!(fb.fallbacks(), vec![("cast", 2)]);
}

// ----- (c) other errors pass through ----------------------------------------

#[test]
fn other_device_errors_are_returned_not_retried() {
    let fb = Fallback::new(Partial::new());
    // A device failure: the CPU could draw the numbers, but must not.
    let dist = Distribution::Uniform {
        low: 0.0,
        high: 1.0,
    };
    match fb.random(dist, 8, DType::F32, 1, 0) {
        Err(Error::Backend(msg)) => assert!(msg.contains("lost"), "{msg}"),
        other => panic!("expected the device's error, got {other:?}"),
    }
    // A shape mismatch in an op the device implements.
    let a = Operand::random(&[2, 3], 31, Clone::clone);
    let b = Operand::random(&[3, 2], 32, Clone::clone);
    let err = fb.binary(BinaryOp::Add, a.dev(), b.dev()).unwrap_err();
    assert!(!matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("add"), "{err}");
    assert!(fb.fallbacks().is_empty(), "{:?}", fb.fallbacks());
}

#[test]
fn the_cpus_error_is_returned_for_a_declined_op() {
    let fb = Fallback::new(Partial::new());
    // gemm with mismatched inner extents: the device declines every gemm,
    // the CPU rejects the shapes.
    let a = Operand::random(&[1, 2, 3], 33, Clone::clone);
    let b = Operand::random(&[1, 4, 2], 34, Clone::clone);
    let err = fb
        .gemm(a.dev(), b.dev(), &GemmEpilogue::default())
        .unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert_eq!(fb.fallbacks(), vec![("gemm", 1)]);
}

// ----- (d) counts and naming ------------------------------------------------

#[test]
fn fallback_counts_name_the_ops_and_are_shared_by_clones() {
    let fb = Fallback::new(Partial::new());
    assert_eq!(fb.name(), "partial+cpu-fallback");
    assert!(fb.fallbacks().is_empty());
    let twin = fb.clone();

    let [a, b, _, _] = gemm_operands();
    let (logits, labels) = sce_operands();
    let (x, dy) = conv_filter_operands();
    twin.gemm(a.dev(), b.dev(), &GemmEpilogue::default())
        .unwrap();
    fb.gemm(a.dev(), b.dev(), &GemmEpilogue::default()).unwrap();
    fb.softmax_cross_entropy(logits.dev(), labels.dev())
        .unwrap();
    fb.conv2d_backward_filter(x.dev(), dy.dev(), &conv_window())
        .unwrap();
    // Ops the device implements are not counted.
    fb.softmax(logits.dev(), true).unwrap();
    fb.unary(UnaryOp::Exp, a.dev()).unwrap();
    fb.reduce(ReduceOp::Sum, a.dev(), &[1]).unwrap();

    let want = vec![
        ("conv2d_backward_filter", 1),
        ("gemm", 2),
        ("softmax_cross_entropy", 1),
    ];
    assert_eq!(fb.fallbacks(), want);
    assert_eq!(twin.fallbacks(), want);
    twin.reset_fallbacks();
    assert!(fb.fallbacks().is_empty());
}

// ----- a few conformance checks through the adapter --------------------------

#[test]
fn conformance_checks_pass_on_the_wrapped_partial_device() {
    let fb = Fallback::new(Partial::new());
    let mut cfg = kiln_conformance::Config::new(&fb.name());
    cfg.cases = 8;
    cfg.depth = kiln_conformance::Depth::Edge;
    // Alone, the device reports the op unsupported.
    let alone = kiln_conformance::run_check(&Partial::new(), "gemm", DType::F32, &cfg);
    assert_eq!(alone.status, kiln_conformance::Status::Unsupported);
    for op in [
        "gemm",
        "gemm_epilogue",
        "softmax_cross_entropy",
        "conv2d_backward_filter",
        "conv2d_pool",
        "adam_update",
    ] {
        let r = kiln_conformance::run_check(&fb, op, DType::F32, &cfg);
        assert!(r.passed(), "{op}: {:?}\n{:?}", r.status, r.failure);
        assert!(r.cases > 0, "{op}: no cases ran");
        eprintln!("{op}: {} cases, worst {:.3} of bound", r.cases, r.worst);
    }
    let counted: Vec<&str> = fb.fallbacks().into_iter().map(|(op, _)| op).collect();
    for op in [
        "adam_update",
        "conv2d_backward_filter",
        "gemm",
        "softmax_cross_entropy",
    ] {
        assert!(counted.contains(&op), "{op} not in {counted:?}");
    }
}
