//! kiln's grid-stride CUDA kernels, compiled for the CPU with g++ through
//! `kernels/host/shim.h` and run serially, against the CPU backend, bit
//! for bit: the Philox draws, the strided converting copy (every pair of
//! types, transposed, sliced and broadcast views), max-pooling forward
//! and backward (padding, overlapping windows, ties and NaN), every unary
//! op and its gradient, every binary op, affine, and Adam; and, with each
//! block's threads run as fibers (barriers, shuffles), the row
//! reductions, argmax, softmax, softmax-CE, the SIMT GEMM and the three
//! implicit-GEMM convolutions, within their error bounds; and the BF16,
//! F16 and TF32 tensor-core GEMMs with `mma.sync`/`ldmatrix`/`cp.async`
//! emulated from the PTX ISA. This checks the kernels' logic on a machine
//! without a GPU; what it cannot check — a misreading of the ISA shared by
//! kernel and emulation, races a serial copy hides, the GPU's own math
//! library and FMA contraction — the conformance suite checks on a GPU
//! (`ci/gpu.sh run`).
//!
//! Skipped (with a note) where g++ is missing, unless
//! `KILN_REQUIRE_HOST_EMULATION=1`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use kiln_core::{Backend, DType, Distribution, HostData, Layout, Shape, View, Window2d};
use kiln_cpu::CpuBackend;
use kiln_cuda::launch::{dtype_code, PoolArg, Strided};

/// The harness binary, built once per test run.
fn harness() -> Option<&'static PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
        let out = std::env::temp_dir().join(format!("kiln-host-kernels-{}", std::process::id()));
        let status = Command::new("g++")
            .args([
                "-std=c++20",
                "-O1",
                "-pthread",
                "-Wall",
                "-Wno-unknown-pragmas",
                "-Wno-sign-compare",
                "-I",
            ])
            .arg(&root)
            .arg(root.join("host/harness.cpp"))
            .arg("-o")
            .arg(&out)
            .status();
        match status {
            Ok(s) if s.success() => Some(out),
            other => {
                assert!(
                    std::env::var("KILN_REQUIRE_HOST_EMULATION").is_err(),
                    "building the host harness failed: {other:?}"
                );
                eprintln!("skipped: g++ could not build kernels/host/harness.cpp ({other:?})");
                None
            }
        }
    })
    .as_ref()
}

fn run(args: &[String], input: &[u64]) -> Vec<u64> {
    let bin = harness().expect("checked by the caller");
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let text: String = input.iter().map(|v| format!("{v}\n")).collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "harness {args:?} failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

/// Bit patterns of host data, one per element.
fn bits(h: &HostData) -> Vec<u64> {
    match h {
        HostData::F32(v) => v.iter().map(|x| u64::from(x.to_bits())).collect(),
        HostData::F16(v) => v.iter().map(|x| u64::from(x.to_bits())).collect(),
        HostData::BF16(v) => v.iter().map(|x| u64::from(x.to_bits())).collect(),
        HostData::U32(v) => v.iter().map(|&x| u64::from(x)).collect(),
    }
}

/// NaNs compare by class (the kernels and the CPU may pick different NaN
/// payloads); everything else by bits.
fn same(dtype: DType, got: &[u64], want: &[u64]) -> bool {
    let nan = |b: u64| match dtype {
        DType::F32 => f32::from_bits(b as u32).is_nan(),
        DType::F16 => kiln_core::f16::from_bits(b as u16).is_nan(),
        DType::BF16 => kiln_core::bf16::from_bits(b as u16).is_nan(),
        DType::U32 => false,
    };
    got.len() == want.len()
        && got
            .iter()
            .zip(want)
            .all(|(&g, &w)| g == w || (nan(g) && nan(w)))
}

fn cpu() -> CpuBackend {
    CpuBackend::reference()
}

#[test]
fn philox_draws_match_the_cpu() {
    if harness().is_none() {
        return;
    }
    let b = cpu();
    for (dist, kind, p) in [
        (
            Distribution::Uniform {
                low: -0.5,
                high: 2.0,
            },
            "uniform",
            (-0.5, 2.0),
        ),
        (
            Distribution::Normal {
                mean: 0.1,
                std: 0.05,
            },
            "normal",
            (0.1, 0.05),
        ),
    ] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (seed, offset, n) in [
                (7u64, 0u64, 1usize),
                (42, 1 << 40, 1031),
                (u64::MAX, 3, 2500),
            ] {
                let want = bits(&b.random(dist, n, dtype, seed, offset).unwrap());
                let got = run(
                    &[
                        "random".into(),
                        kind.into(),
                        seed.to_string(),
                        offset.to_string(),
                        n.to_string(),
                        dtype_code(dtype).to_string(),
                        p.0.to_string(),
                        p.1.to_string(),
                    ],
                    &[],
                );
                assert!(
                    same(dtype, &got, &want),
                    "{kind} {dtype} seed {seed} offset {offset} n {n}"
                );
            }
        }
    }
}

