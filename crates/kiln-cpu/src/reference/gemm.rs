//! Reference GEMM: `C := act(α·A·B + β·C₀ + bias)`, batched.
//!
//! Operands are gathered to row-major f32, then each output row is
//! accumulated over `k` in order (`c[j] += a[i,k]·b[k,j]`, a separate multiply
//! and add), which gives the classic bound γₖ·Σ|aᵢbᵢ| and a result that does
//! not depend on the thread count.

use kiln_core::{Activation, Error, GemmEpilogue, HostData, Result, View};

use crate::reference::elementwise::activate;
use crate::storage::{read_f32, store_f32};
use crate::threads::for_rows;

pub(crate) fn gemm(
    a: View<'_, HostData>,
    b: View<'_, HostData>,
    ep: &GemmEpilogue<'_, HostData>,
    threads: usize,
) -> Result<HostData> {
    let (ad, bd) = (a.layout.dims(), b.layout.dims());
    if ad.len() != 3 || bd.len() != 3 || ad[0] != bd[0] || ad[2] != bd[1] {
        return Err(Error::shape(
            "gemm",
            format!(
                "expected [batch, m, k] and [batch, k, n], got {:?} and {:?}",
                ad, bd
            ),
        ));
    }
    let dtype = a.storage.dtype();
    if b.storage.dtype() != dtype {
        return Err(Error::DType {
            op: "gemm",
            expected: dtype,
            got: b.storage.dtype(),
        });
    }
    let (batch, m, k, n) = (ad[0], ad[1], ad[2], bd[2]);
    let av = read_f32("gemm", a)?;
    let bv = read_f32("gemm", b)?;
    let bias = match ep.bias {
        Some(v) if v.layout.dims() == [n] => Some(read_f32("gemm", v)?),
        Some(v) => {
            return Err(Error::shape(
                "gemm",
                format!("bias has shape {}, expected [{n}]", v.layout.shape()),
            ))
        }
        None => None,
    };
    let c0 = match ep.beta_c {
        Some((beta, v)) if v.layout.dims() == [batch, m, n] => Some((beta, read_f32("gemm", v)?)),
        Some((_, v)) => {
            return Err(Error::shape(
                "gemm",
                format!(
                    "C has shape {}, expected [{batch}, {m}, {n}]",
                    v.layout.shape()
                ),
            ))
        }
        None => None,
    };
    let mut out = vec![0f32; batch * m * n];
    let alpha = ep.alpha;
    let act = ep.activation;
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
                for (j, c) in row.iter_mut().enumerate() {
                    let mut v = alpha * *c;
                    if let Some((beta, c0)) = &c0 {
                        v += beta * c0[row_index * n + j];
                    }
                    if let Some(bias) = &bias {
                        v += bias[j];
                    }
                    *c = if act == Activation::None {
                        v
                    } else {
                        activate(act, v)
                    };
                }
            }
        },
    );
    store_f32("gemm", dtype, out)
}
