//! The host and the kernels agree on their interface without a GPU to
//! find out: the codes `launch.rs` sends are the `#define`s the kernels
//! switch on, and each `#[repr(C)]` argument struct has the fields of its
//! C twin, in order.

use kiln_core::{Activation, BinaryOp, DType, ReduceOp, UnaryOp};
use kiln_cuda::launch::{activation_code, binary_code, dtype_code, reduce_code, unary_code};

const COMMON: &str = include_str!("../../../kernels/common.cuh");
const ELEMENTWISE: &str = include_str!("../../../kernels/elementwise.cu");
const REDUCE: &str = include_str!("../../../kernels/reduce.cu");
const SIMT: &str = include_str!("../../../kernels/simt_gemm.cuh");
const CONV: &str = include_str!("../../../kernels/conv.cu");
const POOL: &str = include_str!("../../../kernels/pool.cu");

/// The value of `#define NAME value` in `src`.
fn define(src: &str, name: &str) -> i32 {
    src.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("#define") && w.next() == Some(name))
                .then(|| w.next().and_then(|v| v.parse().ok()))
                .flatten()
        })
        .unwrap_or_else(|| panic!("no #define {name}"))
}

/// The field names of `struct NAME { … };` in `src`, in order.
fn fields(src: &str, name: &str) -> Vec<String> {
    let start = src
        .find(&format!("struct {name} {{"))
        .unwrap_or_else(|| panic!("no struct {name}"));
    let body = &src[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find("};").unwrap()];
    body.split(';')
        .flat_map(|decl| {
            let decl = decl
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join(" ");
            let decl = decl.trim();
            if decl.is_empty() || decl.contains('(') {
                return Vec::new();
            }
            // "i64 offset, bs, rs, cs" or "const void* data" or "i64 dims[6]".
            let mut words = decl.splitn(2, |c: char| c.is_whitespace());
            let ty = words.next().unwrap_or("");
            let rest = words.next().unwrap_or("");
            let rest = if ty == "const" {
                rest.split_once(' ').map_or("", |(_, r)| r)
            } else {
                rest
            };
            rest.split(',')
                .map(|f| {
                    f.trim()
                        .trim_start_matches('*')
                        .split('[')
                        .next()
                        .unwrap()
                        .trim()
                        .to_string()
                })
                .collect()
        })
        .collect()
}

#[test]
fn codes_are_the_kernels_defines() {
    for (d, name) in [
        (DType::F32, "KILN_F32"),
        (DType::F16, "KILN_F16"),
        (DType::BF16, "KILN_BF16"),
        (DType::U32, "KILN_U32"),
    ] {
        assert_eq!(dtype_code(d), define(COMMON, name), "{name}");
    }
    for (op, name) in [
        (UnaryOp::Neg, "OP_NEG"),
        (UnaryOp::Abs, "OP_ABS"),
        (UnaryOp::Exp, "OP_EXP"),
        (UnaryOp::Log, "OP_LOG"),
        (UnaryOp::Sqrt, "OP_SQRT"),
        (UnaryOp::Square, "OP_SQUARE"),
        (UnaryOp::Recip, "OP_RECIP"),
        (UnaryOp::Relu, "OP_RELU"),
        (UnaryOp::Sigmoid, "OP_SIGMOID"),
        (UnaryOp::Tanh, "OP_TANH"),
    ] {
        assert_eq!(unary_code(op), define(COMMON, name), "{name}");
    }
    assert_eq!(activation_code(Activation::None), define(COMMON, "OP_NONE"));
    for (op, name) in [
        (BinaryOp::Add, "B_ADD"),
        (BinaryOp::Sub, "B_SUB"),
        (BinaryOp::Mul, "B_MUL"),
        (BinaryOp::Div, "B_DIV"),
        (BinaryOp::Maximum, "B_MAX"),
        (BinaryOp::Minimum, "B_MIN"),
        (BinaryOp::Eq, "B_EQ"),
        (BinaryOp::Gt, "B_GT"),
    ] {
        assert_eq!(binary_code(op), define(ELEMENTWISE, name), "{name}");
    }
    // B_GE is the kernel's default branch: the one code left.
    assert_eq!(binary_code(BinaryOp::Ge), 8);
    for (op, name) in [
        (ReduceOp::Sum, "R_SUM"),
        (ReduceOp::Mean, "R_MEAN"),
        (ReduceOp::Max, "R_MAX"),
        (ReduceOp::Min, "R_MIN"),
    ] {
        assert_eq!(reduce_code(op), define(REDUCE, name), "{name}");
    }
    assert_eq!(
        kiln_cuda::launch::MAX_RANK as i32,
        define(COMMON, "KILN_MAX_RANK")
    );
    assert_eq!(
        kiln_cuda::launch::THREADS as i32,
        define(REDUCE, "REDUCE_THREADS")
    );
    assert_eq!(kiln_cuda::launch::TILE as i32, define(SIMT, "SG_BM"));
    assert_eq!(kiln_cuda::launch::SIMT_BK as i32, define(SIMT, "SG_BK"));
}

#[test]
fn argument_structs_have_their_c_twins_fields_in_order() {
    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "Strided",
            COMMON,
            &["rank", "pad", "offset", "dims", "strides"],
        ),
        (
            "MatrixArg",
            SIMT,
            &["data", "dtype", "pad", "offset", "bs", "rs", "cs"],
        ),
        (
            "EpilogueArg",
            SIMT,
            &[
                "out", "c0", "bias", "alpha", "beta", "act", "dtype", "m", "n",
            ],
        ),
        (
            "ConvArg",
            CONV,
            &[
                "n", "c", "h", "w", "o", "kh", "kw", "sh", "sw", "pt", "pl", "oh", "ow",
            ],
        ),
        (
            "PoolArg",
            POOL,
            &[
                "planes", "h", "w", "kh", "kw", "sh", "sw", "pt", "pl", "oh", "ow",
            ],
        ),
    ];
    for (name, src, rust_fields) in cases {
        assert_eq!(fields(src, name), rust_fields.to_vec(), "struct {name}");
    }
}