#[test]
fn the_strided_converting_copy_matches_the_cpu_cast() {
    if harness().is_none() {
        return;
    }
    let b = cpu();
    // Values with every class: ±0, subnormals, ties, large, ±∞, NaN, integers.
    let mut vals: Vec<f32> = vec![
        0.0,
        -0.0,
        1e-40,
        -3e-39,
        1.0,
        -2.5,
        65504.0,
        65520.0,
        1e30,
        -1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        3.0e9,
        4.3e9,
        16_777_217.0,
        1.000_976_6,
        0.333_333_34,
        2049.0,
        1.0 + f32::EPSILON,
    ];
    let mut x: u32 = 12345;
    while vals.len() < 300 {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        vals.push(f32::from_bits(x));
    }
    let layouts = |len: usize| -> Vec<Layout> {
        let c = Layout::contiguous(Shape::new(&[len]).unwrap());
        let m = Layout::contiguous(Shape::new(&[12, 25]).unwrap());
        vec![
            c.clone(),
            c.narrow(0, 7, 200).unwrap(),
            m.transpose(0, 1).unwrap(),
            m.narrow(1, 3, 9).unwrap().transpose(0, 1).unwrap(),
            Layout::contiguous(Shape::new(&[25]).unwrap())
                .broadcast_as(&Shape::new(&[4, 25]).unwrap())
                .unwrap(),
        ]
    };
    let u32s: Vec<u32> = (0..300u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
    for src_dtype in [DType::F32, DType::F16, DType::BF16, DType::U32] {
        let src = match src_dtype {
            DType::U32 => HostData::U32(u32s.clone()),
            _ => b
                .cast(
                    View::new(&HostData::F32(vals.clone()), &layouts(300)[0]),
                    src_dtype,
                )
                .unwrap(),
        };
        for layout in layouts(300) {
            let s = Strided::from_layout("copy", &layout).unwrap();
            for dst_dtype in [DType::F32, DType::F16, DType::BF16, DType::U32] {
                let want = bits(&b.cast(View::new(&src, &layout), dst_dtype).unwrap());
                let mut args = vec![
                    "copy".to_string(),
                    dtype_code(src_dtype).to_string(),
                    dtype_code(dst_dtype).to_string(),
                    src.len().to_string(),
                    s.rank.to_string(),
                    s.offset.to_string(),
                ];
                args.extend(s.dims[..s.rank as usize].iter().map(i64::to_string));
                args.extend(s.strides[..s.rank as usize].iter().map(i64::to_string));
                let got = run(&args, &bits(&src));
                assert!(
                    same(dst_dtype, &got, &want),
                    "{src_dtype} → {dst_dtype} through {layout:?}: first difference at {:?}",
                    got.iter().zip(&want).position(|(g, w)| g != w)
                );
            }
        }
    }
}

#[test]
fn max_pooling_forward_and_backward_match_the_cpu() {
    if harness().is_none() {
        return;
    }
    let b = cpu();
    let cases = [
        ([2, 3, 8, 9], Window2d::valid([2, 2], [2, 2])),
        ([1, 2, 7, 7], Window2d::valid([3, 3], [1, 1])), // overlapping windows
        (
            [1, 1, 6, 5],
            Window2d {
                kernel: [3, 2],
                stride: [2, 1],
                padding: [1, 1, 0, 1],
            },
        ),
        ([2, 1, 1, 1], Window2d::valid([1, 1], [1, 1])),
    ];
    for (dims, win) in cases {
        let n: usize = dims.iter().product();
        // Few distinct values, so windows hold ties; and a NaN.
        let mut xs: Vec<f32> = (0..n).map(|i| ((i * 7919) % 5) as f32 - 2.0).collect();
        xs[n / 2] = f32::NAN;
        let lx = Layout::contiguous(Shape::new(&dims).unwrap());
        let xh = HostData::F32(xs);
        let (y, at) = b.max_pool2d(View::new(&xh, &lx), &win).unwrap();
        let [_, _, oh, ow] = kiln_core::conv::pool2d_output(&dims, &win).unwrap();
        let cells = dims[0] * dims[1] * oh * ow;
        let dy = HostData::F32((0..cells).map(|i| 0.25 + i as f32 * 0.5).collect());
        let ly = Layout::contiguous(Shape::new(&[dims[0], dims[1], oh, ow]).unwrap());
        let dx = b
            .max_pool2d_backward(
                View::new(&dy, &ly),
                View::new(&at, &ly),
                &win,
                [dims[2], dims[3]],
            )
            .unwrap();
        let p = PoolArg::new(dims, &win, [oh, ow]);
        let args: Vec<String> = [
            "pool".to_string(),
            p.planes.to_string(),
            p.h.to_string(),
            p.w.to_string(),
            p.kh.to_string(),
            p.kw.to_string(),
            p.sh.to_string(),
            p.sw.to_string(),
            p.pt.to_string(),
            p.pl.to_string(),
            p.oh.to_string(),
            p.ow.to_string(),
        ]
        .to_vec();
        let mut input = bits(&xh);
        input.extend(bits(&dy));
        let got = run(&args, &input);
        let (gy, rest) = got.split_at(cells);
        let (gat, gdx) = rest.split_at(cells);
        assert!(
            same(DType::F32, gy, &bits(&y)),
            "{dims:?} {win:?}: pooled values"
        );
        assert_eq!(gat, &bits(&at)[..], "{dims:?} {win:?}: argmax");
        assert!(
            same(DType::F32, gdx, &bits(&dx)),
            "{dims:?} {win:?}: gradient"
        );
    }
}

/// Awkward f32 inputs: ±0, subnormals, ±1, large, ±∞, NaN, then a spread.
fn awkward(n: usize, salt: u32) -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1e-40,
        -1e-39,
        1.0,
        -1.0,
        0.5,
        -89.0,
        89.0,
        1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    let mut x = salt;
    while v.len() < n {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        v.push(((x >> 8) as f32 / 16_777_216.0 - 0.5) * 20.0);
    }
    v.truncate(n);
    v
}

