//! A world of threads in one process: N replicas without a launcher.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kiln_core::{Error, Result};

use crate::Collective;

/// How long a rank waits for the others in one collective before it gives
/// up with an error (a rank that died or never came is not waited for
/// forever).
const PATIENCE: Duration = Duration::from_secs(120);

/// One rank of a group of threads in one process that act as separate
/// processes: every collective blocks until all ranks have called it, and
/// sums add the ranks' values in rank order, so results are deterministic.
///
/// For tests of data-parallel code and for comparing an engine with a
/// known-good one, without `mpirun`. [`Collective::abort`] ends only the
/// calling thread (by a panic); every other rank's next collective call then
/// returns an error instead of waiting, as they do if a rank waits longer
/// than two minutes.
///
/// ```
/// use kiln_dist::{Collective, InProcess};
///
/// let ranks = InProcess::group(3);
/// let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
///     let handles: Vec<_> = ranks
///         .iter()
///         .map(|c| s.spawn(move || {
///             let mut v = vec![c.rank() as f32, 1.0];
///             c.all_reduce_sum_f32(&mut v).unwrap();
///             v
///         }))
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert!(sums.iter().all(|v| v == &[3.0, 3.0]));
/// ```
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    turn: Condvar,
}

#[derive(Default)]
struct State {
    /// Each rank's contribution to the collective under way.
    slots: Vec<Option<Payload>>,
    arrived: usize,
    /// Set once all have arrived (or why the contributions do not fit
    /// together); taken by each rank in turn.
    result: Option<std::result::Result<Payload, String>>,
    departed: usize,
    /// A rank that aborted, and its code.
    aborted: Option<(usize, i32)>,
}

#[derive(Clone)]
enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>, usize),
    Nothing,
}

impl InProcess {
    /// The `world` ranks of a new group, rank `i` at index `i`; hand one
    /// to each thread.
    pub fn group(world: usize) -> Vec<InProcess> {
        let world = world.max(1);
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: vec![None; world],
                ..State::default()
            }),
            turn: Condvar::new(),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits on the condition until `ready`, failing on an abort or after
    /// [`PATIENCE`].
    fn wait_until<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        ready: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>> {
        loop {
            if let Some((rank, code)) = st.aborted {
                return Err(Error::Backend(format!(
                    "rank {rank} of {} aborted the group (code {code})",
                    self.shared.world
                )));
            }
            if ready(&st) {
                return Ok(st);
            }
            let (next, timeout) = self
                .shared
                .turn
                .wait_timeout(st, PATIENCE)
                .unwrap_or_else(|e| e.into_inner());
            st = next;
            if timeout.timed_out() && !ready(&st) {
                // The group is broken: free the others too.
                st.aborted.get_or_insert((self.rank, -1));
                self.shared.turn.notify_all();
                return Err(Error::Backend(format!(
                    "rank {} waited {} s for the other ranks of {} in a collective: one died or \
                     took another path",
                    self.rank,
                    PATIENCE.as_secs(),
                    self.shared.world
                )));
            }
        }
    }

    /// Deposits `mine`, waits for every rank, and returns what `combine`
    /// made of the contributions (in rank order).
    fn exchange(
        &self,
        mine: Payload,
        combine: impl Fn(&[Payload]) -> Result<Payload>,
    ) -> Result<Payload> {
        let world = self.shared.world;
        // The previous collective's result must be taken by all first.
        let mut st = self.wait_until(self.lock(), |s| s.result.is_none())?;
        st.slots[self.rank] = Some(mine);
        st.arrived += 1;
        if st.arrived == world {
            let all: Vec<Payload> = st
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or(Payload::Nothing))
                .collect();
            st.result = Some(combine(&all).map_err(|e| e.to_string()));
            st.arrived = 0;
            st.departed = 0;
            self.shared.turn.notify_all();
        }
        let mut st = self.wait_until(st, |s| s.result.is_some() && s.arrived == 0)?;
        let out = st.result.clone().unwrap_or(Ok(Payload::Nothing));
        st.departed += 1;
        if st.departed == world {
            st.result = None;
            self.shared.turn.notify_all();
        }
        out.map_err(Error::invalid)
    }
}

