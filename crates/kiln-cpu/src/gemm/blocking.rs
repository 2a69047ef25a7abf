//! Cache blocking of the packed GEMM, derived from this processor's caches
//! when the process starts (not constants tuned for one machine).
//!
//! The driver's loops, outermost first: `NC` columns of B, `KC` steps of k
//! (B's `KC × NC` block packed once, shared by all threads), row blocks of
//! A of at most `MC` rows (packed per task), then micro-panels — B's
//! `KC × NR` panel outside, A's `MC`-row block inside. So:
//!
//! - one B micro-panel (`KC·NR` floats) is reused by every A micro-panel of
//!   the row block: `KC` makes it at most the size of L1D, and at most 256
//!   deep (on the Emerald Rapids Xeon, 320 and 384 measured level with 256
//!   or below it) — except on cores that execute each 512-bit multiply-add
//!   as two 256-bit halves ([`Fma::Halved`], AMD's Zen 4), where a k step
//!   of the AVX-512 tile takes twice the cycles: B's panel then streams
//!   from L2 at half the rate per cycle, and a block twice as deep (up to
//!   512) halves the passes over C, whose tiles are loaded and stored once
//!   per block. On a Zen 4, 1 thread, KC 512 against 256 measured
//!   1.07–1.12× at 1024³–4096³ and 1.07× on the CNN's dense forward
//!   product, level elsewhere (`benches/RESULTS.md`);
//! - the packed A block (`MC·KC`) is reused by every B micro-panel and
//!   should stay in L2 beside B's panels and C's tiles: `MC` fills about a
//!   fifth of L2 with a block as deep as fits L1D's B panel, and is lowered
//!   for deeper ones ([`Blocking::for_depth`]);
//! - the packed B block (`KC·NC`) is shared by all threads from L3: `NC`
//!   fills about a sixteenth of it (the share of one core of a large one)
//!   with a block as deep as fits L1D's B panel.
//!
//! On a core with L1D 32 KiB, L2 1 MiB and L3 32 MiB this gives the AVX-512
//! kernel `KC = 256, MC = 200, NC = 2048`; on a Zen 4 (the same caches),
//! `KC = 512` and the same `MC` and `NC`, `MC` lowered to ⌊52,428 / kc⌋ for
//! k blocks deeper than 262 (133 for the MLP's 784 = 2 × 392, 102 for
//! 4096 = 8 × 512; whole tiles of those in the driver).
//!
//! `KILN_GEMM_BLOCKING=KC,MC,NC` overrides the derived values (for
//! experiments; checked when a backend is built; empty means unset). `KC` sets the summation
//! order of every product (k ascending within a block, blocks ascending;
//! a product of depth k takes ⌈k / KC⌉ blocks of equal depth, the last
//! shorter by less than one step per block: [`Blocking::for_depth`]), so
//! it never depends on the thread count.

use std::sync::OnceLock;

use kiln_core::{Error, Result};

/// The largest `KC` an override may set.
pub(crate) const KC_MAX: usize = 1024;
/// The deepest `KC` derived from the caches for full-width units (twice
/// this for [`Fma::Halved`]).
const KC_DEEPEST: usize = 256;
const _: () = assert!(2 * KC_DEEPEST <= KC_MAX);

/// How a core executes the micro-kernel's vector multiply-adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fma {
    /// Each vector in one pass: Intel's AVX-512 cores, AMD's desktop and
    /// server Zen 5, and every AVX2 and NEON kernel.
    Full,
    /// Each 512-bit vector in two 256-bit passes: AMD's Zen 4 (and
    /// mobile Zen 5, family 1Ah like the others: classed full here).
    /// Only x86-64 has such cores (the blocking tests build it anywhere).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Halved,
}

impl Fma {
    /// How this processor runs the AVX-512 kernel's multiply-adds: halved
    /// on AMD family 19h (Zen 4 is that family's only AVX-512 core; Zen 3,
    /// the other, never runs the AVX-512 kernel), full everywhere else.
    pub(crate) fn of_avx512() -> Fma {
        static FMA: OnceLock<Fma> = OnceLock::new();
        *FMA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::x86_64::__cpuid;
                let vendor = __cpuid(0);
                let amd = (vendor.ebx, vendor.edx, vendor.ecx)
                    == (
                        u32::from_le_bytes(*b"Auth"),
                        u32::from_le_bytes(*b"enti"),
                        u32::from_le_bytes(*b"cAMD"),
                    );
                // CPUID leaf 1, EAX: base family in bits 8–11, extended
                // family (added when the base is 0xF) in bits 20–27.
                let eax = __cpuid(1).eax;
                let base = (eax >> 8) & 0xF;
                let family = if base == 0xF {
                    base + ((eax >> 20) & 0xFF)
                } else {
                    base
                };
                if amd && family == 0x19 {
                    return Fma::Halved;
                }
            }
            Fma::Full
        })
    }
}

