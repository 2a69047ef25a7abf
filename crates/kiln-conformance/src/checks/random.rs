//! The counter-based RNG: every backend must draw exactly the stream
//! `kiln_core::rng` defines (normals within 1 ulp: Box–Muller's f64 `ln`
//! and `cos` may differ in their last f64 bit between libms).

use kiln_core::{rng, Backend, DType, Distribution};
use proptest::prelude::*;

use super::fetch_all;
use crate::{compare, run_cases, Bound, Config, Report, Sizer};

pub(crate) fn random<B: Backend>(b: &B, dtype: DType, cfg: &Config, normal: bool) -> Report {
    let name = if normal {
        "random_normal"
    } else {
        "random_uniform"
    };
    let s = |z: &Sizer| {
        (
            z.elementwise(1, 300)
                .prop_map(|d| d.iter().product::<usize>()),
            any::<u64>(),
            any::<u64>(),
            -10.0f64..10.0,
            0.0f64..10.0,
        )
            .boxed()
    };
    run_cases(name, dtype, cfg, s, |(n, seed, offset, a, w)| {
        let dist = if normal {
            Distribution::Normal { mean: a, std: w }
        } else {
            Distribution::Uniform {
                low: a,
                high: a + w,
            }
        };
        let out = b.random(dist, n, dtype, seed, offset)?;
        let got = fetch_all(b, &out, &[n])?;
        let want: Vec<_> = (0..n as u64)
            .map(|i| {
                // The f32 the stream defines, then (for f16/bf16) one rounding.
                let v = if normal {
                    (a + w * rng::normal(seed, offset, i)) as f32
                } else {
                    (a + w * f64::from(rng::uniform(seed, offset, i))) as f32
                };
                (
                    f64::from(v),
                    if normal { Bound::Ulps(1) } else { Bound::Exact },
                )
            })
            .collect();
        let want: Vec<_> = want
            .into_iter()
            .map(|(v, bd)| (crate::bound::round_to(dtype, v), bd))
            .collect();
        compare(name, dtype, &[n], &got, &want)
    })
}
