//! Gradients averaged while the backward pass still runs: each parameter's
//! gradient is handed over the moment it is final, and a bucket goes to a
//! communication thread — which all-reduces it while the pass goes on — as
//! soon as all its parameters are in.
//!
//! Buckets are planned in reverse parameter order, the order a backward
//! pass finishes them (the last layer's first), and are reduced strictly in
//! bucket order, so every rank makes the same collective calls in the same
//! order whatever the timing — a rank with an empty shard sends zeros for
//! every bucket at the end. The sums are the same as
//! [`crate::replicas::average_gradients`]' (each rank's gradient times its
//! share, one presence count per parameter), element by element, so only
//! when the reduction happens changes.
//!
//! ```
//! use std::sync::Arc;
//! use kiln_core::{Tensor, Var};
//! use kiln_cpu::CpuBackend;
//! use kiln_dist::{overlap::{CommThread, GradientSync}, Local};
//!
//! let b = CpuBackend::reference();
//! let w = Var::from_tensor(&Tensor::from_slice(&[1.0, 2.0], &[2], &b)?)?;
//! let comm = CommThread::start(Arc::new(Local::new()))?;
//! let mut sync = GradientSync::begin(&comm, &[&w], 1.0, 1 << 20);
//! let loss = w.as_tensor().square()?.sum_all()?;
//! let mut grads = loss
//!     .backward_with(|| false, |id, g| sync.deliver(id, g))?
//!     .expect("not stopped");
//! let synced = sync.finish(&mut grads)?;
//! assert_eq!(grads.get_id(w.id()).unwrap().to_vec_f32()?, [2.0, 4.0]);
//! assert_eq!(synced.buckets, 1);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use kiln_core::{Backend, DType, Error, GradStore, Result, Tensor, TensorId, Var};

use crate::replicas::{averaged, Synced};
use crate::Collective;

/// One bucket to reduce, and where to send it back.
struct Job {
    bucket: usize,
    flat: Vec<f32>,
    reply: Sender<(usize, Result<Vec<f32>>)>,
}

/// A thread that makes a collective's gradient all-reduces, one at a time
/// in the order they are submitted, while the submitting thread computes.
///
/// The calling thread must not make collective calls of its own while
/// reductions it submitted are outstanding ([`GradientSync::finish`]
/// waits for them), so that every rank makes its calls in one order.
pub struct CommThread {
    jobs: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for CommThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommThread")
    }
}

impl CommThread {
    /// Starts the thread, which makes its calls on `collective`.
    pub fn start(collective: Arc<dyn Collective>) -> Result<Self> {
        let (jobs, queue) = channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("kiln-allreduce".into())
            .spawn(move || {
                for mut job in queue {
                    let r = collective.all_reduce_sum_f32(&mut job.flat);
                    // The step that asked may have ended with an error.
                    let _ = job.reply.send((job.bucket, r.map(|()| job.flat)));
                }
            })
            .map_err(|e| Error::Backend(format!("starting the all-reduce thread: {e}")))?;
        Ok(CommThread {
            jobs: Some(jobs),
            handle: Some(handle),
        })
    }

    fn submit(&self, job: Job) -> Result<()> {
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(|| Error::Backend("the all-reduce thread has ended".into()))
    }
}

