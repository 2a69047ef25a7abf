//! Philox draws on the SIMD sets: [`kiln_core::rng::blocks`] computes 16
//! counters' blocks lane by lane, which each set's compilation turns into
//! vector multiplies (one 32-bit word of 16 blocks per AVX-512 register),
//! instead of one block per element as [`kiln_core::rng::uniform`] does.
//! The draws are the stream's own — bit for bit the reference's.

use std::mem::MaybeUninit;

use kiln_core::rng::{self, UNIFORMS_PER_BLOCK};
use kiln_core::{DType, Distribution, HostData, Result};

use crate::fresh::Slot;
use crate::vector::wide;
use crate::workers::Workers;
use crate::KernelSet;

/// Blocks computed at once: 16 lanes of 32-bit words.
const LANES: usize = 16;

/// Uniform draws written per task of [`random`].
const CHUNK: usize = 1 << 14;

/// Words per block, as an index step.
const WORDS: usize = UNIFORMS_PER_BLOCK as usize;

/// `out[j] = f(u)` for element `first + j` of the uniform stream
/// `(seed, offset)`: groups of up to [`LANES`] blocks where the elements
/// start a block and more than two blocks' worth remain (16 lanes in
/// vectors cost about two blocks one by one), single blocks elsewhere.
#[inline(always)]
fn uniforms_loop(
    seed: u64,
    offset: u64,
    first: u64,
    out: &mut [impl Slot],
    f: impl Fn(f32) -> f32,
) {
    let (mut e, mut at) = (first, 0);
    while at < out.len() {
        let word = (e % UNIFORMS_PER_BLOCK) as usize;
        let counter = offset.wrapping_add(e / UNIFORMS_PER_BLOCK);
        let left = out.len() - at;
        if word == 0 && left > 2 * WORDS {
            let b = rng::blocks::<LANES>(seed, counter);
            let n = left.min(WORDS * LANES);
            for (j, o) in out[at..at + n].iter_mut().enumerate() {
                o.put(f(rng::unit_f32(b[j % WORDS][j / WORDS])));
            }
            at += n;
        } else {
            let b = rng::block(seed, counter);
            let n = (WORDS - word).min(left);
            for (o, &w) in out[at..at + n].iter_mut().zip(&b[word..]) {
                o.put(f(rng::unit_f32(w)));
            }
            at += n;
        }
        e = first + at as u64;
    }
}

wide::per_set! {
    /// `f` of uniform draws ([`uniforms_loop`]).
    fn uniforms(seed: u64, offset: u64, first: u64, out: &mut [impl Slot], f: impl Fn(f32) -> f32) -> () = uniforms_loop;
}

/// [`kiln_core::Backend::random`]'s uniform draws with `set`'s Philox, over
/// `pool`'s threads; normal draws (initialisation only) are the
/// reference's.
pub(crate) fn random(
    set: KernelSet,
    pool: &Workers,
    dist: Distribution,
    numel: usize,
    dtype: DType,
    seed: u64,
    offset: u64,
) -> Result<HostData> {
    let Distribution::Uniform { low, high } = dist else {
        return crate::reference::random::random(dist, numel, dtype, seed, offset);
    };
    dist.validate()?;
    let fill = |start: usize, out: &mut [MaybeUninit<f32>]| {
        let scaled = |u: f32| (low + (high - low) * f64::from(u)) as f32;
        uniforms(set, seed, offset, start as u64, out, scaled);
    };
    // SAFETY: `uniforms` writes every element of each chunk.
    let values = unsafe { pool.filled(numel, CHUNK, fill) };
    crate::vector::convert::store_f32_on(set, Some(pool), "random", dtype, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_set_draws_the_reference_stream_from_any_start() {
        for set in KernelSet::ALL.into_iter().filter(|s| s.available()) {
            // Starts inside a block and on one; lengths past one group.
            for (first, len) in [(0u64, 200usize), (3, 130), (5, 64), (8, 3), (4, 13), (1, 0)] {
                let mut got = vec![0f32; len];
                uniforms(set, 9, 1 << 33, first, &mut got, |u| u);
                for (j, g) in got.iter().enumerate() {
                    let want = rng::uniform(9, 1 << 33, first + j as u64);
                    assert_eq!(g.to_bits(), want.to_bits(), "{set:?} at {first} + {j}");
                }
            }
        }
    }
}
