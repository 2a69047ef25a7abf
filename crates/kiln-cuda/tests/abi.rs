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
const ATTENTION: &str = include_str!("../../../kernels/attention.cu");

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
        (UnaryOp::Gelu, "OP_GELU"),
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
    let cases: [(&str, &str, &[&str]); 6] = [
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
        ("AttentionRows", ATTENTION, &["example", "row"]),
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

/// Every `extern "C" __global__` kernel in `kernels/*.cu`, as `(name,
/// [(type, parameter)])` with the C types written without spaces before
/// `*` (e.g. `const float*`).
fn kernel_signatures() -> Vec<(String, Vec<(String, String)>)> {
    let sources = [
        include_str!("../../../kernels/attention.cu"),
        include_str!("../../../kernels/conv.cu"),
        include_str!("../../../kernels/elementwise.cu"),
        include_str!("../../../kernels/gemm_simt.cu"),
        include_str!("../../../kernels/gemm_tc.cu"),
        include_str!("../../../kernels/embedding.cu"),
        include_str!("../../../kernels/memory.cu"),
        include_str!("../../../kernels/norm.cu"),
        include_str!("../../../kernels/optim.cu"),
        include_str!("../../../kernels/pool.cu"),
        include_str!("../../../kernels/random.cu"),
        include_str!("../../../kernels/reduce.cu"),
        include_str!("../../../kernels/softmax.cu"),
    ];
    let mut out = Vec::new();
    for src in sources {
        for (at, _) in src.match_indices("extern \"C\" __global__ void") {
            let decl = &src[at..];
            let open = decl.find('(').unwrap();
            // The name is the last word before the parameter list (after
            // any __launch_bounds__(…), which has its own parentheses).
            let mut head = &decl[..open];
            let mut rest = &decl[open..];
            if head.contains("__launch_bounds__") {
                let close = rest.find(')').unwrap();
                rest = &rest[close + 1..];
                let open = rest.find('(').unwrap();
                head = &rest[..open];
                rest = &rest[open..];
            }
            let name = head.split_whitespace().last().unwrap().to_string();
            let params = &rest[1..rest.find(')').unwrap()];
            let params = params
                .split(',')
                .map(|p| {
                    let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
                    let split = p.rfind([' ', '*']).unwrap();
                    let (ty, name) = p.split_at(split + 1);
                    (ty.trim().replace(" *", "*"), name.trim().to_string())
                })
                .collect();
            out.push((name, params));
        }
    }
    out
}

/// Whether the typed launcher's Rust field type passes what the C
/// parameter type takes.
fn passes(rust: &str, c: &str) -> bool {
    match rust {
        // Device addresses: read-only pointers are `const`, written ones not.
        "In" => c.starts_with("const ") && c.ends_with('*'),
        "Out" => !c.starts_with("const ") && c.ends_with('*'),
        "i32" => c == "int",
        "f32" => c == "float",
        "f64" => c == "double",
        "i64" | "u64" | "u32" | "u16" => c == rust,
        // The #[repr(C)] twins, checked field by field above.
        "Strided" | "MatrixArg" | "EpilogueArg" | "ConvArg" | "PoolArg" | "AttentionRows" => {
            c == rust
        }
        _ => false,
    }
}

/// Each typed launcher passes its kernel's parameters in the kernel's
/// order, with the kernel's names and types; every kernel has a launcher.
#[test]
fn every_launcher_matches_its_kernels_c_signature() {
    let kernels = kernel_signatures();
    assert_eq!(
        kernels.len(),
        36,
        "{:?}",
        kernels.iter().map(|k| &k.0).collect::<Vec<_>>()
    );
    for (name, params) in &kernels {
        let (_, rust) = kiln_cuda::launchers::SIGNATURES
            .iter()
            .find(|(k, _)| k == name)
            .unwrap_or_else(|| panic!("{name} has no typed launcher"));
        assert_eq!(rust.len(), params.len(), "{name}: parameter count");
        for (i, ((field, ty), (c_ty, c_name))) in rust.iter().zip(params).enumerate() {
            assert!(
                field.eq_ignore_ascii_case(c_name),
                "{name} parameter {i}: the launcher's `{field}` is the kernel's `{c_name}`"
            );
            assert!(
                passes(ty, c_ty),
                "{name} parameter {i} `{c_name}`: the launcher passes {ty}, the kernel takes {c_ty}"
            );
        }
    }
    assert_eq!(kiln_cuda::launchers::SIGNATURES.len(), kernels.len());
    // And the PTX the driver loads has exactly these entry points.
    let mut loaded: Vec<&str> = kiln_cuda::kernels::MODULES
        .iter()
        .flat_map(|(_, _, names)| names.iter().copied())
        .collect();
    let mut launched: Vec<&str> = kiln_cuda::launchers::SIGNATURES
        .iter()
        .map(|(k, _)| *k)
        .collect();
    loaded.sort();
    launched.sort();
    assert_eq!(loaded, launched);
}

/// The checker itself: a swapped or retyped parameter is caught.
#[test]
fn the_signature_check_catches_swaps_and_wrong_types() {
    let kernels = kernel_signatures();
    let (_, copy) = kernels.iter().find(|(n, _)| n == "kiln_copy").unwrap();
    assert_eq!(copy[0], ("const void*".to_string(), "src".to_string()));
    assert_eq!(copy[3], ("void*".to_string(), "dst".to_string()));
    assert!(passes("In", "const float*") && !passes("In", "float*"));
    assert!(passes("Out", "u32*") && !passes("Out", "const u32*"));
    assert!(!passes("f32", "double") && !passes("i32", "i64"));
}

/// A new `kernels/*.cu` cannot be left out of the signature check above,
/// of the emulation's sources or of the emulation's kernel table.
#[test]
fn every_kernel_file_is_checked_and_emulated() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kernels");
    let (this, emulator, table) = (
        include_str!("abi.rs"),
        include_str!("../src/emulator.rs"),
        include_str!("../../../kernels/host/emulator.cpp"),
    );
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.ends_with(".cu") {
            continue;
        }
        seen += 1;
        let path = format!("kernels/{name}\")");
        assert!(this.contains(&path), "{name} is not in kernel_signatures()");
        assert!(
            emulator.contains(&path),
            "{name} is not in the emulation's SOURCES"
        );
        assert!(
            table.contains(&format!("#include \"../{name}\"")),
            "{name} is not in emulator.cpp"
        );
    }
    assert!(seen >= 11, "{seen} kernel files");
}
