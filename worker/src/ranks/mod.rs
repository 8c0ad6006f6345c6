//! Data-parallel generation over every device of the node: one rank per GPU
//! (or one CPU rank), each an OS thread that owns its device and its copy of
//! the pipeline, driven by messages. Each rank makes its share of each job's
//! images with their own seeds, the images of every job of a batch in one
//! denoising loop; rank 0 gathers them (and the previews) and alone answers
//! the service. [`RankGroup`] is the [`Engine`] the job service drives.

mod batch;
pub mod collective;
#[cfg(any(test, feature = "fault-injection"))]
pub mod fault;
pub mod memory;
#[cfg(feature = "cuda")]
pub mod nccl;
mod rank;

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;

use self::collective::{HostSync, InProcessCollective};
#[cfg(any(test, feature = "fault-injection"))]
pub use self::fault::{Fault, FaultKind};
pub use self::rank::{share_images, unet_images};
use self::rank::{Rank, RankJob, RankPart, RankReply};
use crate::engine::{compatible_groups, BatchJob, Engine, EngineError, EngineEvent, EngineJob, JobOutcome};
use sdxl::pipeline::{LoadOptions, SdxlPipeline};

/// Which devices the ranks run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    /// Rank r on CUDA device r; collectives over NCCL.
    Cuda,
}

/// How to start a [`RankGroup`].
#[derive(Debug, Clone)]
pub struct RankGroupConfig {
    /// The most device memory one job may plan for on each rank (`None`:
    /// what the device reports free); on the CPU, a budget is what makes
    /// jobs checked at all (`memory.rs`).
    pub memory_budget: Option<u64>,
    /// The pipeline every rank loads (its `device` is replaced per rank).
    pub load: LoadOptions,
    pub device: DeviceKind,
    pub ranks: usize,
    /// How long a collective call waits for the other ranks.
    pub collective_timeout: Duration,
    /// Run one short generation through every rank before taking jobs.
    pub warm_up: bool,
}

