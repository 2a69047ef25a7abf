//! What the processor offers, and which kernel set to run.

use kiln_core::{Error, Result};

/// A family of CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelSet {
    /// Portable scalar loops: the reference every other set is checked against.
    Scalar,
}

impl KernelSet {
    /// Every kernel set this build knows, best last.
    pub const ALL: [KernelSet; 1] = [KernelSet::Scalar];

    /// The lowercase name (`scalar`), as `KILN_CPU` takes it.
    pub fn name(self) -> &'static str {
        match self {
            KernelSet::Scalar => "scalar",
        }
    }

    /// Parses a `KILN_CPU` value.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Ok(KernelSet::Scalar),
            other @ ("avx2" | "avx512" | "neon") => Err(Error::invalid(format!(
                "kernel set `{other}` is not part of this build yet; use KILN_CPU=scalar"
            ))),
            other => Err(Error::invalid(format!(
                "unknown kernel set `{other}`: expected scalar, avx2, avx512 or neon"
            ))),
        }
    }

    /// `Ok` if this processor can run the set.
    pub fn check_available(self) -> Result<()> {
        match self {
            KernelSet::Scalar => Ok(()),
        }
    }

    /// The best set this processor supports.
    pub fn best() -> Self {
        KernelSet::Scalar
    }

    /// `KILN_CPU` if set, else [`KernelSet::best`].
    pub fn from_env() -> Result<Self> {
        match std::env::var("KILN_CPU") {
            Ok(v) if !v.trim().is_empty() => {
                let set = Self::parse(&v)?;
                set.check_available()?;
                Ok(set)
            }
            _ => Ok(Self::best()),
        }
    }
}

/// The SIMD features this processor reports, by their usual names.
pub fn detected() -> Vec<&'static str> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) { v.push($f); }
            )*};
        }
        probe!(
            "sse4.2",
            "avx",
            "f16c",
            "fma",
            "avx2",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512bf16",
            "avx512fp16"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::arch::is_aarch64_feature_detected!($f) { v.push($f); }
            )*};
        }
        probe!("neon", "fp16", "bf16", "sve");
    }
    v
}

/// The processor's model name, as the OS reports it.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        assert_eq!(KernelSet::parse("Scalar").unwrap(), KernelSet::Scalar);
        let e = KernelSet::parse("sse9").unwrap_err().to_string();
        assert!(e.contains("unknown kernel set `sse9`"), "{e}");
    }
}
