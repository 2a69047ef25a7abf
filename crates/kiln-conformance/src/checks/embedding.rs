//! Embedding lookups and their backward scatter-add.
//!
//! The lookup equals the table's rows in value (a copy in the table's type;
//! a zero's sign may differ, as the default composition's sums give +0); the
//! backward pass sums, per table row, the `dy` rows of the positions that
//! looked it up: a sum within [`kiln_core::bounds::dot`]. Ids repeat (few
//! table rows, many positions) so the sums are real; an id out of range is
//! an error, from the call or from the next synchronisation.

use kiln_core::{bounds, Backend, DType, HostData, Layout, Shape, View};
use proptest::prelude::*;

use super::fetch_all;
use crate::values::{operand, shape, Domain, Operand};
use crate::{compare, run_cases, Bound, CaseError, Config, Report, Sizer, Tier};

#[derive(Clone, Debug)]
struct Case {
    /// `[vocab, dim]`. Finite: the default composition (a one-hot GEMM)
    /// turns a non-finite entry of another row into NaN.
    table: Operand,
    ids: Vec<u32>,
    ids_dims: Vec<usize>,
    dy: Operand,
}

fn strategy(z: &Sizer, dtype: DType) -> BoxedStrategy<Case> {
    let sizes = match z.tier {
        Tier::Edge => (1usize..20, 0usize..18, shape(2, 9)).boxed(),
        Tier::Blocked => (
            1usize..300,
            60usize..300,
            (1usize..600).prop_map(|n| vec![n]),
        )
            .boxed(),
        Tier::Large => (
            (4000usize..6000),
            (700usize..800),
            (1500usize..2500).prop_map(|n| vec![n]),
        )
            .boxed(),
    };
    sizes
        .prop_flat_map(move |(vocab, dim, ids_dims)| {
            let n: usize = ids_dims.iter().product();
            let mut dy_dims = ids_dims.clone();
            dy_dims.push(dim);
            (
                operand(dtype, vec![vocab, dim], Domain::Finite, true),
                prop::collection::vec(0..vocab as u32, n),
                Just(ids_dims),
                operand(dtype, dy_dims, Domain::Moderate(4.0), true),
            )
                .prop_map(|(table, ids, ids_dims, dy)| Case {
                    table,
                    ids,
                    ids_dims,
                    dy,
                })
        })
        .boxed()
}

pub(crate) fn embedding<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    run_cases(
        "embedding",
        dtype,
        cfg,
        move |z| strategy(z, dtype),
        |c| {
            let (vocab, dim) = (c.table.dims()[0], c.table.dims()[1]);
            let st = c.table.upload(b)?;
            let ids = b.upload(&HostData::U32(c.ids.clone()))?;
            let lids = Layout::contiguous(Shape::new(&c.ids_dims)?);
            let out = b.embedding(View::new(&st, &c.table.layout), View::new(&ids, &lids))?;
            let mut dims = c.ids_dims.clone();
            dims.push(dim);
            let got = fetch_all(b, &out, &dims)?;
            let table = c.table.logical();
            let want: Vec<_> = c
                .ids
                .iter()
                .flat_map(|&id| {
                    let row = id as usize * dim;
                    table[row..row + dim]
                        .iter()
                        .map(|&v| (v, Bound::CorrectlyRounded))
                })
                .collect();
            let w = compare("embedding", dtype, &dims, &got, &want)?;
            // An id out of range is an error, not garbage.
            if let Some(last) = c.ids.len().checked_sub(1) {
                let mut bad = c.ids.clone();
                bad[last] = vocab as u32;
                let bad = b.upload(&HostData::U32(bad))?;
                if b.embedding(View::new(&st, &c.table.layout), View::new(&bad, &lids))
                    .and_then(|_| b.synchronize())
                    .is_ok()
                {
                    return Err(CaseError::Fail(format!(
                        "id {vocab} was accepted with a table of {vocab} rows"
                    )));
                }
            }
            Ok(w)
        },
    )
}

pub(crate) fn embedding_backward<B: Backend>(b: &B, dtype: DType, cfg: &Config) -> Report {
    run_cases(
        "embedding_backward",
        dtype,
        cfg,
        move |z| strategy(z, dtype),
        |c| {
            let (vocab, dim) = (c.table.dims()[0], c.table.dims()[1]);
            let ids = b.upload(&HostData::U32(c.ids.clone()))?;
            let lids = Layout::contiguous(Shape::new(&c.ids_dims)?);
            let sd = c.dy.upload(b)?;
            let out =
                b.embedding_backward(View::new(&ids, &lids), View::new(&sd, &c.dy.layout), vocab)?;
            let got = fetch_all(b, &out, &[vocab, dim])?;
            let dy = c.dy.logical();
            let mut sums = vec![(0f64, 0f64, 0usize); vocab * dim];
            for (p, &id) in c.ids.iter().enumerate() {
                for j in 0..dim {
                    let s = &mut sums[id as usize * dim + j];
                    let g = dy[p * dim + j];
                    *s = (s.0 + g, s.1 + g.abs(), s.2 + 1);
                }
            }
            let want: Vec<_> = sums
                .into_iter()
                .map(|(sum, mass, n)| {
                    let n = n.max(1);
                    (sum, Bound::summed(bounds::dot(n, mass), mass, n))
                })
                .collect();
            compare("embedding_backward", dtype, &[vocab, dim], &got, &want)
        },
    )
}
