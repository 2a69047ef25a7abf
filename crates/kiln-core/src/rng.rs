//! The counter-based random number generator every backend shares.
//!
//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
//! 3", SC'11) maps a 128-bit counter and a 64-bit key to 128 random bits with
//! no state, so element `i` of a stream can be computed anywhere — on any
//! thread, on any device — and every backend draws identical numbers.
//!
//! Streams: for seed `s` and starting counter `o`,
//! - uniform element `i` is word `i % 4` of block `o + i/4`, as 24 bits
//!   scaled to `[0, 1)`;
//! - normal element `i` uses block `o + i/2`: words 0 and 1 for even `i`,
//!   2 and 3 for odd `i`, through Box–Muller in f64.
//!
//! ```
//! use kiln_core::rng::{uniform, Philox};
//!
//! // Element 5 of seed 42's stream, computed alone, is the same wherever it is computed.
//! let u = uniform(42, 0, 5);
//! assert!((0.0..1.0).contains(&u));
//! assert_eq!(u, uniform(42, 0, 5));
//! // A sequential generator: same seed and stream, same numbers.
//! let (mut a, mut b) = (Philox::new(7, 0), Philox::new(7, 0));
//! assert_eq!(a.next_u32(), b.next_u32());
//! let mut items: Vec<u32> = (0..10).collect();
//! a.shuffle(&mut items);
//! let mut sorted = items.clone();
//! sorted.sort();
//! assert_eq!(sorted, (0..10).collect::<Vec<_>>());
//! # Ok::<(), kiln_core::Error>(())
//! ```

/// Uniform elements per counter value: one Philox block's four words.
pub const UNIFORMS_PER_BLOCK: u64 = 4;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// One Philox4x32 block with 10 rounds.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter.map(|w| [w]);
    rounds::<1>(&mut c, key);
    c.map(|[w]| w)
}

/// Philox4x32-10's rounds on `N` counters at once, word-major (`c[w][l]`
/// is word `w` of lane `l`): the lane loops are what a vectorising
/// compiler turns into `N`-wide integer multiplies, so kiln-cpu's SIMD
/// sets compile [`blocks`] per set from this one definition.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // a lane indexes the four word arrays at once
fn rounds<const N: usize>(c: &mut [[u32; N]; 4], key: [u32; 2]) {
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        for l in 0..N {
            let p0 = u64::from(M0) * u64::from(c[0][l]);
            let p1 = u64::from(M1) * u64::from(c[2][l]);
            let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
            let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
            let (w1, w3) = (c[1][l], c[3][l]);
            c[0][l] = hi1 ^ w1 ^ k[0];
            c[1][l] = lo1;
            c[2][l] = hi0 ^ w3 ^ k[1];
            c[3][l] = lo0;
        }
    }
}

/// The block at 64-bit counter `n` of the stream keyed by `seed`.
pub fn block(seed: u64, n: u64) -> [u32; 4] {
    philox4x32_10(
        [n as u32, (n >> 32) as u32, 0, 0],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// The blocks at counters `first..first + N` of `seed`'s stream,
/// word-major: `[w][l]` is word `w` of block `first + l` — [`block`] for
/// `N` counters at once, inlined so that a caller compiled for a SIMD
/// target computes its lanes in vector registers.
///
/// ```
/// use kiln_core::rng::{block, blocks};
///
/// let b = blocks::<16>(42, 7);
/// for l in 0..16 {
///     assert_eq!([b[0][l], b[1][l], b[2][l], b[3][l]], block(42, 7 + l as u64));
/// }
/// ```
#[inline(always)]
pub fn blocks<const N: usize>(seed: u64, first: u64) -> [[u32; N]; 4] {
    let mut c = [[0u32; N]; 4];
    let [lo, hi, _, _] = &mut c;
    for (l, (lo, hi)) in lo.iter_mut().zip(hi).enumerate() {
        let n = first.wrapping_add(l as u64);
        (*lo, *hi) = (n as u32, (n >> 32) as u32);
    }
    rounds::<N>(&mut c, [seed as u32, (seed >> 32) as u32]);
    c
}

/// Maps a random word to `[0, 1)` using its top 24 bits (exact in f32).
pub fn unit_f32(word: u32) -> f32 {
    (word >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Element `i` of the uniform `[0, 1)` stream.
pub fn uniform(seed: u64, offset: u64, i: u64) -> f32 {
    unit_f32(
        block(seed, offset.wrapping_add(i / UNIFORMS_PER_BLOCK))[(i % UNIFORMS_PER_BLOCK) as usize],
    )
}

/// Element `i` of the standard normal stream (f64 Box–Muller).
pub fn normal(seed: u64, offset: u64, i: u64) -> f64 {
    let b = block(seed, offset.wrapping_add(i / 2));
    let (w1, w2) = if i.is_multiple_of(2) {
        (b[0], b[1])
    } else {
        (b[2], b[3])
    };
    // u1 in (0, 1] so the logarithm is finite.
    let u1 = (f64::from(w1) + 1.0) / 4_294_967_296.0;
    let u2 = f64::from(w2) / 4_294_967_296.0;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A small sequential generator over the Philox stream, for host-side
/// randomness (shuffling, augmentation parameters).
#[derive(Clone, Debug)]
pub struct Philox {
    seed: u64,
    counter: u64,
    buf: [u32; 4],
    used: usize,
}

impl Philox {
    /// A generator for `seed`, starting at block `stream` (use distinct
    /// streams for independent uses of one seed).
    pub fn new(seed: u64, stream: u64) -> Self {
        Philox {
            seed,
            counter: stream << 32,
            buf: [0; 4],
            used: 4,
        }
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            self.buf = block(self.seed, self.counter);
            self.counter = self.counter.wrapping_add(1);
            self.used = 0;
        }
        let w = self.buf[self.used];
        self.used += 1;
        w
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        unit_f32(self.next_u32())
    }

    /// Uniform in `0..n` without modulo bias (Lemire's method). `n` must be > 0.
    pub fn below(&mut self, n: u32) -> u32 {
        debug_assert!(n > 0);
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u64::from(self.next_u32()) * u64::from(n);
            if (m as u32) >= threshold {
                return (m >> 32) as u32;
            }
        }
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below((i + 1) as u32) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer_vectors() {
        // Random123's published known-answer tests for philox4x32_10.
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn uniform_in_range_and_mean_half() {
        let n = 100_000;
        let mean: f64 = (0..n)
            .map(|i| {
                let u = uniform(7, 0, i);
                assert!((0.0..1.0).contains(&u));
                f64::from(u)
            })
            .sum::<f64>()
            / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
    }

    #[test]
    fn normal_moments() {
        let n = 100_000u64;
        let xs: Vec<f64> = (0..n).map(|i| normal(3, 10, i)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<u32> = (0..1000).collect();
        let mut b = a.clone();
        Philox::new(1, 0).shuffle(&mut a);
        Philox::new(1, 0).shuffle(&mut b);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, sorted);
    }
}