/// [`awkward`]'s spread without its 13 special values: `n` finite values
/// (an optimiser's operands).
fn spread(n: usize, salt: u32) -> Vec<f32> {
    awkward(n + 13, salt)[13..].to_vec()
}

#[test]
fn elementwise_kernels_match_the_cpu() {
    use kiln_core::{BinaryOp, UnaryOp};
    use kiln_cuda::launch::{binary_code, unary_code};
    if harness().is_none() {
        return;
    }
    let b = cpu();
    let n = 700;
    let l = Layout::contiguous(Shape::new(&[n]).unwrap());
    let (xh, zh) = (HostData::F32(awkward(n, 1)), HostData::F32(awkward(n, 2)));
    for op in UnaryOp::ALL {
        let y = b.unary(op, View::new(&xh, &l)).unwrap();
        let got = run(
            &["unary".into(), unary_code(op).to_string(), n.to_string()],
            &bits(&xh),
        );
        assert!(same(DType::F32, &got, &bits(&y)), "{op:?}");
        let dx = b
            .unary_backward(
                op,
                View::new(&xh, &l),
                View::new(&y, &l),
                View::new(&zh, &l),
            )
            .unwrap();
        let mut input = bits(&xh);
        input.extend(bits(&y));
        input.extend(bits(&zh));
        let got = run(
            &[
                "unary_backward".into(),
                unary_code(op).to_string(),
                n.to_string(),
            ],
            &input,
        );
        assert!(same(DType::F32, &got, &bits(&dx)), "{op:?} backward");
    }
    for op in BinaryOp::ALL {
        let y = b
            .binary(op, View::new(&xh, &l), View::new(&zh, &l))
            .unwrap();
        let mut input = bits(&xh);
        input.extend(bits(&zh));
        let got = run(
            &["binary".into(), binary_code(op).to_string(), n.to_string()],
            &input,
        );
        assert!(same(DType::F32, &got, &bits(&y)), "{op:?}");
    }
    let y = b.affine(View::new(&xh, &l), -1.5, 0.25).unwrap();
    let got = run(
        &[
            "affine".into(),
            "0".into(),
            n.to_string(),
            "-1.5".into(),
            "0.25".into(),
        ],
        &bits(&xh),
    );
    assert!(same(DType::F32, &got, &bits(&y)), "affine");
}

