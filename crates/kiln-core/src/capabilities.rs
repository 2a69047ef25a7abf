//! What a backend declares about itself: where its kernels change
//! algorithm, and which op × dtype pairs it does not (yet) get right.
//!
//! [`Backend::capabilities`](crate::Backend::capabilities) returns a
//! [`Capabilities`]. The conformance suite aims its `blocked` size tier at
//! the [`SwitchPoints`] (each one − 1, itself and + 1), skips the checks a
//! backend declares unsupported, and reports declared expected failures as
//! such instead of as failures. The default is kiln's own kernels' switch
//! points, with everything supported.
//!
//! ```
//! use kiln_core::{Capabilities, DType, SwitchPoints};
//!
//! // A device whose GEMM works on 48-wide tiles and has no bf16 softmax yet.
//! let mut sp = SwitchPoints::default();
//! sp.gemm_m.push(48);
//! sp.gemm_n.push(48);
//! let caps = Capabilities {
//!     switch_points: sp,
//!     unsupported: vec!["softmax/bf16".into(), "log_softmax/bf16".into()],
//!     expected_failures: vec!["conv2d_*/f16".into()],
//! };
//! assert!(!caps.supports("softmax", DType::BF16));
//! assert!(caps.supports("softmax", DType::F32));
//! assert!(caps.expects_failure("conv2d_backward_filter", DType::F16));
//! assert!(caps.validate().is_ok());
//! ```

use crate::{DType, Error, Result};

/// Extents at which a backend's kernels switch path: tile widths, blocking
/// sizes, thread and block splits, split-K thresholds. The conformance
/// suite's `blocked` tier draws sizes at each point − 1, the point and + 1.
///
/// The defaults cover kiln's CPU kernel sets (micro-tiles 6×16, 8×32, 8×8;
/// `KC` 256 and 512, `MC` 192, `NC` 2048; 16-lane loops; work split over
/// threads past 65,536 elements; filter-gradient groups of 8 images, and
/// behind a max-pool 16 patch columns of 4 channels at a time) and its
/// CUDA kernels (128×128 tiles with a k step of 8, split-K chunks of 512,
/// 256-thread blocks of 32-lane warps). kiln's CPU backend derives its
/// `KC`, `MC` and `NC` from the caches of the machine it runs on and adds
/// them to these in its capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchPoints {
    /// GEMM row counts `m`: micro-tile heights, row blocks, device tiles.
    pub gemm_m: Vec<usize>,
    /// GEMM column counts `n`: micro-tile widths, column blocks.
    pub gemm_n: Vec<usize>,
    /// GEMM depths `k`: k steps and k blocks (2·KC + 1 crosses two).
    pub gemm_k: Vec<usize>,
    /// Row lengths (the last axis) where softmax, softmax cross-entropy,
    /// reductions and argmax change path: vector widths, warps, blocks.
    pub row: Vec<usize>,
    /// Element counts where elementwise, memory and optimiser ops change
    /// path: vector widths and unrolls, the split over threads.
    pub elements: Vec<usize>,
    /// Convolution patch lengths `c·kh·kw` (the implicit GEMM's k).
    pub conv_patch: Vec<usize>,
    /// Output channels of a convolution (the implicit GEMM's m).
    pub conv_channels: Vec<usize>,
    /// Batch sizes where the filter gradient's sum over images is grouped.
    pub conv_batch: Vec<usize>,
    /// `batch·oh·ow` lengths where the filter gradient's reduction is split
    /// (split-K chunks).
    pub conv_reduction: Vec<usize>,
}

impl Default for SwitchPoints {
    fn default() -> Self {
        SwitchPoints {
            gemm_m: vec![6, 8, 128, 192],
            gemm_n: vec![8, 16, 32, 128, 2048],
            gemm_k: vec![8, 256, 512],
            row: vec![16, 32, 256, 1024, 4096],
            elements: vec![16, 64, 256, 65_536],
            conv_patch: vec![8, 16, 256],
            conv_channels: vec![4, 8, 32, 128],
            conv_batch: vec![8, 16],
            conv_reduction: vec![512],
        }
    }
}