/// The cache sizes the blocking is derived from, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Caches {
    /// Level 1 data cache of one core.
    pub l1d: usize,
    /// Level 2 cache of one core.
    pub l2: usize,
    /// Last-level cache (shared).
    pub l3: usize,
}

impl Caches {
    /// What most current x86-64 and Arm server cores have, for machines
    /// that do not say (L1D 32 KiB, L2 1 MiB, L3 32 MiB).
    const DEFAULT: Caches = Caches {
        l1d: 32 << 10,
        l2: 1 << 20,
        l3: 32 << 20,
    };

    /// This machine's caches, read once from Linux's
    /// `/sys/devices/system/cpu/cpu0/cache`; [`Caches::DEFAULT`] for any
    /// level it does not report.
    pub(crate) fn of_this_machine() -> Caches {
        static CACHES: OnceLock<Caches> = OnceLock::new();
        *CACHES.get_or_init(|| {
            let mut c = Caches::DEFAULT;
            let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
            for index in 0..8 {
                let read = |name: &str| {
                    std::fs::read_to_string(dir.join(format!("index{index}/{name}")))
                        .map(|s| s.trim().to_string())
                        .ok()
                };
                let (Some(level), Some(kind), Some(size)) =
                    (read("level"), read("type"), read("size"))
                else {
                    continue;
                };
                let Some(bytes) = parse_size(&size) else {
                    continue;
                };
                match (level.as_str(), kind.as_str()) {
                    ("1", "Data") => c.l1d = bytes,
                    ("2", "Unified" | "Data") => c.l2 = bytes,
                    ("3", "Unified") => c.l3 = bytes,
                    _ => {}
                }
            }
            c
        })
    }
}

/// `"32K"`, `"1024K"`, `"32M"` or a plain byte count, as sysfs writes them.
fn parse_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|v| v.checked_mul(unit))
        .filter(|&v| v > 0)
}

/// The three block sizes of the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Blocking {
    /// Steps of k per packed block.
    pub kc: usize,
    /// Most rows of A per packed block.
    pub mc: usize,
    /// Columns of B per packed block.
    pub nc: usize,
    /// Most floats of one packed A block: [`Blocking::for_depth`] lowers
    /// `mc` for blocks deep enough to exceed it.
    pub a_floats: usize,
}

impl Blocking {
    /// The blocking for a micro-kernel of `mr × nr` on caches `c`, its
    /// multiply-adds executed as `fma` says (see the module docs), before
    /// any override. `MC` and `NC` are sized for a block of the depth that
    /// fills L1D (`MC` shrinks for deeper blocks: [`Blocking::for_depth`]).
    pub(crate) fn derive(c: Caches, fma: Fma, mr: usize, nr: usize) -> Blocking {
        let f = std::mem::size_of::<f32>();
        let passes = match fma {
            Fma::Full => 1,
            Fma::Halved => 2,
        };
        // The depth of a B panel of `l1ds` L1Ds.
        let depth = |l1ds: usize| (l1ds * c.l1d / (nr * f)).clamp(64, l1ds * KC_DEEPEST) / 16 * 16;
        let in_l1 = depth(1);
        let a_floats = c.l2 / 5 / f;
        Blocking {
            kc: depth(passes),
            mc: (a_floats / in_l1).clamp(mr, 1024) / mr * mr,
            nc: (c.l3 / 16 / (in_l1 * f)).clamp(4 * nr, 8192) / nr * nr,
            a_floats,
        }
    }

    /// The blocking an override gives: `kc`, `mc` and `nc` as they are, the
    /// A block `mc·kc` at most.
    fn given(kc: usize, mc: usize, nc: usize) -> Blocking {
        Blocking {
            kc,
            mc,
            nc,
            a_floats: kc * mc,
        }
    }

    /// This blocking for a product of depth `k`: `KC` evened out over the
    /// ⌈k / KC⌉ blocks it takes, so that no block is a sliver (784 = 4 ×
    /// 196, not 3 × 256 + 16) and blocks split over threads weigh alike;
    /// `MC` lowered, if need be, to keep the A block within `a_floats`.
    pub(crate) fn for_depth(self, k: usize) -> Blocking {
        let blocks = k.div_ceil(self.kc).max(1);
        let kc = k.div_ceil(blocks).max(1);
        Blocking {
            kc,
            mc: self.mc.min(self.a_floats / kc).max(1),
            ..self
        }
    }

