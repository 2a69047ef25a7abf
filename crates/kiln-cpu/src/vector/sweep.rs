//! The accuracy sweep every vector transcendental is tested with.

use kiln_core::{bounds, UnaryOp};

/// Runs `kernel`, a vector `op`, over every 61st f32 bit pattern (≈ 70
/// million inputs, all magnitudes, both signs, subnormals, ±0, ±∞ and NaNs)
/// and compares with the f64 oracle ([`UnaryOp::eval_f64`]) rounded to f32:
/// finite results within the ulps kiln-core states for the op
/// ([`bounds::unary_ulps`]), non-finite ones exactly (NaN for NaN, the
/// right infinity).
pub(crate) fn sweep(kernel: impl Fn(&[f32], &mut [f32]), op: UnaryOp) {
    let ulps = i64::from(bounds::unary_ulps(op).expect("a transcendental with an ulp bound"));
    let xs: Vec<f32> = (0..u32::MAX).step_by(61).map(f32::from_bits).collect();
    let mut out = vec![0f32; xs.len()];
    kernel(&xs, &mut out);
    // Distance in ulps: map bit patterns onto a monotone integer line.
    let key = |v: f32| {
        let b = i64::from(v.to_bits());
        if b & (1 << 31) != 0 {
            -(b & 0x7fff_ffff)
        } else {
            b
        }
    };
    let mut worst = (0i64, 0f32);
    for (&x, &y) in xs.iter().zip(&out) {
        let want = op.eval_f64(f64::from(x)) as f32;
        if !want.is_finite() || !y.is_finite() {
            assert!(
                want.is_nan() && y.is_nan() || want == y,
                "f({x:e}) = {y:e}, want {want:e}"
            );
            continue;
        }
        let d = (key(y) - key(want)).abs();
        if d > worst.0 {
            worst = (d, x);
        }
    }
    eprintln!("worst: {} ulps at x = {:e}", worst.0, worst.1);
    assert!(worst.0 <= ulps, "off by {} ulps at {:e}", worst.0, worst.1);
}