/// Every visible CUDA device, or 1 for CPU.
pub fn default_ranks(device: DeviceKind) -> usize {
    match device {
        DeviceKind::Cpu => 1,
        DeviceKind::Cuda => cuda_device_count().max(1),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device_count() -> usize {
    cudarc::driver::CudaContext::device_count().map_or(0, |n| n as usize)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device_count() -> usize {
    0
}

struct RankHandle {
    jobs: Sender<RankJob>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Dispatch {
    seq: u64,
    /// Ranks that have not yet reported the end of the last batch.
    busy: Vec<bool>,
    /// Replies of the last batch that arrived after it returned.
    late: Option<Receiver<RankReply>>,
    #[cfg(any(test, feature = "fault-injection"))]
    fault: Option<Fault>,
}

/// The ranks of one worker.
pub struct RankGroup {
    ranks: Vec<RankHandle>,
    dispatch: Mutex<Dispatch>,
    timeout: Duration,
}

impl std::fmt::Debug for RankGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankGroup")
            .field("world_size", &self.ranks.len())
            .finish()
    }
}

impl RankGroup {
    /// Starts one thread per rank; each loads its pipeline (in parallel with the
    /// others) and, when asked, warms up. Returns once every rank is ready.
    pub fn start(config: RankGroupConfig) -> Result<Self, EngineError> {
        let n = config.ranks.max(1);
        let sync = HostSync::new(n, config.collective_timeout);
        #[cfg(feature = "cuda")]
        let nccl_id = match config.device {
            DeviceKind::Cuda => Some(nccl::new_id()?),
            DeviceKind::Cpu => None,
        };
        let (ready_tx, ready_rx) = channel::<(usize, Result<(), String>)>();
        let mut ranks = Vec::with_capacity(n);
        for rank in 0..n {
            let (jobs_tx, jobs_rx) = channel::<RankJob>();
            let ready = ready_tx.clone();
            let config = config.clone();
            let sync = sync.clone();
            let thread = std::thread::Builder::new()
                .name(format!("rank-{rank}"))
                .spawn(move || {
                    let span = tracing::info_span!("rank", rank);
                    let _enter = span.enter();
                    let mut load = config.load.clone();
                    let device = match config.device {
                        DeviceKind::Cpu => Ok(Device::Cpu),
                        DeviceKind::Cuda => {
                            Device::new_cuda(rank).map_err(|e| format!("opening CUDA device {rank}: {e}"))
                        }
                    };
                    let pipeline = device.and_then(|d| {
                        load.device = d;
                        SdxlPipeline::load(&load).map_err(|e| e.to_string())
                    });
                    let pipeline = match pipeline {
                        Ok(p) => p,
                        Err(e) => {
                            // ranks waiting to meet this one give up rather than wait
                            sync.abandon(0, rank, collective::Abandon::Failed(e.clone()));
                            let _ = ready.send((rank, Err(e)));
                            return;
                        }
                    };
                    match config.device {
                        DeviceKind::Cpu => {
                            let collective = InProcessCollective::new(sync, rank);
                            let _ = ready.send((rank, Ok(())));
                            serve(
                                Rank {
                                    pipeline,
                                    collective,
                                    loras: Default::default(),
                                    memory_budget: config.memory_budget,
                                },
                                jobs_rx,
                            );
                        }
                        #[cfg(feature = "cuda")]
                        DeviceKind::Cuda => {
                            let id = nccl_id.expect("an NCCL id for CUDA ranks");
                            match nccl::NcclCollective::new(sync, rank, n, id, pipeline.device()) {
                                Ok(collective) => {
                                    let _ = ready.send((rank, Ok(())));
                                    serve(
                                        Rank {
                                            pipeline,
                                            collective,
                                            loras: Default::default(),
                                            memory_budget: config.memory_budget,
                                        },
                                        jobs_rx,
                                    );
                                }
                                Err(e) => {
                                    let _ = ready.send((rank, Err(e.to_string())));
                                }
                            }
                        }
                        #[cfg(not(feature = "cuda"))]
                        DeviceKind::Cuda => {
                            let _ = ready.send((rank, Err("this worker was built without the cuda feature".into())));
                        }
                    }
                })
                .map_err(|e| EngineError::Failed(format!("spawning rank {rank}: {e}")))?;
            ranks.push(RankHandle {
                jobs: jobs_tx,
                thread: Some(thread),
            });
        }
        drop(ready_tx);
        for _ in 0..n {
            match ready_rx.recv() {
                Ok((_, Ok(()))) => {}
                Ok((rank, Err(e))) => return Err(EngineError::Failed(format!("rank {rank}: {e}"))),
                Err(_) => return Err(EngineError::Failed("a rank thread ended while loading".into())),
            }
        }
        let group = Self {
            ranks,
            dispatch: Mutex::new(Dispatch {
                seq: 0,
                busy: vec![false; n],
                late: None,
                #[cfg(any(test, feature = "fault-injection"))]
                fault: None,
            }),
            timeout: config.collective_timeout,
        };
        if config.warm_up {
            group.warm_up(&config)?;
        }
        Ok(group)
    }

    /// One short generation through every rank, previews included, so the
    /// first job does not pay for kernel compilation and allocator growth.
    fn warm_up(&self, config: &RankGroupConfig) -> Result<(), EngineError> {
        let _ = config;
        let job = EngineJob {
            negative_prompt: Some("warm-up".into()),
            preview_every: 1,
            ..EngineJob::text("warm-up", 128, 128, 2, 0)
        };
        self.generate(&job, &mut |_| {}, &Arc::new(AtomicBool::new(false)))
            .map(|_| ())
            .map_err(|e| EngineError::Failed(format!("warm-up: {e}")))
    }

    /// Makes one rank of the next job fail or stall (tests of failure handling).
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn inject_fault(&self, fault: Fault) {
        self.dispatch.lock().unwrap_or_else(|e| e.into_inner()).fault = Some(fault);
    }
}

/// A rank thread's loop: one job at a time until the group is dropped.
fn serve<C: collective::Collective>(mut rank: Rank<C>, jobs: Receiver<RankJob>) {
    while let Ok(job) = jobs.recv() {
        rank.run(&job);
    }
}

impl Engine for RankGroup {
    fn world_size(&self) -> usize {
        self.ranks.len()
    }

    fn generate_batch(&self, batch: Vec<BatchJob<'_>>) {
        // The service sends compatible jobs only; any other group runs after.
        for group in compatible_groups(batch, |j| j.job.batch_key()) {
            self.run_batch(group);
        }
    }
}

/// A job of the running batch, on the service's side: its callbacks until
/// its outcome is handed over.
struct Pending<'a> {
    events: Option<Box<dyn FnMut(EngineEvent) + 'a>>,
    done: Option<Box<dyn FnOnce(JobOutcome) + 'a>>,
}

impl Pending<'_> {
    fn event(&mut self, event: EngineEvent) {
        if let Some(events) = &mut self.events {
            events(event);
        }
    }

    /// Hands over the outcome (the first one only) and drops the event callback.
    fn finish(&mut self, result: JobOutcome) {
        self.events = None;
        if let Some(done) = self.done.take() {
            done(result);
        }
    }

    fn is_finished(&self) -> bool {
        self.done.is_none()
    }
}

