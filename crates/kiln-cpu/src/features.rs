//! What the processor offers, and which kernel set to run.
//!
//! ```
//! use kiln_cpu::features::KernelSet;
//!
//! // The best set this processor runs, always available; the scalar set everywhere.
//! assert!(KernelSet::best().available());
//! assert!(KernelSet::Scalar.check_available().is_ok());
//! assert_eq!(KernelSet::parse("AVX2")?, KernelSet::Avx2);
//! assert!(KernelSet::parse("sse9").is_err());
//! # Ok::<(), kiln_core::Error>(())
//! ```

use kiln_core::{Error, Result};

/// A family of CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelSet {
    /// Portable scalar loops: the reference every other set is checked against.
    Scalar,
    /// x86-64 AVX2 + FMA (256-bit vectors).
    Avx2,
    /// x86-64 AVX-512F (512-bit vectors).
    Avx512,
    /// aarch64 NEON (128-bit vectors).
    Neon,
}

impl KernelSet {
    /// Every kernel set this build knows, best last per architecture.
    pub const ALL: [KernelSet; 4] = [
        KernelSet::Scalar,
        KernelSet::Avx2,
        KernelSet::Avx512,
        KernelSet::Neon,
    ];

    /// The lowercase name (`scalar`, `avx2`, `avx512`, `neon`), as `KILN_CPU` takes it.
    pub fn name(self) -> &'static str {
        match self {
            KernelSet::Scalar => "scalar",
            KernelSet::Avx2 => "avx2",
            KernelSet::Avx512 => "avx512",
            KernelSet::Neon => "neon",
        }
    }

    /// Parses a `KILN_CPU` value.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        KernelSet::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown kernel set `{s}`: expected scalar, avx2, avx512 or neon"
                ))
            })
    }

    /// `Ok` if this processor (and this build's architecture) can run the set.
    pub fn check_available(self) -> Result<()> {
        if self.available() {
            return Ok(());
        }
        let needs = match self {
            KernelSet::Scalar => "",
            KernelSet::Avx2 => "an x86-64 processor with AVX2 and FMA",
            KernelSet::Avx512 => "an x86-64 processor with AVX-512F, AVX2 and FMA",
            KernelSet::Neon => "an aarch64 processor",
        };
        Err(Error::invalid(format!(
            "kernel set `{}` needs {needs}; this is {} with [{}] (see `kiln info`, or use KILN_CPU={})",
            self.name(),
            std::env::consts::ARCH,
            detected().join(" "),
            Self::best().name()
        )))
    }

    /// Whether this processor can run the set.
    pub fn available(self) -> bool {
        match self {
            KernelSet::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            KernelSet::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            // The AVX-512 set also uses the AVX2 micro-kernel for narrow
            // outputs; every AVX-512 processor has AVX2 and FMA.
            KernelSet::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            KernelSet::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The best set this processor supports.
    pub fn best() -> Self {
        [KernelSet::Avx512, KernelSet::Avx2, KernelSet::Neon]
            .into_iter()
            .find(|k| k.available())
            .unwrap_or(KernelSet::Scalar)
    }

    /// `KILN_CPU` if set, else [`KernelSet::best`].
    pub fn from_env() -> Result<Self> {
        match kiln_core::env::setting("KILN_CPU")? {
            Some(v) => {
                let set = Self::parse(&v)?;
                set.check_available()?;
                Ok(set)
            }
            None => Ok(Self::best()),
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
        // Reported only where the operating system also grants the tiles
        // (the bf16 GEMM then runs on them).
        if crate::gemm::amx::available() {
            v.push("amx-bf16");
        }
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
