//! How ranks meet: a [`Collective`] gathers every rank's tensor to rank 0.
//!
//! Ranks are threads of one process, so every collective call first meets the
//! other ranks on the host ([`HostSync`]): each arrives with its outcome, and
//! nobody moves data unless every rank arrived well within the timeout. A rank
//! that failed (an error, out of memory, a cancel) makes every other rank's
//! next call fail with that rank's reason; one that stops answering fails the
//! call after the timeout. Only then is data moved: through host memory for
//! CPU ranks ([`InProcessCollective`]), over NCCL for GPU ranks
//! (`super::nccl::NcclCollective`), which therefore never blocks on a rank
//! that is not there.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

/// Why a collective call did not complete.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CollectiveError {
    /// Another rank (or this one) gave up on the job.
    #[error("rank {rank} failed: {message}")]
    RankFailed { rank: usize, message: String },
    /// A rank stopped the job because it was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// Some ranks did not arrive in time.
    #[error("ranks {missing:?} did not answer within {timeout:?}")]
    Timeout { missing: Vec<usize>, timeout: Duration },
    /// The transport itself failed (NCCL, a device copy).
    #[error("collective transport: {0}")]
    Transport(String),
}

/// Why a rank leaves a job early.
#[derive(Debug, Clone, PartialEq)]
pub enum Abandon {
    Failed(String),
    Cancelled,
}

#[derive(Debug, Default)]
struct Round {
    payloads: Vec<Option<Tensor>>,
    arrived: Vec<bool>,
    left: usize,
}

#[derive(Debug, Default)]
struct State {
    rounds: HashMap<(u64, u64), Round>,
    /// The first reason a job was given up, by job.
    abandoned: HashMap<u64, (usize, Abandon)>,
}

/// The host-side meeting point of all ranks of one worker.
#[derive(Debug)]
pub struct HostSync {
    world_size: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

impl HostSync {
    pub fn new(world_size: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            world_size,
            timeout,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        })
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Forgets everything about jobs before `job` (called as a job starts).
    pub fn begin_job(&self, job: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.rounds.retain(|(j, _), _| *j >= job);
        st.abandoned.retain(|j, _| *j >= job);
    }