/// Ends every job without an outcome yet with `e`.
fn finish_all(jobs: &mut [Pending<'_>], e: &EngineError) {
    for job in jobs.iter_mut() {
        job.finish(Err(e.clone()));
    }
}

impl RankGroup {
    /// Runs jobs with one batch key as one batch on every rank.
    fn run_batch(&self, batch: Vec<BatchJob<'_>>) {
        let mut d = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.ranks.len();
        let mut jobs = Vec::with_capacity(batch.len());
        let mut parts = Vec::with_capacity(batch.len());
        // Which job each part is (a job refused here has no part).
        let mut of_part = Vec::with_capacity(batch.len());
        for job in batch {
            let mut pending = Pending {
                events: Some(job.events),
                done: Some(job.done),
            };
            match job.job.num_images.unwrap_or(n) {
                0 => pending.finish(Err(EngineError::Invalid("num_images must be at least 1".into()))),
                images => {
                    of_part.push(jobs.len());
                    parts.push(RankPart {
                        job: job.job.clone(),
                        counts: share_images(images, n),
                        cancel: job.cancel.clone(),
                    });
                }
            }
            jobs.push(pending);
        }
        if let Err(e) = self.wait_for_stragglers(&mut d) {
            return finish_all(&mut jobs, &e);
        }
        if parts.is_empty() {
            return;
        }
        d.seq += 1;
        let (reply_tx, reply_rx) = channel();
        let rank_job = RankJob {
            seq: d.seq,
            parts: parts.into(),
            #[cfg(any(test, feature = "fault-injection"))]
            fault: d.fault.take(),
            reply: reply_tx,
        };
        for (rank, handle) in self.ranks.iter().enumerate() {
            if handle.jobs.send(rank_job.clone()).is_err() {
                return finish_all(&mut jobs, &EngineError::Failed(format!("rank {rank} has exited")));
            }
            d.busy[rank] = true;
        }
        drop(rank_job);
        // Rank 0 reports every step, and gives up within the collective timeout
        // when another rank fails or stalls; silence for twice that long means
        // rank 0 itself is stuck.
        let watchdog = self.timeout * 2;
        let mut quiet_since = Instant::now();
        let mut decided = false;
        while d.busy.iter().any(|&b| b) {
            let wait = if decided {
                // the batch is over: wait only briefly for the stragglers
                Duration::from_millis(200)
            } else {
                self.timeout
            };
            match reply_rx.recv_timeout(wait) {
                Ok(RankReply::Event { job, event }) => {
                    quiet_since = Instant::now();
                    jobs[of_part[job]].event(event);
                }
                Ok(RankReply::PreviewTiles {
                    job,
                    step,
                    total_steps,
                    timestep,
                    tiles,
                }) => {
                    quiet_since = Instant::now();
                    match crate::imaging::preview_jpeg(&tiles, timestep) {
                        Ok(jpeg) => jobs[of_part[job]].event(EngineEvent::Preview {
                            step,
                            total_steps,
                            jpeg,
                        }),
                        Err(e) => tracing::warn!(step, error = %e, "preview not encoded"),
                    }
                }
                Ok(RankReply::Finished { job, result }) => {
                    quiet_since = Instant::now();
                    jobs[of_part[job]].finish(result);
                }
                Ok(RankReply::Done { rank, result }) => {
                    d.busy[rank] = false;
                    if rank == 0 {
                        decided = true;
                        let e = result
                            .err()
                            .unwrap_or_else(|| EngineError::Failed("rank 0 returned no images".into()));
                        finish_all(&mut jobs, &e);
                    } else if let Err(e) = result {
                        tracing::warn!(rank, error = %e, "rank abandoned the batch");
                    }
                }
                Err(RecvTimeoutError::Timeout) if decided => break,
                Err(RecvTimeoutError::Timeout) => {
                    if quiet_since.elapsed() >= watchdog {
                        let e = EngineError::Failed(format!("rank 0 stopped answering for {watchdog:?}"));
                        finish_all(&mut jobs, &e);
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if d.busy.iter().any(|&b| b) {
            d.late = Some(reply_rx);
        }
        if jobs.iter().any(|j| !j.is_finished()) {
            finish_all(&mut jobs, &EngineError::Failed("every rank exited".into()));
        }
    }

    /// A rank still busy with an earlier (abandoned) batch gets until the
    /// collective timeout to finish it; one that does not has stopped answering.
    fn wait_for_stragglers(&self, d: &mut Dispatch) -> Result<(), EngineError> {
        let Some(late) = d.late.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + self.timeout;
        while d.busy.iter().any(|&b| b) {
            match late.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(RankReply::Done { rank, .. }) => d.busy[rank] = false,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if let Some(rank) = d.busy.iter().position(|&b| b) {
            d.late = Some(late);
            return Err(EngineError::Failed(format!(
                "rank {rank} stopped answering: still busy with an earlier job after {:?}",
                self.timeout
            )));
        }
        Ok(())
    }
}

impl Drop for RankGroup {
    fn drop(&mut self) {
        // Closing the job channels ends each rank's loop, which frees its
        // communicator and device before the process exits (NCCL aborts fail
        // when the process tears down under them). A rank stuck in a device
        // call is given a few seconds, not waited for forever.
        let threads: Vec<_> = self.ranks.iter_mut().filter_map(|h| h.thread.take()).collect();
        self.ranks.clear();
        let deadline = Instant::now() + Duration::from_secs(10);
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
