//! Numbers written for people: in summaries, progress lines and the
//! messages that quote a flag's value back.

use std::fmt;

/// Magnitudes from this one up to [`PLAIN_BELOW`] are written as plain
/// decimals (compared in the number's own type: `1e-4f32` is plain).
const PLAIN_FROM: f64 = 1e-4;
/// Magnitudes from this one on are written in scientific notation.
const PLAIN_BELOW: f64 = 1e9;

/// A float as a person reads it: Rust's shortest digits that read back
/// to the same value, as a plain decimal for 0 and for magnitudes from
/// 10⁻⁴ to under 10⁹ (`0.001`, `3e-4` → `0.0003`), in scientific notation
/// otherwise (`1e-8`, `1e30`), so that an absurd flag value does not print
/// as thirty-one digits. The formatter's options apply to either form as
/// they do to the number itself (`{:.3}`, `{:>8}`: a precision may leave
/// a small plain number no digits); infinities and NaN print as Rust
/// prints them.
///
/// ```
/// use kiln_core::Number;
///
/// assert_eq!(Number(0.001f32).to_string(), "0.001");
/// assert_eq!(Number(1e-8f32).to_string(), "1e-8");
/// assert_eq!(Number(1e30f32).to_string(), "1e30");
/// assert_eq!(Number(2.5e12f64).to_string(), "2.5e12");
/// assert_eq!(format!("{:.2}", Number(1234.5678f64)), "1234.57");
/// assert_eq!(Number(f32::NAN).to_string(), "NaN");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Number<T>(pub T);

/// Writes `x` to `f` as a plain decimal or (not `plain`) in scientific
/// notation, with the formatter's own options (precision, width, sign).
fn write<T: fmt::Display + fmt::LowerExp>(
    f: &mut fmt::Formatter<'_>,
    x: T,
    plain: bool,
) -> fmt::Result {
    if plain {
        fmt::Display::fmt(&x, f)
    } else {
        fmt::LowerExp::fmt(&x, f)
    }
}

impl fmt::Display for Number<f32> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0.abs();
        let plain =
            !a.is_finite() || a == 0.0 || (PLAIN_FROM as f32..PLAIN_BELOW as f32).contains(&a);
        write(f, self.0, plain)
    }
}

impl fmt::Display for Number<f64> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0.abs();
        let plain = !a.is_finite() || a == 0.0 || (PLAIN_FROM..PLAIN_BELOW).contains(&a);
        write(f, self.0, plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_between_the_bounds_scientific_outside() {
        for (x, want) in [
            (0.0f32, "0"),
            (-0.0, "-0"),
            (1e-4, "0.0001"),
            (9.9e-5, "9.9e-5"),
            (3e-4, "0.0003"),
            (0.99, "0.99"),
            (123_456_780.0, "123456780"),
            (1e9, "1e9"),
            (-1e30, "-1e30"),
            (f32::MAX, "3.4028235e38"),
            (f32::INFINITY, "inf"),
        ] {
            assert_eq!(Number(x).to_string(), want, "{x:?}");
        }
        assert_eq!(Number(1e308f64).to_string(), "1e308");
        assert_eq!(Number(5e-324f64).to_string(), "5e-324");
        assert_eq!(format!("{:.1}", Number(2.5e-7f64)), "2.5e-7");
        assert_eq!(format!("{:.1}", Number(0.25f64)), "0.2");
        assert_eq!(
            format!("{:>6}|{:+}", Number(0.5f32), Number(1e10f64)),
            "   0.5|+1e10"
        );
    }
}
