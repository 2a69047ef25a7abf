//! What a run costs: peak resident memory and, where the machine exposes
//! it, energy — the CPU packages' RAPL counters under
//! `/sys/class/powercap` (Linux, Intel and recent AMD). Where a counter is
//! missing the value is `None`, reported as "not available".
//!
//! ```
//! use kiln_train::observe::{peak_rss_bytes, EnergyMeter};
//!
//! // The process's peak resident memory, where the OS says (Linux: /proc).
//! if let Some(bytes) = peak_rss_bytes() {
//!     assert!(bytes > 0);
//! }
//! // Energy from RAPL counters, where the machine exposes them (often not in VMs).
//! if let Some(meter) = EnergyMeter::new() {
//!     let a = meter.read().unwrap();
//!     let b = meter.read().unwrap();
//!     assert!(meter.joules(&a, &b) >= 0.0);
//! }
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::path::PathBuf;

/// The process's peak resident set so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One RAPL package counter: where it is and where it wraps.
#[derive(Clone, Debug)]
struct Counter {
    energy: PathBuf,
    range_uj: u64,
}

/// Reads the CPU packages' energy counters; the difference between two
/// readings is the energy used in between (all packages, wrap-around
/// handled).
#[derive(Clone, Debug)]
pub struct EnergyMeter {
    counters: Vec<Counter>,
}

/// A reading of every counter, in microjoules.
#[derive(Clone, Debug)]
pub struct EnergyReading(Vec<u64>);

impl EnergyMeter {
    /// The package-level RAPL counters of this machine, if it has readable
    /// ones.
    pub fn new() -> Option<Self> {
        let root = std::path::Path::new("/sys/class/powercap");
        let mut counters = Vec::new();
        for entry in std::fs::read_dir(root).ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Packages are `intel-rapl:N`; `intel-rapl:N:M` are their parts.
            let package = name
                .strip_prefix("intel-rapl:")
                .is_some_and(|rest| !rest.contains(':'));
            if !package {
                continue;
            }
            let dir = entry.path();
            let range_uj = std::fs::read_to_string(dir.join("max_energy_range_uj"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(u64::MAX);
            let energy = dir.join("energy_uj");
            if std::fs::read_to_string(&energy).is_ok() {
                counters.push(Counter { energy, range_uj });
            }
        }
        counters.sort_by(|a, b| a.energy.cmp(&b.energy));
        (!counters.is_empty()).then_some(EnergyMeter { counters })
    }

    /// The counters now.
    pub fn read(&self) -> Option<EnergyReading> {
        self.counters
            .iter()
            .map(|c| std::fs::read_to_string(&c.energy).ok()?.trim().parse().ok())
            .collect::<Option<Vec<u64>>>()
            .map(EnergyReading)
    }

    /// Joules used between two readings.
    pub fn joules(&self, from: &EnergyReading, to: &EnergyReading) -> f64 {
        self.counters
            .iter()
            .zip(from.0.iter().zip(&to.0))
            .map(|(c, (&a, &b))| {
                if b >= a {
                    b - a
                } else {
                    // The counter wrapped.
                    c.range_uj.saturating_sub(a).saturating_add(b)
                }
            })
            .sum::<u64>() as f64
            * 1e-6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_memory_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = peak_rss_bytes().expect("VmHWM on Linux");
            assert!(rss > 1 << 20, "{rss}");
        }
    }

    #[test]
    fn wrapped_counters_are_handled() {
        let m = EnergyMeter {
            counters: vec![Counter {
                energy: PathBuf::new(),
                range_uj: 1_000_000,
            }],
        };
        let j = m.joules(&EnergyReading(vec![900_000]), &EnergyReading(vec![100_000]));
        assert!((j - 0.2).abs() < 1e-12, "{j}");
    }
}