#[test]
fn adam_matches_the_cpu() {
    use kiln_core::AdamStep;
    if harness().is_none() {
        return;
    }
    let b = cpu();
    let n = 600;
    let finite = |salt| spread(n, salt);
    // The last case's state and gradient are near the subnormal range:
    // both sides store the moments flushed (kiln_core::flush_state).
    let cases = [
        (1u64, false, 0.0f32, 1.0f32),
        (7, false, 0.01, 1.0),
        (1000, true, 0.05, 1.0),
        (40, true, 0.0, 1e-36),
    ];
    for (step, decoupled, wd, scale) in cases {
        let s = AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
            weight_decay: wd,
            decoupled,
            step,
        };
        let p0 = HostData::F32(finite(3));
        let g = HostData::F32(finite(4).iter().map(|v| v * scale).collect());
        let m0 = HostData::F32(finite(5).iter().map(|v| v * 0.01 * scale).collect());
        let v0 = HostData::F32(finite(6).iter().map(|v| v * v * 1e-4 * scale).collect());
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        b.adam_update(&mut p, &g, &mut m, &mut v, &s).unwrap();
        if scale < 1.0 {
            assert!(
                flushed(&m, &m0) > 0 && flushed(&v, &v0) > 0,
                "no moment was flushed"
            );
        }
        let c = s.schedule().unwrap();
        let args = [
            "adam".to_string(),
            n.to_string(),
            c.lr_t.to_string(),
            s.beta1.to_string(),
            s.beta2.to_string(),
            s.eps.to_string(),
            c.decay.to_string(),
            c.l2.to_string(),
        ];
        assert!(
            emulated_step_matches(&args, &[&p0, &g, &m0, &v0], &[&p, &m, &v]),
            "adam step {step}"
        );
    }
}

#[test]
fn sgd_matches_the_cpu() {
    use kiln_core::SgdStep;
    if harness().is_none() {
        return;
    }
    let b = cpu();
    let n = 600;
    let finite = |salt| spread(n, salt);
    // The last two cases' velocity and gradient are near the subnormal
    // range: both sides store the velocity flushed and step with it.
    let cases = [
        (0.9f32, 0.0f32, false, 1.0f32),
        (0.9, 0.01, true, 1.0),
        (0.9, 0.0, false, 1e-38),
        (0.5, 0.0, true, 1e-38),
    ];
    for (momentum, wd, nesterov, scale) in cases {
        let s = SgdStep {
            lr: 0.1,
            momentum,
            weight_decay: wd,
            nesterov,
        };
        // Parameters small enough that steps from tiny state show.
        let p_scale = if scale < 1.0 { 1e-35 } else { 1.0 };
        let p0 = HostData::F32(finite(3).iter().map(|v| v * p_scale).collect());
        let g = HostData::F32(finite(4).iter().map(|v| v * scale).collect());
        let v0 = HostData::F32(finite(5).iter().map(|v| v * scale).collect());
        let (mut p, mut vel) = (p0.clone(), v0.clone());
        b.sgd_update(&mut p, &g, Some(&mut vel), &s).unwrap();
        if scale < 1.0 {
            assert!(flushed(&vel, &v0) > 0, "no velocity was flushed");
        }
        let args = [
            "sgd".to_string(),
            n.to_string(),
            s.lr.to_string(),
            s.momentum.to_string(),
            s.weight_decay.to_string(),
            u8::from(nesterov).to_string(),
        ];
        assert!(
            emulated_step_matches(&args, &[&p0, &g, &v0], &[&p, &vel]),
            "sgd momentum {momentum} nesterov {nesterov} scale {scale}"
        );
    }
}

/// Whether the harness's optimiser step `args`, fed `inputs`, prints the
/// bits of `outputs` (what the CPU's step left in place).
fn emulated_step_matches(args: &[String], inputs: &[&HostData], outputs: &[&HostData]) -> bool {
    let input: Vec<u64> = inputs.iter().flat_map(|h| bits(h)).collect();
    let want: Vec<u64> = outputs.iter().flat_map(|h| bits(h)).collect();
    same(DType::F32, &run(args, &input), &want)
}