impl SwitchPoints {
    /// Adds `other`'s points to these (each list sorted, without repeats):
    /// the switch points of a backend that runs some ops on another.
    pub fn merge(&mut self, other: &SwitchPoints) {
        for (mine, theirs) in [
            (&mut self.gemm_m, &other.gemm_m),
            (&mut self.gemm_n, &other.gemm_n),
            (&mut self.gemm_k, &other.gemm_k),
            (&mut self.row, &other.row),
            (&mut self.elements, &other.elements),
            (&mut self.conv_patch, &other.conv_patch),
            (&mut self.conv_channels, &other.conv_channels),
            (&mut self.conv_batch, &other.conv_batch),
            (&mut self.conv_reduction, &other.conv_reduction),
        ] {
            mine.extend_from_slice(theirs);
            mine.sort_unstable();
            mine.dedup();
        }
    }

    /// Every list, named, for messages and reports.
    pub fn lists(&self) -> [(&'static str, &[usize]); 9] {
        [
            ("gemm_m", &self.gemm_m),
            ("gemm_n", &self.gemm_n),
            ("gemm_k", &self.gemm_k),
            ("row", &self.row),
            ("elements", &self.elements),
            ("conv_patch", &self.conv_patch),
            ("conv_channels", &self.conv_channels),
            ("conv_batch", &self.conv_batch),
            ("conv_reduction", &self.conv_reduction),
        ]
    }
}

/// What a backend declares about itself; see the [module docs](self).
///
/// Patterns name conformance checks as `op/dtype` (`gemm/bf16`), where the
/// op is a check's name from `kiln_conformance::CHECKS` and either part may
/// be `*`; an op ending in `*` matches by prefix (`conv2d_*/f16`). A bare
/// op (`softmax`) means every dtype.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Where the kernels change algorithm.
    pub switch_points: SwitchPoints,
    /// Checks the backend does not implement: skipped, reported as unsupported.
    pub unsupported: Vec<String>,
    /// Checks known to fail: run, and reported as expected failures.
    pub expected_failures: Vec<String>,
}

impl Capabilities {
    /// Whether the backend implements the check `op` for `dtype`.
    pub fn supports(&self, op: &str, dtype: DType) -> bool {
        !self.unsupported.iter().any(|p| matches(p, op, dtype))
    }

    /// Whether the check `op` for `dtype` is declared to fail.
    pub fn expects_failure(&self, op: &str, dtype: DType) -> bool {
        self.expected_failures.iter().any(|p| matches(p, op, dtype))
    }

    /// Checks that every pattern is well formed (a known dtype, a
    /// non-empty op) and that no switch point is zero.
    pub fn validate(&self) -> Result<()> {
        for p in self.unsupported.iter().chain(&self.expected_failures) {
            let (op, dt) = split(p);
            if op.is_empty() || (dt != "*" && parse_dtype(dt).is_none()) {
                return Err(Error::invalid(format!(
                    "capability pattern `{p}`: expected `op/dtype` with dtype one of f32, f16, bf16, u32 or `*`"
                )));
            }
        }
        for (name, points) in self.switch_points.lists() {
            if points.contains(&0) {
                return Err(Error::invalid(format!(
                    "switch point list `{name}` holds 0; points are extents ≥ 1"
                )));
            }
        }
        Ok(())
    }
}

fn split(pattern: &str) -> (&str, &str) {
    match pattern.split_once('/') {
        Some((op, dt)) => (op.trim(), dt.trim()),
        None => (pattern.trim(), "*"),
    }
}

fn parse_dtype(s: &str) -> Option<DType> {
    DType::ALL.into_iter().find(|d| d.as_str() == s)
}

fn matches(pattern: &str, op: &str, dtype: DType) -> bool {
    let (p_op, p_dt) = split(pattern);
    let op_ok = match p_op.strip_suffix('*') {
        Some(prefix) => op.starts_with(prefix),
        None => p_op == op,
    };
    op_ok && (p_dt == "*" || parse_dtype(p_dt) == Some(dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let caps = Capabilities {
            unsupported: vec!["gemm/bf16".into(), "unary_*".into(), "*/u32".into()],
            ..Capabilities::default()
        };
        assert!(!caps.supports("gemm", DType::BF16));
        assert!(caps.supports("gemm", DType::F32));
        assert!(caps.supports("gemm_epilogue", DType::BF16));
        assert!(!caps.supports("unary_exp", DType::F16));
        assert!(!caps.supports("cast", DType::U32));
        assert!(caps.validate().is_ok());
        let bad = Capabilities {
            expected_failures: vec!["gemm/f64".into()],
            ..Capabilities::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("gemm/f64"));
        let mut zero = Capabilities::default();
        zero.switch_points.row.push(0);
        assert!(zero.validate().is_err());
    }
}
