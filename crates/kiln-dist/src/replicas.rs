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

use kiln_core::{Backend, DType, Error, GradStore, HostData, Layout, Result, Shape, Tensor, Var};

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
        let bucket = &params[first..end];
        let in_storage = bucket
            .iter()
            .all(|p| c.reduces_storage(&**p.as_tensor().storage()));
        if in_storage {
            average_in_storage(c, bucket, grads, weight, len)?;
        } else {
            average_on_host(c, bucket, grads, weight, len)?;
        }
        synced.buckets += 1;
        synced.bytes += 4 * len;
        first = end;
    }
    synced.seconds = start.elapsed().as_secs_f64();
    Ok(synced)
}

/// One bucket through host memory: the gradients (times `weight`) and one
/// presence count per parameter in one f32 all-reduce.
fn average_on_host<B: Backend>(
    c: &dyn Collective,
    bucket: &[&Var<B>],
    grads: &mut GradStore<B>,
    weight: f32,
    len: usize,
) -> Result<()> {
    let mut flat = Vec::with_capacity(len + bucket.len());
    for p in bucket {
        match grads.get_id(p.id()) {
            Some(g) => {
                let values = g.to_vec_f32()?;
                check_len(values.len(), p)?;
                flat.extend(values.iter().map(|v| v * weight));
            }
            None => flat.resize(flat.len() + p.numel(), 0.0),
        }
    }
    flat.extend(presence(bucket, grads));
    c.all_reduce_sum_f32(&mut flat)?;
    let mut at = 0;
    for (i, p) in bucket.iter().enumerate() {
        let part = at..at + p.numel();
        at += p.numel();
        if flat[len + i] == 0.0 {
            // No rank reached this parameter.
            continue;
        }
        let dtype = grads.get_id(p.id()).map_or(p.dtype(), Tensor::dtype);
        let g = averaged(&flat[part], p.shape().dims(), dtype, p.backend())?;
        grads.insert(p.id(), g);
    }
    Ok(())
}

/// A parameter's averaged gradient from its summed f32 `values`, on
/// `backend`, in the `dtype` its gradients have.
pub(crate) fn averaged<B: Backend>(
    values: &[f32],
    dims: &[usize],
    dtype: DType,
    backend: &B,
) -> Result<Tensor<B>> {
    let g = Tensor::from_host(HostData::F32(values.to_vec()), dims, backend)?;
    if dtype == DType::F32 {
        Ok(g)
    } else {
        g.cast(dtype)
    }
}

/// One bucket in the backend's own memory, for an engine that sums it
/// there (NCCL on GPU memory): the gradients (times `weight`) copied into
/// one f32 storage on the device, summed in place, and handed back as
/// views of it; the presence counts, a few floats, through host memory.
fn average_in_storage<B: Backend>(
    c: &dyn Collective,
    bucket: &[&Var<B>],
    grads: &mut GradStore<B>,
    weight: f32,
    len: usize,
) -> Result<()> {
    let mut reached: Vec<f32> = presence(bucket, grads).collect();
    c.all_reduce_sum_f32(&mut reached)?;
    let backend = bucket[0].backend();
    let mut flat = backend.full(len, DType::F32, 0.0)?;
    let whole = Layout::contiguous(Shape::new(&[len])?);
    let mut at = 0;
    for p in bucket {
        if let Some(g) = grads.get_id(p.id()) {
            check_len(g.numel(), p)?;
            let g = if g.dtype() == DType::F32 {
                g.clone()
            } else {
                g.cast(DType::F32)?
            };
            let g = g.affine(weight, 0.0)?.reshape(&[p.numel()])?;
            backend.copy_strided(g.view(), &mut flat, &whole.narrow(0, at, p.numel())?)?;
        }
        at += p.numel();
    }
    c.all_reduce_sum_storage(&mut flat)?;
    let summed = Tensor::from_storage(std::sync::Arc::new(flat), whole, backend)?;
    let mut at = 0;
    for (p, &count) in bucket.iter().zip(&reached) {
        let part = summed.narrow(0, at, p.numel())?.reshape(p.shape().dims())?;
        at += p.numel();
        if count == 0.0 {
            continue;
        }
        let dtype = grads.get_id(p.id()).map_or(p.dtype(), Tensor::dtype);
        grads.insert(
            p.id(),
            if dtype == DType::F32 {
                part
            } else {
                part.cast(dtype)?
            },
        );
    }
    Ok(())
}

/// 1 for each parameter of `bucket` this rank has a gradient for, else 0.
fn presence<'a, B: Backend>(
    bucket: &'a [&Var<B>],
    grads: &'a GradStore<B>,
) -> impl Iterator<Item = f32> + 'a {
    bucket
        .iter()
        .map(|p| f32::from(u8::from(grads.get_id(p.id()).is_some())))
}