/// Elements of optimiser state the step stored as zero that were not zero
/// before it (flushed, kiln_core::flush_state).
fn flushed(after: &HostData, before: &HostData) -> usize {
    let (a, b) = (host_f32(after), host_f32(before));
    a.iter()
        .zip(&b)
        .filter(|&(&a, &b)| a == 0.0 && b != 0.0)
        .count()
}

fn f32s(bits: &[u64]) -> Vec<f32> {
    bits.iter().map(|&b| f32::from_bits(b as u32)).collect()
}

fn host_f32(h: &HostData) -> Vec<f32> {
    h.to_f32_vec()
}

/// Every `got` within `tol[i]` of `want` (NaN matching NaN).
fn close(what: &str, got: &[f32], want: &[f32], tol: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= t;
        assert!(ok, "{what}: element {i}: {g} vs {w} (tolerance {t})");
    }
}

const EPS: f32 = 1.0 / 8_388_608.0; // 2⁻²³

#[test]
fn block_reductions_softmax_and_softmax_ce_match_the_cpu() {
    use kiln_core::ReduceOp;
    use kiln_cuda::launch::reduce_code;
    if harness().is_none() {
        return;
    }
    let b = cpu();
    for (rows, run) in [(1usize, 1usize), (3, 5), (2, 300), (5, 1000), (1, 4099)] {
        let mut xs = awkward(rows * run + 13, rows as u32)[13..].to_vec();
        if rows * run > 7 {
            xs[7] = 3.0; // a tie with itself is no tie; a repeated max:
            xs[5] = 3.0;
        }
        let l = Layout::contiguous(Shape::new(&[rows, run]).unwrap());
        let xh = HostData::F32(xs.clone());
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
            let want = host_f32(&b.reduce(op, View::new(&xh, &l), &[1]).unwrap());
            let got = f32s(&run_args(
                &[
                    "reduce",
                    &reduce_code(op).to_string(),
                    &rows.to_string(),
                    &run.to_string(),
                ],
                &bits(&xh),
            ));
            let tol: Vec<f32> = xs
                .chunks(run)
                .map(|r| match op {
                    ReduceOp::Sum => {
                        2.0 * run as f32 * EPS * r.iter().map(|v| v.abs()).sum::<f32>()
                    }
                    ReduceOp::Mean => 2.0 * EPS * r.iter().map(|v| v.abs()).sum::<f32>(),
                    _ => 0.0,
                })
                .collect();
            close(&format!("{op:?} {rows}×{run}"), &got, &want, &tol);
        }
        let want = bits(&b.argmax(View::new(&xh, &l)).unwrap());
        let got = run_args(&["argmax", &rows.to_string(), &run.to_string()], &bits(&xh));
        assert_eq!(got, want, "argmax {rows}×{run}");
        for log in [false, true] {
            let want = host_f32(&b.softmax(View::new(&xh, &l), log).unwrap());
            let got = f32s(&run_args(
                &[
                    "softmax",
                    &u8::from(log).to_string(),
                    &rows.to_string(),
                    &run.to_string(),
                ],
                &bits(&xh),
            ));
            let tol: Vec<f32> = want
                .iter()
                .map(|w| (run as f32 + 8.0) * EPS * w.abs().max(if log { 1.0 } else { 0.0 }))
                .collect();
            close(
                &format!("softmax(log={log}) {rows}×{run}"),
                &got,
                &want,
                &tol,
            );
        }
    }
    // Softmax-CE on finite logits.
    for (rows, c) in [(1usize, 1usize), (4, 10), (3, 1000)] {
        let xs: Vec<f32> = awkward(rows * c + 13, 9)[13..].to_vec();
        let labels: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % c as u32).collect();
        let (xh, yh) = (HostData::F32(xs.clone()), HostData::U32(labels.clone()));
        let (lx, ly) = (
            Layout::contiguous(Shape::new(&[rows, c]).unwrap()),
            Layout::contiguous(Shape::new(&[rows]).unwrap()),
        );
        let (loss, grad) = b
            .softmax_cross_entropy(View::new(&xh, &lx), View::new(&yh, &ly))
            .unwrap();
        let mut input = bits(&xh);
        input.extend(bits(&yh));
        let got = f32s(&run_args(
            &["xent", &rows.to_string(), &c.to_string()],
            &input,
        ));
        let (gl, gg) = got.split_at(rows);
        let scale = (c as f32 + 8.0) * EPS;
        let want_loss = host_f32(&loss);
        let tol: Vec<f32> = xs
            .chunks(c)
            .map(|r| scale * (4.0 + r.iter().fold(0f32, |m, v| m.max(v.abs()))))
            .collect();
        close("softmax-CE loss", gl, &want_loss, &tol);
        let want_grad = host_f32(&grad);
        let tol: Vec<f32> = want_grad.iter().map(|w| scale * (1.0 + w.abs())).collect();
        close("softmax-CE gradient", gg, &want_grad, &tol);
    }
}