    /// The blocking this process uses for an `mr × nr` micro-kernel whose
    /// multiply-adds run as `fma` says: the override if one is set, else
    /// [`Blocking::derive`] on this machine's caches.
    pub(crate) fn for_tile(fma: Fma, mr: usize, nr: usize) -> Blocking {
        match overridden() {
            Some(b) => Blocking::given(b.kc, b.mc.max(mr) / mr * mr, b.nc.max(nr) / nr * nr),
            None => Blocking::derive(Caches::of_this_machine(), fma, mr, nr),
        }
    }
}

/// `KILN_GEMM_BLOCKING`, parsed once (`None` when unset or malformed —
/// [`check_env`] reports the latter when a backend is built).
fn overridden() -> Option<Blocking> {
    static OVERRIDE: OnceLock<Option<Blocking>> = OnceLock::new();
    *OVERRIDE.get_or_init(|| check_env().ok().flatten())
}

/// The override in `KILN_GEMM_BLOCKING`, if set, or an error saying what is
/// wrong with it.
pub(crate) fn check_env() -> Result<Option<Blocking>> {
    kiln_core::env::setting("KILN_GEMM_BLOCKING")?
        .map(|text| parse_override(&text))
        .transpose()
}

fn parse_override(text: &str) -> Result<Blocking> {
    let bad = || {
        Error::invalid(format!(
            "KILN_GEMM_BLOCKING={text:?}: expected KC,MC,NC as whole numbers \
             (KC 1 to {KC_MAX}, MC and NC 1 to 65536), e.g. 256,192,2048; \
             unset it to use the blocking derived from the caches"
        ))
    };
    let v: Vec<usize> = text
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad())?;
    match v[..] {
        [kc, mc, nc]
            if (1..=KC_MAX).contains(&kc)
                && (1..=65536).contains(&mc)
                && (1..=65536).contains(&nc) =>
        {
            Ok(Blocking::given(kc, mc, nc))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_sizes_parse() {
        assert_eq!(parse_size("32K"), Some(32 << 10));
        assert_eq!(parse_size("1024K"), Some(1 << 20));
        assert_eq!(parse_size("32M"), Some(32 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size("0K"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn blocking_follows_the_caches_and_whole_tiles() {
        // (`for_depth`'s MC need not be whole tiles: the driver rounds it
        // down to whole tiles of its kernel.)
        let sizes = |b: Blocking| (b.kc, b.mc, b.nc);
        let b = Blocking::derive(Caches::DEFAULT, Fma::Full, 8, 32);
        assert_eq!(sizes(b), (256, 200, 2048));
        assert!(b.mc * b.kc * 4 <= Caches::DEFAULT.l2 / 2);
        // Full-width products are never deep enough to lower MC.
        assert_eq!(sizes(b.for_depth(784)), (196, 200, 2048));
        assert_eq!(sizes(b.for_depth(4096)), (256, 200, 2048));
        // Halved 512-bit units (Zen 4): B's panel twice L1D and k blocks
        // twice as deep; MC as for full width, lowered to keep the A block
        // within a fifth of L2 for blocks deeper than 256.
        let h = Blocking::derive(Caches::DEFAULT, Fma::Halved, 8, 32);
        assert_eq!(sizes(h), (512, 200, 2048));
        assert_eq!(sizes(h.for_depth(128)), (128, 200, 2048));
        assert_eq!(sizes(h.for_depth(784)), (392, 133, 2048));
        assert_eq!(sizes(h.for_depth(4096)), (512, 102, 2048));
        // A smaller L1 gets shallower k blocks.
        let small = Caches {
            l1d: 16 << 10,
            ..Caches::DEFAULT
        };
        assert_eq!(Blocking::derive(small, Fma::Full, 8, 32).kc, 128);
        let huge = Caches {
            l1d: 1 << 30,
            l2: 1 << 30,
            l3: 1 << 30,
        };
        let h = Blocking::derive(huge, Fma::Full, 6, 16);
        assert!(h.kc <= KC_DEEPEST && h.mc <= 1024 && h.nc <= 8192);
        let h = Blocking::derive(huge, Fma::Halved, 8, 32);
        assert_eq!(h.kc, 2 * KC_DEEPEST);
        let tiny = Caches {
            l1d: 1,
            l2: 1,
            l3: 1,
        };
        let t = Blocking::derive(tiny, Fma::Full, 6, 16);
        assert!(t.kc >= 64 && t.mc >= 6 && t.nc >= 64);
    }

    #[test]
    fn overrides_are_checked() {
        assert_eq!(
            parse_override("256, 192,2048").unwrap(),
            Blocking::given(256, 192, 2048)
        );
        for bad in [
            "",
            "1,2",
            "0,1,1",
            "2000,1,1",
            "a,b,c",
            "1,1,1,1",
            "1,1,100000",
        ] {
            let e = parse_override(bad).unwrap_err().to_string();
            assert!(e.contains("KILN_GEMM_BLOCKING"), "{bad}: {e}");
        }
    }
}