    /// Rank `rank` gives up `job`: every rank's pending and later calls of it fail.
    pub fn abandon(&self, job: u64, rank: usize, why: Abandon) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.abandoned.entry(job).or_insert((rank, why));
        self.changed.notify_all();
    }

    fn abandoned_error(st: &State, job: u64) -> Option<CollectiveError> {
        st.abandoned.get(&job).map(|(rank, why)| match why {
            Abandon::Cancelled => CollectiveError::Cancelled,
            Abandon::Failed(message) => CollectiveError::RankFailed {
                rank: *rank,
                message: message.clone(),
            },
        })
    }

    /// Round `round` of `job`: waits until every rank arrived, then returns the
    /// payloads to rank 0 (`Some`) and `None` to the others.
    pub fn meet(
        &self,
        job: u64,
        round: u64,
        rank: usize,
        payload: Option<Tensor>,
    ) -> Result<Option<Vec<Option<Tensor>>>, CollectiveError> {
        let n = self.world_size;
        let deadline = Instant::now() + self.timeout;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(err) = Self::abandoned_error(&st, job) {
            return Err(err);
        }
        {
            let r = st.rounds.entry((job, round)).or_insert_with(|| Round {
                payloads: vec![None; n],
                arrived: vec![false; n],
                left: 0,
            });
            r.payloads[rank] = payload;
            r.arrived[rank] = true;
        }
        self.changed.notify_all();
        loop {
            if let Some(err) = Self::abandoned_error(&st, job) {
                return Err(err);
            }
            let r = st
                .rounds
                .get_mut(&(job, round))
                .expect("round exists until every rank left");
            if r.arrived.iter().all(|&a| a) {
                let out = (rank == 0).then(|| r.payloads.iter_mut().map(Option::take).collect());
                r.left += 1;
                if r.left == n {
                    st.rounds.remove(&(job, round));
                }
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..n).filter(|&i| !r.arrived[i]).collect();
                let message = format!("ranks {missing:?} did not answer within {:?}", self.timeout);
                st.abandoned.entry(job).or_insert((rank, Abandon::Failed(message)));
                self.changed.notify_all();
                return Err(CollectiveError::Timeout {
                    missing,
                    timeout: self.timeout,
                });
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A rank's place at the host meeting: which job it is in and how many
/// collective calls (rounds) of it it has made.
#[derive(Debug)]
pub struct Seat {
    sync: Arc<HostSync>,
    rank: usize,
    job: u64,
    round: u64,
}

impl Seat {
    pub fn new(sync: Arc<HostSync>, rank: usize) -> Self {
        Self {
            sync,
            rank,
            job: 0,
            round: 0,
        }
    }

    /// The next round of the current job: see [`HostSync::meet`].
    pub fn meet(&mut self, payload: Option<Tensor>) -> Result<Option<Vec<Option<Tensor>>>, CollectiveError> {
        self.round += 1;
        self.sync.meet(self.job, self.round, self.rank, payload)
    }
}

/// What each rank of a job calls, in the same order on every rank.
pub trait Collective {
    fn seat(&self) -> &Seat;
    fn seat_mut(&mut self) -> &mut Seat;

    /// Gathers `t` (the same shape on every rank) to rank 0, which gets every
    /// rank's tensor on the CPU in rank order; the others get `None`.
    fn gather(&mut self, t: &Tensor) -> Result<Option<Vec<Tensor>>, CollectiveError>;

    fn rank(&self) -> usize {
        self.seat().rank
    }

    fn world_size(&self) -> usize {
        self.seat().sync.world_size()
    }

    /// Starts job `job` (resets the round counter; rank 0 forgets older jobs).
    fn begin_job(&mut self, job: u64) {
        let seat = self.seat_mut();
        seat.job = job;
        seat.round = 0;
        if seat.rank == 0 {
            seat.sync.begin_job(job);
        }
    }

    /// This rank gives up the current job; the others' next call fails.
    fn abandon(&mut self, why: Abandon) {
        let seat = self.seat();
        seat.sync.abandon(seat.job, seat.rank, why);
    }
}

/// CPU ranks: data moves through host memory.
#[derive(Debug)]
pub struct InProcessCollective {
    seat: Seat,
}

impl InProcessCollective {
    pub fn new(sync: Arc<HostSync>, rank: usize) -> Self {
        Self {
            seat: Seat::new(sync, rank),
        }
    }
}

impl Collective for InProcessCollective {
    fn seat(&self) -> &Seat {
        &self.seat
    }

    fn seat_mut(&mut self) -> &mut Seat {
        &mut self.seat
    }

    fn gather(&mut self, t: &Tensor) -> Result<Option<Vec<Tensor>>, CollectiveError> {
        let payload = t
            .to_device(&Device::Cpu)
            .map_err(|e| CollectiveError::Transport(e.to_string()))?;
        let out = self.seat.meet(Some(payload))?;
        Ok(out.map(|all| all.into_iter().flatten().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn_ranks<F>(n: usize, timeout: Duration, f: F) -> Vec<Result<Option<Vec<Tensor>>, CollectiveError>>
    where
        F: Fn(&mut InProcessCollective) -> Result<Option<Vec<Tensor>>, CollectiveError> + Send + Sync + 'static,
    {
        let sync = HostSync::new(n, timeout);
        let f = Arc::new(f);
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let (sync, f) = (sync.clone(), f.clone());
                std::thread::spawn(move || {
                    let mut c = InProcessCollective::new(sync, rank);
                    c.begin_job(1);
                    f(&mut c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn gather_brings_every_rank_to_rank_zero_in_order() {
        let out = spawn_ranks(3, Duration::from_secs(5), |c| {
            let t = Tensor::new(&[c.rank() as f32], &Device::Cpu).unwrap();
            c.gather(&t)?;
            c.gather(&(t * 10.0).unwrap())
        });
        let root = out[0].clone().unwrap().unwrap();
        let values: Vec<f32> = root.iter().map(|t| t.to_vec1::<f32>().unwrap()[0]).collect();
        assert_eq!(values, vec![0.0, 10.0, 20.0]);
        assert!(out[1].as_ref().unwrap().is_none() && out[2].as_ref().unwrap().is_none());
    }

    #[test]
    fn a_failed_rank_fails_everyone_with_its_reason() {
        let out = spawn_ranks(3, Duration::from_secs(5), |c| {
            if c.rank() == 2 {
                c.abandon(Abandon::Failed("out of memory".into()));
                return Err(CollectiveError::Transport("left".into()));
            }
            c.gather(&Tensor::new(&[1f32], &Device::Cpu).unwrap())
        });
        for r in &out[..2] {
            assert_eq!(
                r.clone().unwrap_err(),
                CollectiveError::RankFailed {
                    rank: 2,
                    message: "out of memory".into()
                }
            );
        }
    }

    #[test]
    fn a_silent_rank_times_out_instead_of_hanging() {
        let start = Instant::now();
        let out = spawn_ranks(2, Duration::from_millis(200), |c| {
            if c.rank() == 1 {
                std::thread::sleep(Duration::from_millis(600));
            }
            c.gather(&Tensor::new(&[1f32], &Device::Cpu).unwrap())
        });
        assert!(matches!(out[0], Err(CollectiveError::Timeout { ref missing, .. }) if missing == &vec![1]));
        assert!(out[1].is_err(), "the late rank finds the job given up");
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