fn run_args(args: &[&str], input: &[u64]) -> Vec<u64> {
    let owned: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    run(&owned, input)
}

/// One GEMM case: `[batch, m, k]·[batch, k, n]` in `dtype` (A or B stored
/// transposed when `ta`/`tb`), with bias, `β·C₀` and `act` as asked, run by
/// the harness `mode` (`gemm`: SIMT; `gemm_tc`: the tensor-core kernel of
/// `dtype`, f32 meaning TF32) and compared with the CPU within the dot
/// product's bound (plus TF32's input rounding, plus the 16-bit output's).
struct GemmCase {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    dtype: DType,
    bias: bool,
    c0: bool,
    act: kiln_core::Activation,
}

fn check_gemm(mode: &str, c: GemmCase) {
    use kiln_core::GemmEpilogue;
    use kiln_cuda::launch::activation_code;
    let b = cpu();
    let GemmCase {
        batch,
        m,
        n,
        k,
        ta,
        tb,
        dtype,
        ..
    } = c;
    let mk = |rows: usize, cols: usize, t: bool, salt: u32| {
        let v: Vec<f32> = (0..batch * rows * cols)
            .map(|i| {
                (((i as u32).wrapping_mul(2_654_435_761) ^ salt) >> 9) as f32 / 8_388_608.0 - 0.5
            })
            .collect();
        // Stored transposed when `t`: the view swaps the last two axes.
        let stored = if t {
            [batch, cols, rows]
        } else {
            [batch, rows, cols]
        };
        let l = Layout::contiguous(Shape::new(&stored).unwrap());
        let l = if t { l.transpose(1, 2).unwrap() } else { l };
        let flat = Layout::contiguous(Shape::new(&[v.len()]).unwrap());
        (
            b.cast(View::new(&HostData::F32(v), &flat), dtype).unwrap(),
            l,
        )
    };
    let (ah, la) = mk(m, k, ta, 1);
    let (bh, lb) = mk(k, n, tb, 2);
    let bias = HostData::F32((0..n).map(|i| i as f32 * 0.25 - 1.0).collect());
    let lbias = Layout::contiguous(Shape::new(&[n]).unwrap());
    let c0 = HostData::F32((0..batch * m * n).map(|i| (i % 7) as f32 - 3.0).collect());
    let lc0 = Layout::contiguous(Shape::new(&[batch, m, n]).unwrap());
    let (alpha, beta) = if mode == "gemm" {
        (0.75f32, -0.5f32)
    } else {
        (1.0, 0.0)
    };
    let ep = GemmEpilogue {
        alpha,
        beta_c: c.c0.then(|| (beta, View::new(&c0, &lc0))),
        bias: c.bias.then(|| View::new(&bias, &lbias)),
        activation: c.act,
    };
    let want = host_f32(
        &b.gemm(View::new(&ah, &la), View::new(&bh, &lb), &ep)
            .unwrap(),
    );
    // The bound: Σ|a||b| per output (a GEMM of absolute values).
    let abs = |h: &HostData| HostData::F32(h.to_f32_vec().iter().map(|v| v.abs()).collect());
    let sum_abs = host_f32(
        &b.gemm(
            View::new(&abs(&ah), &la),
            View::new(&abs(&bh), &lb),
            &GemmEpilogue::default(),
        )
        .unwrap(),
    );
    let tf32 = mode == "gemm_tc" && dtype == DType::F32;
    let input_round = if tf32 { 2.0 / 1024.0 } else { 0.0 };
    let out_round = match dtype {
        DType::BF16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
        _ => 0.0,
    };
    let tol: Vec<f32> = sum_abs
        .iter()
        .zip(&want)
        .map(|(s, w)| {
            (2.0 * (k as f32 + 2.0) * EPS + input_round) * (alpha * s + 4.0) + out_round * w.abs()
        })
        .collect();
    let mut args: Vec<String> = vec![
        mode.into(),
        dtype_code(dtype).to_string(),
        batch.to_string(),
        m.to_string(),
        n.to_string(),
        k.to_string(),
    ];
    for (l, len) in [(&la, ah.len()), (&lb, bh.len())] {
        args.push(l.offset().to_string());
        args.extend(l.strides().iter().map(usize::to_string));
        args.push(len.to_string());
    }
    args.extend([
        alpha.to_string(),
        beta.to_string(),
        activation_code(c.act).to_string(),
        dtype_code(dtype).to_string(),
        u8::from(c.bias).to_string(),
        u8::from(c.c0).to_string(),
    ]);
    let mut input = bits(&ah);
    input.extend(bits(&bh));
    if c.bias {
        input.extend(bits(&bias));
    }
    if c.c0 {
        input.extend(bits(&c0));
    }
    let got_bits = run(&args, &input);
    let got = host_f32(&HostData::from_bytes(dtype, &to_bytes(dtype, &got_bits)).unwrap());
    close(
        &format!("{mode} {batch}×{m}×{n}×{k} {dtype} tA={ta} tB={tb}"),
        &got,
        &want,
        &tol,
    );
}

