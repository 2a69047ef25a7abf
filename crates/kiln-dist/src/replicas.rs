//! A model's replicas kept in step: weights broadcast from rank 0, gradients
//! averaged in buckets, and a digest of the weights to prove that every rank
//! holds the same bits.
//!
//! ```
//! use kiln_core::{GradStore, Tensor, Var};
//! use kiln_cpu::CpuBackend;
//! use kiln_dist::{replicas, Local};
//!
//! let backend = CpuBackend::reference();
//! let mut w = Var::from_tensor(&Tensor::from_slice(&[1.0, 2.0], &[2], &backend)?)?;
//! let world = Local::new();
//! replicas::broadcast_params(&world, &mut [&mut w])?;
//! let loss = w.as_tensor().square()?.sum_all()?;
//! let mut grads = loss.backward()?;
//! // This rank computed its gradient on the whole batch: weight 1.
//! let sync = replicas::average_gradients(&world, &[&w], &mut grads, 1.0, replicas::DEFAULT_BUCKET_BYTES)?;
//! assert_eq!(grads.get_id(w.id()).unwrap().to_vec_f32()?, vec![2.0, 4.0]);
//! assert_eq!(sync.buckets, 1);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::time::Instant;

use kiln_core::{Backend, DType, Error, GradStore, HostData, Result, Tensor, Var};

use crate::Collective;

/// Bytes of gradient per all-reduce call by default: about PyTorch DDP's
/// 25 MB buckets.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// What one gradient average moved, and the time it took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Synced {
    /// All-reduce calls made.
    pub buckets: usize,
    /// Gradient bytes each rank contributed (f32).
    pub bytes: usize,
    /// Wall-clock seconds spent copying and reducing.
    pub seconds: f64,
}

/// Copies rank 0's parameter values into every rank's `params` (the same
/// parameters, in the same order, everywhere), so that every replica starts
/// from the same weights whatever each rank initialised.
pub fn broadcast_params<B: Backend>(c: &dyn Collective, params: &mut [&mut Var<B>]) -> Result<()> {
    if c.world() == 1 {
        return Ok(());
    }
    for p in params.iter_mut() {
        let host = p.value().to_host()?;
        let mut bytes = host.as_bytes().to_vec();
        c.broadcast(&mut bytes, 0)?;
        let values = HostData::from_bytes(host.dtype(), &bytes)?;
        let t = Tensor::from_host(values, p.shape().dims(), p.backend())?;
        p.set(&t)?;
    }
    Ok(())
}

/// Replaces each parameter's gradient by the weighted sum over the ranks of
/// `weight × gradient` — the gradient of the global batch's mean loss when
/// each rank's `weight` is its share of the batch (`local / global`
/// examples). Gradients are flattened, in parameter order, into f32 buckets
/// of about `bucket_bytes` (a parameter larger than a bucket is a bucket of
/// its own), each reduced by one all-reduce; a parameter this rank has no
/// gradient for (an empty shard) contributes zeros, and one that no rank
/// has a gradient for stays without one (as in one process, where the
/// optimiser then leaves it alone). Gradients come back in the dtype they
/// had (a parameter's dtype where no rank's was known here).
///
/// Every rank must call this with the same parameters in the same order.
pub fn average_gradients<B: Backend>(
    c: &dyn Collective,
    params: &[&Var<B>],
    grads: &mut GradStore<B>,
    weight: f32,
    bucket_bytes: usize,
) -> Result<Synced> {
    if !weight.is_finite() || weight < 0.0 {
        return Err(Error::invalid(format!(
            "gradient weight {weight}: expected a finite share of the batch ≥ 0"
        )));
    }
    let start = Instant::now();
    let floats = (bucket_bytes / 4).max(1);
    let mut synced = Synced::default();
    let mut first = 0;
    while first < params.len() {
        // The bucket: whole parameters up to `floats` (at least one).
        let mut end = first;
        let mut len = 0;
        while end < params.len() && (end == first || len + params[end].numel() <= floats) {
            len += params[end].numel();
            end += 1;
        }
        // The gradients, then one presence count per parameter.
        let mut flat = Vec::with_capacity(len + end - first);
        for p in &params[first..end] {
            match grads.get_id(p.id()) {
                Some(g) => {
                    let values = g.to_vec_f32()?;
                    if values.len() != p.numel() {
                        return Err(Error::shape(
                            "average_gradients",
                            format!(
                                "a gradient of {} values for a parameter of {}",
                                values.len(),
                                p.numel()
                            ),
                        ));
                    }
                    flat.extend(values.iter().map(|v| v * weight));
                }
                None => flat.resize(flat.len() + p.numel(), 0.0),
            }
        }
        for p in &params[first..end] {
            flat.push(if grads.get_id(p.id()).is_some() {
                1.0
            } else {
                0.0
            });
        }
        c.all_reduce_sum_f32(&mut flat)?;
        let mut at = 0;
        for (i, p) in params[first..end].iter().enumerate() {
            if flat[len + i] == 0.0 {
                // No rank reached this parameter.
                at += p.numel();
                continue;
            }
            let dtype = grads.get_id(p.id()).map_or(p.dtype(), Tensor::dtype);
            let part = flat[at..at + p.numel()].to_vec();
            at += p.numel();
            let mut g = Tensor::from_host(HostData::F32(part), p.shape().dims(), p.backend())?;
            if dtype != DType::F32 {
                g = g.cast(dtype)?;
            }
            grads.insert(p.id(), g);
        }
        synced.buckets += 1;
        synced.bytes += 4 * len;
        first = end;
    }
    synced.seconds = start.elapsed().as_secs_f64();
    Ok(synced)
}