impl InProcess {
    /// The element-wise sum over the ranks of `buf`, whose values travel
    /// as the payload `wrap` makes and `unwrap` reads back.
    fn all_reduce<T: Copy + std::ops::Add<Output = T>>(
        &self,
        buf: &mut [T],
        wrap: fn(Vec<T>) -> Payload,
        unwrap: fn(&Payload) -> Option<&Vec<T>>,
    ) -> Result<()> {
        let r = self.exchange(wrap(buf.to_vec()), |all| {
            let parts: Vec<&Vec<T>> = all.iter().filter_map(unwrap).collect();
            if parts.len() != all.len() {
                return Err(Error::invalid("ranks called different collectives"));
            }
            sum(&parts).map(wrap)
        })?;
        match unwrap(&r) {
            Some(v) if v.len() == buf.len() => buf.copy_from_slice(v),
            _ => return Err(Error::invalid("all-reduce: ranks' buffers differ")),
        }
        Ok(())
    }
}

/// Element-wise sums of equally long vectors, in the order given.
fn sum<T: Copy + std::ops::Add<Output = T>>(parts: &[&Vec<T>]) -> Result<Vec<T>> {
    let mut out = parts[0].clone();
    for p in &parts[1..] {
        if p.len() != out.len() {
            return Err(Error::invalid(format!(
                "all-reduce of buffers of different lengths ({} and {})",
                out.len(),
                p.len()
            )));
        }
        for (o, &v) in out.iter_mut().zip(p.iter()) {
            *o = *o + v;
        }
    }
    Ok(out)
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn describe(&self) -> String {
        format!("in-process ({} threads)", self.shared.world)
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(buf, Payload::F32, |p| match p {
            Payload::F32(v) => Some(v),
            _ => None,
        })
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(buf, Payload::F64, |p| match p {
            Payload::F64(v) => Some(v),
            _ => None,
        })
    }
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.shared.world {
            return Err(Error::invalid(format!(
                "broadcast from rank {root} in a world of {}",
                self.shared.world
            )));
        }
        let r = self.exchange(Payload::Bytes(buf.to_vec(), root), |all| match &all[root] {
            Payload::Bytes(v, r) if *r == root => Ok(Payload::Bytes(v.clone(), root)),
            _ => Err(Error::invalid("ranks called different collectives")),
        })?;
        match r {
            Payload::Bytes(v, _) if v.len() == buf.len() => buf.copy_from_slice(&v),
            _ => return Err(Error::invalid("broadcast: ranks' buffers differ in length")),
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(Payload::Nothing, |_| Ok(Payload::Nothing))
            .map(|_| ())
    }
    fn abort(&self, code: i32) -> ! {
        let mut st = self.lock();
        st.aborted.get_or_insert((self.rank, code));
        drop(st);
        self.shared.turn.notify_all();
        panic!(
            "rank {} aborted its in-process group with code {code}",
            self.rank
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_threads<T: Send>(world: usize, f: impl Fn(&InProcess) -> T + Sync) -> Vec<T> {
        let ranks = InProcess::group(world);
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks.iter().map(|c| s.spawn(|| f(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn many_collectives_in_a_row_stay_in_step() {
        let out = on_threads(4, |c| {
            let mut acc = Vec::new();
            for i in 0..200 {
                let mut v = [c.rank() as f64 + i as f64];
                c.all_reduce_sum_f64(&mut v).unwrap();
                let mut b = [c.rank() as u8; 3];
                c.broadcast(&mut b, i % 4).unwrap();
                acc.push((v[0], b[0]));
            }
            c.barrier().unwrap();
            acc
        });
        for (i, &(sum, root)) in out[0].iter().enumerate() {
            assert_eq!(sum, 6.0 + 4.0 * i as f64);
            assert_eq!(root as usize, i % 4);
        }
        assert!(out.iter().all(|o| o == &out[0]));
    }

    #[test]
    fn an_aborting_rank_frees_the_others_with_an_error() {
        let ranks = InProcess::group(2);
        std::thread::scope(|s| {
            let quitter = s.spawn(|| ranks[1].abort(3));
            let mut v = [1.0f32];
            let e = ranks[0].all_reduce_sum_f32(&mut v).unwrap_err().to_string();
            assert!(e.contains("rank 1 of 2 aborted"), "{e}");
            assert!(quitter.join().is_err());
        });
    }

    #[test]
    fn mismatched_buffers_are_an_error_not_garbage() {
        let out = on_threads(2, |c| {
            let mut v = vec![0f32; 1 + c.rank()];
            c.all_reduce_sum_f32(&mut v).is_err()
        });
        assert_eq!(out, [true, true]);
    }
}
