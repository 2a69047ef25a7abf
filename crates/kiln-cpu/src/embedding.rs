//! Embedding lookups on the CPU: a row copy per id (bitwise, in the
//! table's type), and the backward scatter-add summed in f32 in position
//! order — split among threads by column, so no result depends on
//! scheduling.

use kiln_core::plan::EmbeddingPlan;
use kiln_core::{HostData, Layout, Result, View};

use crate::storage::{read_f32, store_f32};
use crate::workers::Workers;

/// The ids as host u32s, each checked against the table's rows.
fn checked_ids(plan: &EmbeddingPlan, ids: View<'_, HostData>) -> Result<Vec<u32>> {
    let HostData::U32(data) = ids.storage else {
        unreachable!("the plan checked the ids' type")
    };
    let mut out = Vec::with_capacity(plan.positions);
    ids.layout.for_each_offset(|o| out.push(data[o]));
    if let Some(p) = out.iter().position(|&id| id as usize >= plan.vocab) {
        return Err(plan.bad_id(p, Some(out[p])));
    }
    Ok(out)
}

/// `table[ids[p]]` for every position, in the table's own type.
fn gather_rows<T: Copy>(data: &[T], table: &Layout, ids: &[u32], dim: usize) -> Vec<T> {
    let (rs, cs, off) = (table.strides()[0], table.strides()[1], table.offset());
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        let start = off + id as usize * rs;
        if cs == 1 {
            out.extend_from_slice(&data[start..start + dim]);
        } else {
            out.extend((0..dim).map(|j| data[start + j * cs]));
        }
    }
    out
}

/// [`kiln_core::Backend::embedding`].
pub(crate) fn embedding(table: View<'_, HostData>, ids: View<'_, HostData>) -> Result<HostData> {
    let plan = EmbeddingPlan::new(table, ids)?;
    let ids = checked_ids(&plan, ids)?;
    let (l, d) = (table.layout, plan.dim);
    Ok(match table.storage {
        HostData::F32(t) => HostData::F32(gather_rows(t, l, &ids, d)),
        HostData::F16(t) => HostData::F16(gather_rows(t, l, &ids, d)),
        HostData::BF16(t) => HostData::BF16(gather_rows(t, l, &ids, d)),
        HostData::U32(_) => unreachable!("the plan checked the table's type"),
    })
}

/// [`kiln_core::Backend::embedding_backward`]: column blocks, each summing
/// its columns over the positions in order.
pub(crate) fn embedding_backward(
    pool: Option<&Workers>,
    ids: View<'_, HostData>,
    dy: View<'_, HostData>,
    vocab: usize,
) -> Result<HostData> {
    const BLOCK: usize = 64;
    let plan = EmbeddingPlan::backward(ids, dy, vocab)?;
    let ids = checked_ids(&plan, ids)?;
    let dys = read_f32("embedding_backward", dy)?;
    let d = plan.dim;
    // One [vocab, width] block of columns per task, scattered back after.
    let blocks: Vec<usize> = (0..d).step_by(BLOCK).collect();
    let block = |first: usize| {
        let width = BLOCK.min(d - first);
        let mut acc = vec![0f32; vocab * width];
        for (p, &id) in ids.iter().enumerate() {
            let src = &dys[p * d + first..p * d + first + width];
            let dst = &mut acc[id as usize * width..(id as usize + 1) * width];
            for (a, &g) in dst.iter_mut().zip(src) {
                *a += g;
            }
        }
        acc
    };
    let parts: Vec<Vec<f32>> = match pool {
        Some(p) => p.map(blocks.clone(), block),
        None => blocks.iter().map(|&f| block(f)).collect(),
    };
    let mut out = vec![0f32; vocab * d];
    for (&first, part) in blocks.iter().zip(&parts) {
        let width = BLOCK.min(d - first);
        for (v, row) in part.chunks(width).enumerate() {
            out[v * d + first..v * d + first + width].copy_from_slice(row);
        }
    }
    store_f32("embedding_backward", plan.dtype, out)
}
