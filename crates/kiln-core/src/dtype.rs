//! Element types and host-side buffers.
//!
//! ```
//! use kiln_core::{DType, HostData};
//!
//! assert_eq!(DType::BF16.size_in_bytes(), 2);
//! let h = HostData::F32(vec![1.5, -2.0]);
//! assert_eq!(h.dtype(), DType::F32);
//! // Little-endian bytes, as model files store them.
//! let back = HostData::from_bytes(DType::F32, h.as_bytes())?;
//! assert_eq!(back, h);
//! assert_eq!(back.to_f64_vec(), [1.5, -2.0]);
//! // A byte count that is not a whole number of elements is an error.
//! assert!(HostData::from_bytes(DType::F32, &[0, 0, 0]).is_err());
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::Error;

/// The element type of a tensor's storage.
///
/// `F32` is supported by every op. `F16` and `BF16` are storage formats whose
/// ops compute in f32 and round once on store. `U32` holds integer data (class
/// labels, argmax indices) and is accepted only by the ops that document it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16: binary32 with the mantissa cut to 7 bits.
    BF16,
    /// Unsigned 32-bit integer (labels, indices).
    U32,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::U32];

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The lowercase name used on the command line and in files (`f32`, `bf16`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
        }
    }

    /// Whether the dtype holds floating-point values.
    pub fn is_float(self) -> bool {
        !matches!(self, DType::U32)
    }

    /// Unit roundoff `u` of the format (half the distance from 1 to the next
    /// representable number): 2⁻²⁴ for f32, 2⁻¹¹ for f16, 2⁻⁸ for bf16, 0 for integers.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            DType::F32 => f64::from(f32::EPSILON) / 2.0,
            DType::F16 => f64::from(f16::EPSILON) / 2.0,
            DType::BF16 => f64::from(bf16::EPSILON) / 2.0,
            DType::U32 => 0.0,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        DType::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown dtype `{s}`: expected one of f32, f16, bf16, u32"
                ))
            })
    }
}

/// A buffer of elements in host memory, tagged with its dtype.
///
/// This is what crosses the boundary between the host and a backend:
/// [`crate::Backend::upload`] takes one and [`crate::Backend::download`] returns one.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// u32 elements.
    U32(Vec<u32>),
}

