//! The AMX micro-kernel of the bf16 GEMM ([`super::bf16`]): on processors
//! with AMX-BF16 (Intel Sapphire Rapids and later), `tdpbf16ps` multiplies
//! a 16 × 32 tile of A by a 32 × 16 tile of B into a 16 × 16 f32 tile —
//! 8,192 multiply-adds per instruction, where `vdpbf16ps` does 32.
//!
//! One kernel call computes a [`MR`] × [`NR`] block of C in four
//! accumulator tiles (`tmm0`–`tmm3`) from two A tiles (`tmm4`, `tmm5`:
//! rows 0–15 and 16–31) and two B tiles (`tmm6`, `tmm7`: columns 0–15 and
//! 16–31), 16 k pairs at a time. A is read as rows of pair words (a
//! row-major A in place, or a row-major packing of it); B as the
//! [`super::bf16`] module's packed panels of pair words, `NR` words per
//! pair — each tile row of B is 16 of those words, one pair of k.
//!
//! Each accumulator lane adds its products pair by pair in ascending k,
//! both products of a pair in turn, rounding to nearest and flushing
//! subnormals — the order and rounding of `vdpbf16ps` in the AVX-512 BF16
//! kernel, so the two kernels give the same bits (a test checks it), and
//! the module's routing of subnormal inputs applies unchanged.
//!
//! Tiles are per-thread state: a task configures them ([`Tiles::new`])
//! before its first kernel call and releases them when done. Linux hands
//! a process the tile registers' save area only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which [`available`] makes once.

use std::arch::asm;
use std::sync::OnceLock;

use super::bf16::Words;

/// Rows of C per kernel call: two tiles of 16.
pub(super) const MR: usize = 32;
/// Columns of C per kernel call: two tiles of 16 (and the width of the
/// packed B panels the kernel reads).
pub(super) const NR: usize = 32;
/// k pairs per tile step: a tile row of A is 64 bytes, 16 pair words.
pub(super) const PAIRS_PER_STEP: usize = 16;

/// Whether this processor has AMX-BF16 and the operating system lets the
/// process use the tile registers (asked for once). `KILN_AMX=0` turns the
/// AMX kernel off (the AVX-512 BF16 kernel then runs; its sums round
/// differently, within the same bound).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if !matches!(check_env(), Ok(true)) {
            return false;
        }
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
            return false;
        }
        request_tile_data()
    })
}

/// Whether `KILN_AMX` lets the AMX kernel run: unset, empty or `1` yes,
/// `0` no, anything else an error that says so (reported when a backend is
/// built; the kernel stays off).
pub(crate) fn check_env() -> kiln_core::Result<bool> {
    match kiln_core::env::setting("KILN_AMX")? {
        None => Ok(true),
        Some(v) => match v.as_str() {
            "1" => Ok(true),
            "0" => Ok(false),
            other => Err(kiln_core::Error::invalid(format!(
                "KILN_AMX={other:?}: expected 0 (bf16 products off AMX tiles) or 1 (on, the default where the processor has AMX-BF16)"
            ))),
        },
    }
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: true if Linux
/// grants the tile data state (an older kernel, or a hypervisor that does
/// not expose it, refuses).
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the arch_prctl system call with two integer arguments; it
    // reads and writes no memory of ours, and the kernel clobbers only rcx
    // and r11 (declared).
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The tile configuration of [`kernel`]: palette 1, eight tiles of 16
/// rows × 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    const fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            // Bytes 16.. hold each tile's row width (u16), 48.. its rows.
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Config(c)
    }
}

static CONFIG: Config = Config::new();

/// This thread's tiles, configured for [`kernel`] while the guard lives
/// (not `Send`: the configuration belongs to the thread that made it).
pub(super) struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// Configures this thread's tiles.
    ///
    /// # Safety
    /// [`available`] returned true.
    pub(super) unsafe fn new() -> Self {
        // SAFETY: AMX is available and permitted (the caller's contract);
        // the configuration is 64 aligned bytes of a valid palette-1
        // layout.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
        Tiles(std::marker::PhantomData)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `new` on this thread (the
        // guard is not Send, so it is dropped where it was made).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// The `MR × NR` block `Σₜ A[t]·B̃[t]` over the `w.pairs` pairs (a multiple
/// of [`PAIRS_PER_STEP`]), stored into (or, with `add`, added to) `c`,
/// rows `ldc` apart.
///
/// # Safety
/// A [`Tiles`] guard lives on this thread; `w.ps == 2` (A's pairs are
/// contiguous in each row) and `w.a + i·rs` is readable for `2·pairs`
/// bf16 for `i < MR`; `w.b` holds `pairs·NR` words; `c` has `MR` rows of
/// `NR` floats, `ldc` apart.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn kernel(w: Words, c: *mut f32, ldc: usize, add: bool) {
    debug_assert!(w.ps == 2 && w.pairs.is_multiple_of(PAIRS_PER_STEP));
    let a_stride = 2 * w.rs;
    let b_stride = 4 * NR;
    // SAFETY: tiles configured (the contract); every load reads 16 rows of
    // 64 bytes inside A's rows or B's panel (the contract: step `s` reads
    // pairs 16s..16s+16 of each row, and B rows 16s..16s+16).
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let mut a = w.a.cast::<u8>();
        let mut b = w.b.cast::<u8>();
        for _ in 0..w.pairs / PAIRS_PER_STEP {
            let a_low = a.add(16 * a_stride);
            asm!(
                "tileloadd tmm4, [{a} + {sa}]",
                "tileloadd tmm5, [{al} + {sa}]",
                "tileloadd tmm6, [{b} + {sb}]",
                "tileloadd tmm7, [{b2} + {sb}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) a,
                al = in(reg) a_low,
                b = in(reg) b,
                b2 = in(reg) b.add(64),
                sa = in(reg) a_stride,
                sb = in(reg) b_stride,
                options(nostack, readonly)
            );
            // 16 pairs further: 64 bytes along A's rows, 16 rows of B.
            a = a.add(64);
            b = b.add(16 * b_stride);
        }
    }
    let store = |dst: *mut f32, ld: usize| {
        // SAFETY: `dst` has MR rows of NR floats, `ld` floats apart (the
        // contract, or the local buffer below).
        unsafe {
            asm!(
                "tilestored [{c0} + {s}], tmm0",
                "tilestored [{c1} + {s}], tmm1",
                "tilestored [{c2} + {s}], tmm2",
                "tilestored [{c3} + {s}], tmm3",
                c0 = in(reg) dst,
                c1 = in(reg) dst.add(16),
                c2 = in(reg) dst.add(16 * ld),
                c3 = in(reg) dst.add(16 * ld + 16),
                s = in(reg) 4 * ld,
                options(nostack)
            );
        }
    };
    if !add {
        store(c, ldc);
        return;
    }
    // The block's sum, then added to C (as the AVX-512 BF16 kernel does).
    let mut sum = [0f32; MR * NR];
    store(sum.as_mut_ptr(), NR);
    for (i, row) in sum.chunks_exact(NR).enumerate() {
        // SAFETY: row i of C's block (the contract).
        let dst = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), NR) };
        for (d, &s) in dst.iter_mut().zip(row) {
            *d += s;
        }
    }
}