#[test]
fn the_simt_gemm_matches_the_cpu_within_its_bound() {
    use kiln_core::Activation;
    if harness().is_none() {
        return;
    }
    let case = |batch, m, n, k, ta, tb, dtype, bias, c0, act| GemmCase {
        batch,
        m,
        n,
        k,
        ta,
        tb,
        dtype,
        bias,
        c0,
        act,
    };
    for c in [
        case(
            1,
            1,
            1,
            1,
            false,
            false,
            DType::F32,
            false,
            false,
            Activation::None,
        ),
        case(
            1,
            130,
            70,
            37,
            false,
            false,
            DType::F32,
            true,
            false,
            Activation::Relu,
        ),
        case(
            2,
            17,
            129,
            9,
            true,
            false,
            DType::F32,
            false,
            true,
            Activation::None,
        ),
        case(
            1,
            64,
            5,
            300,
            false,
            true,
            DType::F32,
            true,
            true,
            Activation::Tanh,
        ),
        case(
            1,
            33,
            40,
            21,
            true,
            true,
            DType::BF16,
            true,
            false,
            Activation::Sigmoid,
        ),
        case(
            1,
            20,
            24,
            16,
            false,
            false,
            DType::F16,
            false,
            false,
            Activation::None,
        ),
        case(
            1,
            8,
            8,
            0,
            false,
            false,
            DType::F32,
            true,
            false,
            Activation::None,
        ),
    ] {
        check_gemm("gemm", c);
    }
}

fn to_bytes(dtype: DType, bits: &[u64]) -> Vec<u8> {
    match dtype {
        DType::F16 | DType::BF16 => bits
            .iter()
            .flat_map(|&b| (b as u16).to_le_bytes())
            .collect(),
        _ => bits
            .iter()
            .flat_map(|&b| (b as u32).to_le_bytes())
            .collect(),
    }
}

