//! Fused attention runs its queries in register blocks of 4 rows; a
//! block's lone last row (a decoding step's query, the 65th of 65) runs
//! alone and must give the bits the block would have given it. Causal
//! row `i` sees keys `0..=i` only, so the first `T` rows of a longer
//! problem over the same values are the `T`-row problem's rows: compared
//! bitwise, the output and `dq` (row `i` of `dq` depends on row `i` of
//! `dy` and the keys it sees), on every kernel set and on 1 and 2 threads.

use kiln_core::{rng, AttentionOptions, Backend, HostData, Layout, Result, Shape, View};
use kiln_cpu::{CpuBackend, KernelSet};

/// `n` values in `[-1, 1)` from seed `seed`'s stream.
fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| rng::uniform(seed, 0, i) * 2.0 - 1.0)
        .collect()
}

/// The output and `dq` of the `t`-query problem over the first `t` rows
/// of the `long`-row operands (`[1, long, d]` each, row-major).
fn first_rows(
    b: &CpuBackend,
    t: usize,
    d: usize,
    operands: &[Vec<f32>; 4],
) -> Result<[Vec<f32>; 2]> {
    let layout = Layout::contiguous(Shape::new(&[1, t, d])?);
    let [q, k, v, dy] = operands
        .each_ref()
        .map(|x| HostData::F32(x[..t * d].to_vec()));
    let view = |x| View::new(x, &layout);
    let options = AttentionOptions::new(1.0 / (d as f32).sqrt());
    let f32s = |h: HostData| h.to_f64_vec().into_iter().map(|x| x as f32).collect();
    let y = b.attention_causal(view(&q), view(&k), view(&v), &options)?;
    let g = b.attention_causal_backward(view(&q), view(&k), view(&v), view(&dy), &options)?;
    Ok([f32s(y), f32s(g.dq)])
}

#[test]
fn a_lone_row_gives_the_blocks_bits() -> Result<()> {
    let sets = KernelSet::ALL
        .into_iter()
        .filter(|s| s.check_available().is_ok());
    for set in sets {
        for threads in [1, 2] {
            let b = CpuBackend::with_kernels(set)?.with_threads(threads)?;
            // (rows with a lone last one, a longer problem, head width)
            for (t, long, d) in [(5, 8, 16), (9, 12, 33), (65, 68, 8), (13, 16, 1)] {
                let operands = [1, 2, 3, 4].map(|seed| values(long * d, seed));
                let short = first_rows(&b, t, d, &operands)?;
                let full = first_rows(&b, long, d, &operands)?;
                for (what, (s, f)) in ["y", "dq"].iter().zip(short.iter().zip(&full)) {
                    assert!(
                        s.iter().map(|x| x.to_bits()).eq(f[..t * d].iter().map(|x| x.to_bits())),
                        "{set:?}, {threads} threads, T = {t} against {long}, D = {d}: {what} differs"
                    );
                }
            }
        }
    }
    Ok(())
}