impl HostData {
    /// The dtype of the elements.
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
            HostData::U32(_) => DType::U32,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::U32(v) => v.len(),
        }
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes of the buffer (zero-copy).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::F16(v) => bytemuck::cast_slice(v),
            HostData::BF16(v) => bytemuck::cast_slice(v),
            HostData::U32(v) => bytemuck::cast_slice(v),
        }
    }

    /// Rebuilds a buffer from raw little-endian bytes, checking the length.
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Result<Self, Error> {
        let size = dtype.size_in_bytes();
        if !bytes.len().is_multiple_of(size) {
            return Err(Error::invalid(format!(
                "{} bytes is not a whole number of {dtype} elements ({size} bytes each)",
                bytes.len()
            )));
        }
        // `pod_collect_to_vec` copies, so the input needs no particular alignment.
        Ok(match dtype {
            DType::F32 => HostData::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => HostData::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => HostData::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::U32 => HostData::U32(bytemuck::pod_collect_to_vec(bytes)),
        })
    }

    /// Every element widened to f64 (exact for all dtypes).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            HostData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            HostData::F16(v) => v.iter().map(|&x| x.to_f64()).collect(),
            HostData::BF16(v) => v.iter().map(|&x| x.to_f64()).collect(),
            HostData::U32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        }
    }

    /// Every element converted to f32 (exact for the float dtypes; u32 above 2²⁴ rounds).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => v.iter().map(|&x| x.to_f32()).collect(),
            HostData::BF16(v) => v.iter().map(|&x| x.to_f32()).collect(),
            HostData::U32(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

/// Rounds `x` to the nearest number (ties to even) of a binary format with
/// `p` significand bits, minimum normal exponent `emin` and largest finite
/// value `max`, returned as f64. Exact: no intermediate rounding.
pub fn round_to_format(x: f64, p: i32, emin: i32, max: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let biased = ((x.to_bits() >> 52) & 0x7ff) as i32;
    let e = (biased - 1023).max(emin);
    // A power of two, so x / q and the product are exact.
    let q = 2f64.powi(e - (p - 1));
    let r = (x / q).round_ties_even() * q;
    if r.abs() > max {
        f64::INFINITY.copysign(x)
    } else {
        r
    }
}

/// `x` correctly rounded to f16 (`half`'s own `from_f64` is not relied on).
pub fn f16_from_f64(x: f64) -> f16 {
    if x.is_nan() {
        return f16::NAN;
    }
    // The rounded value is an f32, so this conversion is exact.
    f16::from_f32(round_to_format(x, 11, -14, f16::MAX.to_f64()) as f32)
}

/// `x` correctly rounded to bf16 (`half` 2.x's `bf16::from_f64` can be off
/// by one ulp, so it is not used).
pub fn bf16_from_f64(x: f64) -> bf16 {
    if x.is_nan() {
        return bf16::NAN;
    }
    bf16::from_f32(round_to_format(x, 8, -126, bf16::MAX.to_f64()) as f32)
}

/// Host memory is the CPU backend's storage.
impl crate::BackendStorage for HostData {
    fn dtype(&self) -> DType {
        HostData::dtype(self)
    }
    fn len(&self) -> usize {
        HostData::len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.as_str().parse::<DType>().unwrap(), d);
        }
        assert!("f64".parse::<DType>().is_err());
    }

    #[test]
    fn unit_roundoff_matches_format() {
        assert_eq!(DType::F32.unit_roundoff(), 2f64.powi(-24));
        assert_eq!(DType::F16.unit_roundoff(), 2f64.powi(-11));
        assert_eq!(DType::BF16.unit_roundoff(), 2f64.powi(-8));
    }

    #[test]
    fn f64_to_half_rounds_correctly() {
        // Between bf16 neighbours 1.828125 and 1.8359375: the midpoint ties to
        // the even one, anything above it goes up.
        let mid = (1.828125 + 1.8359375) / 2.0;
        assert_eq!(bf16_from_f64(mid).to_f64(), 1.828125);
        assert_eq!(bf16_from_f64(mid + 1e-12).to_f64(), 1.8359375);
        assert_eq!(bf16_from_f64(-mid).to_f64(), -1.828125);
        assert!(bf16_from_f64(1e39).to_f64().is_infinite());
        assert_eq!(f16_from_f64(65519.0).to_f64(), 65504.0);
        assert!(f16_from_f64(65520.0).to_f64().is_infinite());
        assert_eq!(f16_from_f64(2f64.powi(-25)).to_f64(), 0.0); // tie to even (0)
        assert_eq!(f16_from_f64(2f64.powi(-25) * 1.5).to_f64(), 2f64.powi(-24));
        assert!(bf16_from_f64(f64::NAN).is_nan());
        // Agrees with the (correct) f32 conversions on every f32 sampled.
        for bits in (0u32..u32::MAX).step_by(65_521) {
            let x = f32::from_bits(bits);
            if x.is_finite() {
                assert_eq!(
                    bf16_from_f64(f64::from(x)).to_bits(),
                    bf16::from_f32(x).to_bits(),
                    "{x:e}"
                );
                assert_eq!(
                    f16_from_f64(f64::from(x)).to_bits(),
                    f16::from_f32(x).to_bits(),
                    "{x:e}"
                );
            }
        }
    }

    #[test]
    fn bytes_round_trip_and_reject_ragged() {
        let h = HostData::F32(vec![1.0, -2.5, f32::INFINITY]);
        let back = HostData::from_bytes(DType::F32, h.as_bytes()).unwrap();
        assert_eq!(back, h);
        assert!(HostData::from_bytes(DType::F32, &[0u8; 7]).is_err());
    }
}
