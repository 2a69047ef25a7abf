//! Calls a SIMD kernel set sends to the scalar loops are counted per op
//! and reason (`Backend::slow_paths`), never silent; the vector paths and
//! the scalar reference itself count nothing.

use kiln_core::slow_path::{since, SlowPath};
use kiln_core::{Backend, BinaryOp, HostData, Layout, ReduceOp, Shape, UnaryOp, View};
use kiln_cpu::{CpuBackend, KernelSet};

fn simd_sets() -> Vec<CpuBackend> {
    [KernelSet::Avx512, KernelSet::Avx2, KernelSet::Neon]
        .into_iter()
        .filter(|k| k.available())
        .map(|k| CpuBackend::with_kernels(k).expect("available"))
        .collect()
}

fn matrix(r: usize, c: usize) -> (HostData, Layout) {
    let data = HostData::F32((0..r * c).map(|i| i as f32 * 0.25 - 3.0).collect());
    (data, Layout::contiguous(Shape::new(&[r, c]).unwrap()))
}

fn one(op: &str, reason: &str, calls: u64) -> SlowPath {
    SlowPath {
        op: op.into(),
        reason: reason.into(),
        calls,
    }
}

#[test]
fn strided_and_uncovered_calls_are_counted_with_their_reason() {
    for b in simd_sets() {
        let (x, l) = matrix(8, 16);
        let (y, _) = matrix(8, 16);
        let xv = View::new(&x, &l);
        // The vector paths: nothing counted.
        b.unary(UnaryOp::Exp, xv).unwrap();
        b.binary(BinaryOp::Add, xv, View::new(&y, &l)).unwrap();
        b.reduce(ReduceOp::Sum, xv, &[1]).unwrap();
        b.softmax(xv, false).unwrap();
        assert_eq!(b.slow_paths(), vec![], "{}", b.name());

        // A transposed view, twice; a mixed-dtype pair; a max reduction.
        let t = l.transpose(0, 1).unwrap();
        let (sq, lsq) = matrix(16, 16);
        let tsq = lsq.transpose(0, 1).unwrap();
        let before = b.slow_paths();
        b.unary(UnaryOp::Exp, View::new(&x, &t)).unwrap();
        b.unary(UnaryOp::Tanh, View::new(&x, &t)).unwrap();
        b.binary(BinaryOp::Mul, View::new(&sq, &tsq), View::new(&sq, &tsq))
            .unwrap();
        let l3 = Layout::contiguous(Shape::new(&[2, 4, 16]).unwrap());
        b.reduce(ReduceOp::Sum, View::new(&x, &l3), &[1]).unwrap();
        b.reduce(ReduceOp::Max, xv, &[1]).unwrap();
        let added = since(&before, &b.slow_paths());
        assert_eq!(
            added,
            vec![
                one("binary", "strided operand: scalar loops", 1),
                one(
                    "reduce",
                    "axes neither leading nor trailing: scalar loops",
                    1
                ),
                one("reduce", "max/min reduction: scalar loops", 1),
                one("unary", "strided operand: scalar loops", 2),
            ],
            "{}",
            b.name()
        );

        // Clones count into one; an empty operand is not a slow path.
        let c = b.clone();
        let (e, le) = matrix(0, 16);
        let te = le.transpose(0, 1).unwrap();
        c.unary(UnaryOp::Exp, View::new(&e, &te)).unwrap();
        c.unary(UnaryOp::Exp, View::new(&x, &t)).unwrap();
        let unary = b
            .slow_paths()
            .into_iter()
            .find(|s| s.op == "unary")
            .unwrap();
        assert_eq!(unary.calls, 3, "{}", b.name());
    }
}

#[test]
fn the_scalar_reference_has_no_slow_paths() {
    let b = CpuBackend::reference();
    let (x, l) = matrix(8, 16);
    let t = l.transpose(0, 1).unwrap();
    b.unary(UnaryOp::Exp, View::new(&x, &t)).unwrap();
    b.reduce(ReduceOp::Max, View::new(&x, &l), &[0]).unwrap();
    assert_eq!(b.slow_paths(), vec![]);
}

#[test]
fn a_shape_error_is_an_error_not_a_slow_path() {
    for b in simd_sets() {
        let (x, l) = matrix(8, 16);
        let (y, ly) = matrix(16, 8);
        assert!(b
            .binary(BinaryOp::Add, View::new(&x, &l), View::new(&y, &ly))
            .is_err());
        assert_eq!(b.slow_paths(), vec![], "{}", b.name());
    }
}

/// An operand broadcast along its trailing axes (a `[rows, 1]` sum widened
/// to `[rows, n]`, as softmax's gradient has) runs on the vector path, with
/// the reference's bits, either side of the op, at 2-D and 3-D.
#[test]
fn trailing_broadcasts_are_vector_calls_with_the_reference_bits() {
    let reference = CpuBackend::reference();
    for b in simd_sets() {
        let before = b.slow_paths();
        for dims in [vec![8usize, 16], vec![3, 5, 33]] {
            let rows: usize = dims[..dims.len() - 1].iter().product();
            let (x, _) = matrix(rows, dims[dims.len() - 1]);
            let xl = Layout::contiguous(Shape::new(&dims).unwrap());
            let col = HostData::F32((0..rows).map(|i| 1.5 - i as f32 * 0.375).collect());
            let mut kept = dims.clone();
            *kept.last_mut().unwrap() = 1;
            let cl = Layout::contiguous(Shape::new(&kept).unwrap())
                .broadcast_as(&Shape::new(&dims).unwrap())
                .unwrap();
            for op in [BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
                for swap in [false, true] {
                    let (p, q) = (View::new(&x, &xl), View::new(&col, &cl));
                    let (p, q) = if swap { (q, p) } else { (p, q) };
                    let got = b.binary(op, p, q).unwrap();
                    let want = reference.binary(op, p, q).unwrap();
                    assert_eq!(got, want, "{} {op:?} swap={swap} {dims:?}", b.name());
                }
            }
        }
        assert_eq!(since(&before, &b.slow_paths()), vec![], "{}", b.name());
    }
}