impl Drop for CommThread {
    fn drop(&mut self) {
        // Closing the queue ends the thread after the jobs already in it.
        drop(self.jobs.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What [`GradientSync`] knows of one parameter.
struct Param<B: Backend> {
    id: TensorId,
    numel: usize,
    dims: Vec<usize>,
    dtype: DType,
    backend: B,
    bucket: usize,
    /// Its gradient's dtype and values times the weight, once delivered.
    delivered: Option<(DType, Vec<f32>)>,
}

/// One step's gradient average, overlapped with its backward pass: made by
/// [`GradientSync::begin`], fed by [`GradientSync::deliver`] from
/// [`kiln_core::Tensor::backward_with`], closed by
/// [`GradientSync::finish`].
pub struct GradientSync<'a, B: Backend> {
    comm: &'a CommThread,
    params: Vec<Param<B>>,
    index: HashMap<TensorId, usize>,
    /// Per bucket: its parameters (indices into `params`), in its order.
    buckets: Vec<Vec<usize>>,
    /// Per bucket: parameters not yet delivered.
    missing: Vec<usize>,
    weight: f32,
    sent: usize,
    /// Dropped before waiting, so that a thread that died is an error, not a hang.
    replies: Option<Sender<(usize, Result<Vec<f32>>)>>,
    done: Receiver<(usize, Result<Vec<f32>>)>,
    bytes: usize,
}

impl<'a, B: Backend> GradientSync<'a, B> {
    /// Plans the buckets — whole parameters, in reverse order, up to
    /// `bucket_bytes` of f32 each (at least one parameter) — for a rank
    /// whose gradients count `weight` (its share of the global batch).
    pub fn begin(
        comm: &'a CommThread,
        params: &[&Var<B>],
        weight: f32,
        bucket_bytes: usize,
    ) -> Self {
        let floats = (bucket_bytes / 4).max(1);
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut len = 0;
        for i in (0..params.len()).rev() {
            let n = params[i].numel();
            match buckets.last_mut() {
                Some(b) if len + n <= floats => {
                    b.push(i);
                    len += n;
                }
                _ => {
                    buckets.push(vec![i]);
                    len = n;
                }
            }
        }
        let mut bucket_of = vec![0; params.len()];
        for (b, members) in buckets.iter().enumerate() {
            for &i in members {
                bucket_of[i] = b;
            }
        }
        let params: Vec<Param<B>> = params
            .iter()
            .zip(bucket_of)
            .map(|(p, bucket)| Param {
                id: p.id(),
                numel: p.numel(),
                dims: p.shape().dims().to_vec(),
                dtype: p.dtype(),
                backend: p.backend().clone(),
                bucket,
                delivered: None,
            })
            .collect();
        let (replies, done) = channel();
        GradientSync {
            comm,
            index: params.iter().enumerate().map(|(i, p)| (p.id, i)).collect(),
            missing: buckets.iter().map(Vec::len).collect(),
            buckets,
            params,
            weight,
            sent: 0,
            replies: Some(replies),
            done,
            bytes: 0,
        }
    }

    /// Hands over a final gradient (other leaves' are ignored); a bucket
    /// whose parameters are all in — and every bucket before it — goes to
    /// the communication thread.
    pub fn deliver(&mut self, id: TensorId, grad: &Tensor<B>) -> Result<()> {
        let Some(&i) = self.index.get(&id) else {
            return Ok(());
        };
        let p = &mut self.params[i];
        if p.delivered.is_some() {
            return Err(Error::invalid(
                "a parameter's gradient was delivered twice in one step",
            ));
        }
        let values = grad.to_vec_f32()?;
        if values.len() != p.numel {
            return Err(Error::shape(
                "average_gradients",
                format!(
                    "a gradient of {} values for a parameter of {}",
                    values.len(),
                    p.numel
                ),
            ));
        }
        let w = self.weight;
        p.delivered = Some((grad.dtype(), values.into_iter().map(|v| v * w).collect()));
        self.missing[p.bucket] -= 1;
        self.send_ready(false)
    }

    /// Sends, in order, the buckets that are complete — or all of them
    /// when `all` (the pass is over: what was not delivered is zero).
    fn send_ready(&mut self, all: bool) -> Result<()> {
        while self.sent < self.buckets.len() && (all || self.missing[self.sent] == 0) {
            let b = self.sent;
            let members = &self.buckets[b];
            let len: usize = members.iter().map(|&i| self.params[i].numel).sum();
            let mut flat = Vec::with_capacity(len + members.len());
            for &i in members {
                match &self.params[i].delivered {
                    Some((_, v)) => flat.extend_from_slice(v),
                    None => flat.resize(flat.len() + self.params[i].numel, 0.0),
                }
            }
            flat.extend(
                members
                    .iter()
                    .map(|&i| f32::from(u8::from(self.params[i].delivered.is_some()))),
            );
            self.bytes += 4 * len;
            let reply = self
                .replies
                .clone()
                .ok_or_else(|| Error::invalid("gradients sent after the step's sync finished"))?;
            self.comm.submit(Job {
                bucket: b,
                flat,
                reply,
            })?;
            self.sent += 1;
        }
        Ok(())
    }

    /// After the pass: delivers the gradients in `grads` that were not
    /// handed over, sends what is left, waits for every bucket, and
    /// puts the averaged gradients into `grads` in their own dtypes (a
    /// parameter no rank reached gets none). The seconds returned are those
    /// this thread waited — the communication the pass did not hide.
    pub fn finish(mut self, grads: &mut GradStore<B>) -> Result<Synced> {
        let start = Instant::now();
        // Gradients the pass did not hand over (those of earlier
        // micro-batches only, or a caller's own) count as delivered now.
        for i in 0..self.params.len() {
            let id = self.params[i].id;
            if self.params[i].delivered.is_none() {
                if let Some(g) = grads.get_id(id).cloned() {
                    self.deliver(id, &g)?;
                }
            }
        }
        self.send_ready(true)?;
        self.replies = None;
        let mut summed: Vec<Option<Vec<f32>>> = vec![None; self.buckets.len()];
        for _ in 0..self.buckets.len() {
            let (b, flat) = self
                .done
                .recv()
                .map_err(|_| Error::Backend("the all-reduce thread has ended".into()))?;
            summed[b] = Some(flat?);
        }
        for (members, flat) in self.buckets.iter().zip(summed) {
            let flat = flat.ok_or_else(|| Error::Backend("a bucket was answered twice".into()))?;
            let len = flat.len() - members.len();
            let mut at = 0;
            for (k, &i) in members.iter().enumerate() {
                let p = &self.params[i];
                let part = at..at + p.numel;
                at += p.numel;
                if flat[len + k] == 0.0 {
                    // No rank reached this parameter.
                    grads.remove(p.id);
                    continue;
                }
                let dtype = p.delivered.as_ref().map_or(p.dtype, |(d, _)| *d);
                grads.insert(p.id, averaged(&flat[part], &p.dims, dtype, &p.backend)?);
            }
        }
        Ok(Synced {
            buckets: self.buckets.len(),
            bytes: self.bytes,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}