fn check_len<B: Backend>(values: usize, p: &Var<B>) -> Result<()> {
    if values == p.numel() {
        return Ok(());
    }
    Err(Error::shape(
        "average_gradients",
        format!(
            "a gradient of {values} values for a parameter of {}",
            p.numel()
        ),
    ))
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

    /// An engine that sums the CPU backend's storage in place, as NCCL
    /// sums CUDA storage: the in-storage path without a GPU.
    struct InStorage(crate::InProcess);

    impl Collective for InStorage {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world(&self) -> usize {
            self.0.world()
        }
        fn describe(&self) -> String {
            "in-storage test engine".into()
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            self.0.all_reduce_sum_f32(buf)
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            self.0.all_reduce_sum_f64(buf)
        }
        fn all_reduce_sum_storage(&self, storage: &mut dyn std::any::Any) -> Result<()> {
            match storage.downcast_mut::<HostData>() {
                Some(HostData::F32(v)) => self.0.all_reduce_sum_f32(v),
                _ => Err(Error::invalid("not f32 host storage")),
            }
        }
        fn reduces_storage(&self, storage: &dyn std::any::Any) -> bool {
            storage.is::<HostData>()
        }
        fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
            self.0.broadcast(buf, root)
        }
        fn barrier(&self) -> Result<()> {
            self.0.barrier()
        }
        fn abort(&self, code: i32) -> ! {
            self.0.abort(code)
        }
    }

    /// Rank `rank`'s gradients: a matrix, a bf16 vector, one reached by
    /// rank 1 only, one reached by no rank; buckets of `bucket` bytes.
    fn rank_average(c: &dyn Collective, bucket: usize) -> Vec<Option<(DType, Vec<f32>)>> {
        let b = CpuBackend::reference();
        let rank = c.rank() as f32;
        let t = |v: Vec<f32>, dims: &[usize]| Tensor::from_slice(&v, dims, &b).unwrap();
        let w = Var::from_tensor(&t((0..12).map(|i| i as f32 * 0.25).collect(), &[3, 4])).unwrap();
        let h =
            Var::from_tensor(&t(vec![1.5, -2.0, 0.5], &[3]).cast(DType::BF16).unwrap()).unwrap();
        let only1 = Var::from_tensor(&t(vec![3.0, 1.0], &[2])).unwrap();
        let none = Var::from_tensor(&t(vec![7.0], &[1])).unwrap();
        let mut loss = w
            .as_tensor()
            .square()
            .unwrap()
            .affine(rank + 1.0, 0.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .add(
                &h.as_tensor()
                    .cast(DType::F32)
                    .unwrap()
                    .affine(rank - 3.0, 0.0)
                    .unwrap()
                    .sum_all()
                    .unwrap(),
            )
            .unwrap();
        if c.rank() == 1 {
            loss = loss
                .add(&only1.as_tensor().square().unwrap().sum_all().unwrap())
                .unwrap();
        }
        let mut grads = loss.backward().unwrap();
        let params = [&w, &h, &only1, &none];
        let share = if c.rank() == 0 { 0.75 } else { 0.25 };
        average_gradients(c, &params, &mut grads, share, bucket).unwrap();
        params
            .iter()
            .map(|p| {
                grads
                    .get_id(p.id())
                    .map(|g| (g.dtype(), g.to_vec_f32().unwrap()))
            })
            .collect()
    }

    #[test]
    fn gradients_summed_in_storage_match_those_summed_on_the_host() {
        for bucket in [4, 24, DEFAULT_BUCKET_BYTES] {
            let run = |in_storage: bool| {
                let group = crate::InProcess::group(2);
                std::thread::scope(|s| {
                    let handles: Vec<_> = group
                        .into_iter()
                        .map(|r| {
                            s.spawn(move || {
                                if in_storage {
                                    rank_average(&InStorage(r), bucket)
                                } else {
                                    rank_average(&r, bucket)
                                }
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap())
                        .collect::<Vec<_>>()
                })
            };
            let (host, storage) = (run(false), run(true));
            assert_eq!(host, storage, "bucket {bucket}");
            // Both ranks agree; the dtypes are the parameters'; unreached
            // parameters have no gradient; a gradient of one rank counts.
            assert_eq!(storage[0], storage[1]);
            let g = &storage[0];
            assert_eq!(g[0].as_ref().unwrap().0, DType::F32);
            // d/dw of (r+1)·Σw² is 2(r+1)w: 0.75·2w + 0.25·4w = 2.5w.
            let want: Vec<f32> = (0..12).map(|i| 2.5 * (i as f32 * 0.25)).collect();
            assert_eq!(g[0].as_ref().unwrap().1, want);
            assert_eq!(g[1].as_ref().unwrap().0, DType::BF16);
            assert_eq!(g[1].as_ref().unwrap().1, [-2.75; 3]);
            assert_eq!(g[2].as_ref().unwrap().1, [1.5, 0.5]);
            assert!(g[3].is_none());
        }
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
