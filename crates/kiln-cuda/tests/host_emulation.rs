//! kiln's grid-stride CUDA kernels, compiled for the CPU with g++ through
//! `kernels/host/shim.h` and run serially, against the CPU backend, bit
//! for bit: the Philox draws, the strided converting copy (every pair of
//! types, transposed, sliced and broadcast views), max-pooling forward
//! and backward (padding, overlapping windows, ties and NaN), every unary
//! op and its gradient, every binary op, affine, and Adam. This checks
//! the kernels' logic on a machine without a GPU; what it cannot check —
//! block-wide kernels, tensor cores, the GPU's own math library — the
//! conformance suite checks on a GPU (`ci/gpu.sh run`).
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
            .args(["-std=c++20", "-O1", "-Wall", "-Wno-unknown-pragmas", "-I"])
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
    for op in [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Square,
        UnaryOp::Recip,
        UnaryOp::Relu,
        UnaryOp::Sigmoid,
        UnaryOp::Tanh,
    ] {
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
    for op in [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Maximum,
        BinaryOp::Minimum,
        BinaryOp::Eq,
        BinaryOp::Gt,
        BinaryOp::Ge,
    ] {
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
    let finite = |salt| awkward(n + 13, salt)[13..].to_vec();
    for (step, decoupled, wd) in [(1u64, false, 0.0f32), (7, false, 0.01), (1000, true, 0.05)] {
        let s = AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
            weight_decay: wd,
            decoupled,
            step,
        };
        let (p0, g) = (HostData::F32(finite(3)), HostData::F32(finite(4)));
        let m0 = HostData::F32(finite(5).iter().map(|v| v * 0.01).collect());
        let v0 = HostData::F32(finite(6).iter().map(|v| v * v * 1e-4).collect());
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        b.adam_update(&mut p, &g, &mut m, &mut v, &s).unwrap();
        let c = s.schedule().unwrap();
        let mut input = bits(&p0);
        for h in [&g, &m0, &v0] {
            input.extend(bits(h));
        }
        let args: Vec<String> = [
            "adam".to_string(),
            n.to_string(),
            c.lr_t.to_string(),
            s.beta1.to_string(),
            s.beta2.to_string(),
            s.eps.to_string(),
            c.decay.to_string(),
            c.l2.to_string(),
        ]
        .to_vec();
        let got = run(&args, &input);
        let want: Vec<u64> = [bits(&p), bits(&m), bits(&v)].concat();
        assert!(same(DType::F32, &got, &want), "adam step {step}");
    }
}
