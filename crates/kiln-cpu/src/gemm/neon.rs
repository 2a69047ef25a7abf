//! The NEON micro-kernel: an 8 × 8 tile in 16 q-register accumulators.

use std::arch::aarch64::*;

use super::MicroKernel;

/// 8 rows × 8 columns: per k step, two 4-wide loads each of A and B and
/// sixteen lane-indexed fused multiply-adds.
pub(crate) struct Neon;

impl MicroKernel for Neon {
    const MR: usize = 8;
    const NR: usize = 8;

    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32) {
        // SAFETY: forwarded from the caller (NEON present, buffer sizes).
        unsafe { kernel(kc, a, b, c) }
    }
}

#[target_feature(enable = "neon")]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32) {
    let mut acc = [[vdupq_n_f32(0.0); 2]; 8];
    for p in 0..kc {
        // SAFETY: a and b each hold kc·8 floats (the MicroKernel contract).
        let (a0, a1, b0, b1) = unsafe {
            (
                vld1q_f32(a.add(p * 8)),
                vld1q_f32(a.add(p * 8 + 4)),
                vld1q_f32(b.add(p * 8)),
                vld1q_f32(b.add(p * 8 + 4)),
            )
        };
        macro_rules! rows {
            ($($i:literal: $src:ident[$lane:literal]),*) => {$(
                acc[$i][0] = vfmaq_laneq_f32::<$lane>(acc[$i][0], b0, $src);
                acc[$i][1] = vfmaq_laneq_f32::<$lane>(acc[$i][1], b1, $src);
            )*};
        }
        rows!(0: a0[0], 1: a0[1], 2: a0[2], 3: a0[3], 4: a1[0], 5: a1[1], 6: a1[2], 7: a1[3]);
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: c has room for 8·8 floats.
        unsafe {
            vst1q_f32(c.add(i * 8), row[0]);
            vst1q_f32(c.add(i * 8 + 4), row[1]);
        }
    }
}