/// A 64-bit FNV-1a digest of the parameters' bytes, in order: equal on two
/// ranks when (short of a collision) their weights are bit-identical.
pub fn digest<B: Backend>(params: &[&Var<B>]) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in params {
        for &b in p.value().to_host()?.as_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    Ok(h)
}

/// Checks that every rank holds the same weights as rank 0 — one digest
/// broadcast — and names the first rank that does not.
pub fn check_replicas<B: Backend>(c: &dyn Collective, params: &[&Var<B>], step: u64) -> Result<()> {
    if c.world() == 1 {
        return Ok(());
    }
    let mine = digest(params)?;
    let mut root = mine.to_le_bytes();
    c.broadcast(&mut root, 0)?;
    let theirs = u64::from_le_bytes(root);
    // Every rank learns how many differ, so all stop together.
    let mut differ = [f64::from(u8::from(mine != theirs))];
    c.all_reduce_sum_f64(&mut differ)?;
    if differ[0] > 0.0 {
        return Err(Error::Backend(format!(
            "after step {step}, {} of {} ranks hold weights that differ from rank 0's \
             (this rank: digest {mine:016x}, rank 0: {theirs:016x}); the replicas have diverged",
            differ[0],
            c.world()
        )));
    }
    Ok(())
}

/// Checks that every rank was started with the same `text` (a run's
/// settings, a dataset's fingerprint) as rank 0: an error on every rank
/// when any differs, saying what this rank has and what rank 0 has.
pub fn agree(c: &dyn Collective, what: &str, text: &str) -> Result<()> {
    if c.world() == 1 {
        return Ok(());
    }
    let mut len = (text.len() as u64).to_le_bytes();
    c.broadcast(&mut len, 0)?;
    let root_len = usize::try_from(u64::from_le_bytes(len))
        .map_err(|_| Error::invalid(format!("rank 0's {what} is too long")))?;
    let mut root = text.as_bytes().to_vec();
    root.resize(root_len, 0);
    c.broadcast(&mut root, 0)?;
    let theirs = String::from_utf8_lossy(&root);
    let mut differ = [f64::from(u8::from(theirs != text))];
    c.all_reduce_sum_f64(&mut differ)?;
    if differ[0] > 0.0 {
        let detail = if theirs == text {
            "this rank agrees with rank 0".to_string()
        } else {
            format!("this rank (rank {}): {text}; rank 0: {theirs}", c.rank())
        };
        return Err(Error::invalid(format!(
            "the ranks were started with different {what} ({} of {} differ from rank 0; {detail}): \
             start every rank with the same data and flags",
            differ[0],
            c.world()
        )));
    }
    Ok(())
}

/// The examples `rank` of `world` takes from a batch of `n`: contiguous,
/// disjoint, sizes differing by at most one, covering the batch.
pub fn shard(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    n * rank / world..n * (rank + 1) / world
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Local;
    use kiln_cpu::CpuBackend;

    #[test]
    fn shards_are_disjoint_and_cover_the_batch() {
        for world in 1..6 {
            for n in 0..20 {
                let mut next = 0;
                for r in 0..world {
                    let s = shard(n, r, world);
                    assert_eq!(s.start, next);
                    assert!(s.len() == n / world || s.len() == n / world + 1);
                    next = s.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn buckets_hold_whole_parameters_and_unreached_ones_stay_without_gradients() {
        let b = CpuBackend::reference();
        let var =
            |v: &[f32]| Var::from_tensor(&Tensor::from_slice(v, &[v.len()], &b).unwrap()).unwrap();
        let (p, q, r) = (var(&[1.0, 2.0, 3.0]), var(&[4.0]), var(&[5.0, 6.0]));
        let loss = p
            .as_tensor()
            .sum_all()
            .unwrap()
            .add(&r.as_tensor().square().unwrap().sum_all().unwrap())
            .unwrap();
        let mut grads = loss.backward().unwrap();
        assert!(grads.get_id(q.id()).is_none());
        // 12-byte buckets: [p], then q (1) + r (2) = 3 floats fit.
        let s = average_gradients(&Local, &[&p, &q, &r], &mut grads, 0.5, 12).unwrap();
        assert_eq!((s.buckets, s.bytes), (2, 24));
        let g = |v: &Var<CpuBackend>| grads.get_id(v.id()).unwrap().to_vec_f32().unwrap();
        assert_eq!(g(&p), [0.5, 0.5, 0.5]);
        assert_eq!(g(&r), [5.0, 6.0]);
        // No rank had a gradient for q: it still has none.
        assert!(grads.get_id(q.id()).is_none());
        assert!(average_gradients(&Local, &[&p], &mut grads, f32::NAN, 12).is_err());
    }

    #[test]
    fn the_digest_sees_one_bit() {
        let b = CpuBackend::reference();
        let p = Var::from_tensor(&Tensor::from_slice(&[1.0, 2.0], &[2], &b).unwrap()).unwrap();
        let q = Var::from_tensor(
            &Tensor::from_slice(&[1.0, f32::from_bits(2f32.to_bits() + 1)], &[2], &b).unwrap(),
        )
        .unwrap();
        assert_ne!(digest(&[&p]).unwrap(), digest(&[&q]).unwrap());
        assert_eq!(digest(&[&p]).unwrap(), digest(&[&p.clone()]).unwrap());
        check_replicas(&Local, &[&p], 1).unwrap();
    }
}