#[test]
fn the_implicit_gemm_convolutions_match_the_cpu_within_their_bounds() {
    use kiln_core::Activation;
    use kiln_cuda::launch::{activation_code, ConvArg};
    if harness().is_none() {
        return;
    }
    let b = cpu();
    let cases = [
        ([2usize, 1, 9, 9], 4usize, Window2d::valid([3, 3], [1, 1])),
        (
            [1, 3, 8, 7],
            5,
            Window2d {
                kernel: [3, 2],
                stride: [2, 1],
                padding: [1, 1, 0, 1],
            },
        ),
        (
            [3, 2, 5, 6],
            2,
            Window2d {
                kernel: [2, 3],
                stride: [1, 2],
                padding: [1, 0, 1, 1],
            },
        ),
    ];
    let vals = |n: usize, salt: u32| -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2_654_435_761) ^ salt) >> 9) as f32 / 8_388_608.0 - 0.5
            })
            .collect()
    };
    for (xd, o, win) in cases {
        let wd = [o, xd[1], win.kernel[0], win.kernel[1]];
        let (xs, ws) = (vals(xd.iter().product(), 3), vals(wd.iter().product(), 4));
        let (xh, wh) = (HostData::F32(xs.clone()), HostData::F32(ws.clone()));
        let bias = HostData::F32((0..o).map(|i| i as f32 - 1.0).collect());
        let (lx, lw) = (
            Layout::contiguous(Shape::new(&xd).unwrap()),
            Layout::contiguous(Shape::new(&wd).unwrap()),
        );
        let lb = Layout::contiguous(Shape::new(&[o]).unwrap());
        let y = b
            .conv2d(
                View::new(&xh, &lx),
                View::new(&wh, &lw),
                Some(View::new(&bias, &lb)),
                Activation::Relu,
                &win,
            )
            .unwrap();
        let yd = kiln_core::conv::conv2d_output(&xd, &wd, Some(&[o]), &win).unwrap();
        let p = ConvArg::new(xd, o, &win, [yd[2], yd[3]]);
        let geometry: Vec<String> = [
            p.n, p.c, p.h, p.w, p.o, p.kh, p.kw, p.sh, p.sw, p.pt, p.pl, p.oh, p.ow,
        ]
        .iter()
        .map(i64::to_string)
        .collect();
        let patch = (xd[1] * wd[2] * wd[3]) as f32;
        // Inputs in [−0.5, 0.5]: each dot product's bound is below patch·2⁻²²·(1/4 + |bias|).
        let tol_for = |len: f32, want: &[f32]| -> Vec<f32> {
            want.iter()
                .map(|w| 2.0 * (len + 2.0) * EPS * (0.25 * len + 2.0 + w.abs()))
                .collect()
        };
        let mut args = vec!["conv".to_string()];
        args.extend(geometry.clone());
        args.extend([activation_code(Activation::Relu).to_string(), "1".into()]);
        let mut input = bits(&xh);
        input.extend(bits(&wh));
        input.extend(bits(&bias));
        let want = host_f32(&y);
        close(
            &format!("conv2d {xd:?} {win:?}"),
            &f32s(&run(&args, &input)),
            &want,
            &tol_for(patch, &want),
        );

        // Backward: a gradient of the output's shape.
        let dy = HostData::F32(vals(yd.iter().product(), 5));
        let ly = Layout::contiguous(Shape::new(&yd).unwrap());
        let dx = b
            .conv2d_backward_data(
                View::new(&dy, &ly),
                View::new(&wh, &lw),
                &win,
                [xd[2], xd[3]],
            )
            .unwrap();
        let mut args = vec!["conv_data".to_string()];
        args.extend(geometry.clone());
        args.extend(["0".into(), "0".into()]);
        let mut input = bits(&dy);
        input.extend(bits(&wh));
        let want = host_f32(&dx);
        let len = (o * wd[2] * wd[3]) as f32;
        close(
            &format!("conv2d_backward_data {xd:?} {win:?}"),
            &f32s(&run(&args, &input)),
            &want,
            &tol_for(len, &want),
        );

        let (dw, _db) = b
            .conv2d_backward_filter(View::new(&xh, &lx), View::new(&dy, &ly), &win)
            .unwrap();
        let k = (xd[0] * yd[2] * yd[3]) as i64;
        for chunk in [8i64, 24, k.max(8)] {
            let mut args = vec!["conv_filter".to_string()];
            args.extend(geometry.clone());
            args.extend([chunk.to_string(), "0".into()]);
            let mut input = bits(&xh);
            input.extend(bits(&dy));
            let want = host_f32(&dw);
            close(
                &format!("conv2d_backward_filter {xd:?} {win:?} chunk {chunk}"),
                &f32s(&run(&args, &input)),
                &want,
                &tol_for(k as f32, &want),
            );
        }
    }
}

/// The tensor-core GEMMs, with `mma.sync`, `ldmatrix` and `cp.async`
/// emulated from the PTX ISA's fragment layouts (`kernels/host/tc_emulation.h`):
/// tiling, pipelining, addressing and the epilogue mapping, against the CPU.
/// (An emulation written from the same reading of the ISA cannot catch a
/// misreading of it; the GPU conformance run can.) Contiguous operands, k
/// and n multiples of 8, as the backend sends them.
#[test]
fn the_tensor_core_gemms_match_the_cpu_under_emulation() {
    if harness().is_none() {
        return;
    }
    // One full tile, partial tiles in m, n and k, batch 2.
    let shapes = [
        (1, 128, 128, 32),
        (2, 130, 136, 40),
        (1, 8, 8, 8),
        (1, 40, 16, 72),
    ];
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for (batch, m, n, k) in shapes {
            check_gemm(
                "gemm_tc",
                GemmCase {
                    batch,
                    m,
                    n,
                    k,
                    ta: false,
                    tb: false,
                    dtype,
                    bias: true,
                    c0: false,
                    act: kiln_core::Activation::Relu,
                },
            );
        }
    }
}
