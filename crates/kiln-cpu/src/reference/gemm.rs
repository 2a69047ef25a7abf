//! Reference GEMM: `C := act(α·A·B + β·C₀ + bias)`, batched.
//!
//! Operands are gathered to row-major f32, then each output row is
//! accumulated over `k` in order (`c[j] += a[i,k]·b[k,j]`, a separate multiply
//! and add), which gives the classic bound γₖ·Σ|aᵢbᵢ| and a result that does
//! not depend on the thread count.

use kiln_core::{GemmEpilogue, HostData, Result, View};

use crate::gemm::Problem;
use crate::storage::read_f32;
use crate::threads::for_rows;

pub(crate) fn gemm(
    a: View<'_, HostData>,
    b: View<'_, HostData>,
    ep: &GemmEpilogue<'_, HostData>,
    threads: usize,
) -> Result<HostData> {
    let prob = Problem::new(a, b, ep)?;
    let (batch, m, k, n) = (prob.batch, prob.m, prob.k, prob.n);
    let av = read_f32("gemm", a)?;
    let bv = read_f32("gemm", b)?;
    let mut out = vec![0f32; batch * m * n];
    for_rows(
        &mut out,
        n,
        threads,
        batch * m * n * k,
        |first_row, rows| {
            for (r, row) in rows.chunks_mut(n.max(1)).enumerate() {
                let row_index = first_row + r;
                let (p, i) = (row_index / m.max(1), row_index % m.max(1));
                let a_row = &av[(p * m + i) * k..][..k];
                for (kk, &aik) in a_row.iter().enumerate() {
                    let b_row = &bv[(p * k + kk) * n..][..n];
                    for (c, &bkj) in row.iter_mut().zip(b_row) {
                        *c += aik * bkj;
                    }
                }
            }
        },
    )?;
    prob.finish(crate::KernelSet::Scalar, out, ep.alpha, ep.activation, None)
}
