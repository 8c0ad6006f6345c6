//! Data-parallel generation over every device of the node: one rank per GPU
//! (or one CPU rank), each an OS thread that owns its device and its copy of
//! the pipeline, driven by messages. Each rank makes its own images of the same
//! prompt with its own seeds; rank 0 gathers them (and the previews) and alone
//! answers the service. [`RankGroup`] is the [`Engine`] the job service drives.

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
use self::rank::{Rank, RankJob, RankReply};
use crate::engine::{Engine, EngineError, EngineEvent, EngineJob, EngineOutput};
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
    /// Ranks that have not yet reported the end of the last job.
    busy: Vec<bool>,
    /// Replies of the last job that arrived after it returned.
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

    fn generate(
        &self,
        job: &EngineJob,
        events: &mut dyn FnMut(EngineEvent),
        cancel: &Arc<AtomicBool>,
    ) -> Result<EngineOutput, EngineError> {
        let mut d = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.ranks.len();
        // A rank still busy with an earlier (abandoned) job gets until the
        // collective timeout to finish it; one that does not has stopped answering.
        if let Some(late) = d.late.take() {
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
        }
        let images = job.num_images.unwrap_or(n);
        if images == 0 {
            return Err(EngineError::Invalid("num_images must be at least 1".into()));
        }
        d.seq += 1;
        let (reply_tx, reply_rx) = channel();
        let rank_job = RankJob {
            seq: d.seq,
            job: Arc::new(job.clone()),
            counts: Arc::new(share_images(images, n)),
            cancel: cancel.clone(),
            #[cfg(any(test, feature = "fault-injection"))]
            fault: d.fault.take(),
            reply: reply_tx,
        };
        for (rank, handle) in self.ranks.iter().enumerate() {
            handle
                .jobs
                .send(rank_job.clone())
                .map_err(|_| EngineError::Failed(format!("rank {rank} has exited")))?;
            d.busy[rank] = true;
        }
        drop(rank_job);
        let mut outcome: Option<Result<EngineOutput, EngineError>> = None;
        // Rank 0 reports every step, and gives up within the collective timeout
        // when another rank fails or stalls; silence for twice that long means
        // rank 0 itself is stuck.
        let watchdog = self.timeout * 2;
        let mut quiet_since = Instant::now();
        while d.busy.iter().any(|&b| b) {
            let wait = if outcome.is_some() {
                // the job is decided: wait only briefly for the stragglers
                Duration::from_millis(200)
            } else {
                self.timeout
            };
            match reply_rx.recv_timeout(wait) {
                Ok(RankReply::Event(e)) => {
                    quiet_since = Instant::now();
                    events(e);
                }
                Ok(RankReply::PreviewTiles {
                    step,
                    total_steps,
                    timestep,
                    tiles,
                }) => {
                    quiet_since = Instant::now();
                    match crate::imaging::preview_jpeg(&tiles, timestep) {
                        Ok(jpeg) => events(EngineEvent::Preview {
                            step,
                            total_steps,
                            jpeg,
                        }),
                        Err(e) => tracing::warn!(step, error = %e, "preview not encoded"),
                    }
                }
                Ok(RankReply::Done { rank, result }) => {
                    d.busy[rank] = false;
                    if rank == 0 {
                        outcome = Some(match result {
                            Ok(Some(out)) => Ok(out),
                            Ok(None) => Err(EngineError::Failed("rank 0 returned no images".into())),
                            Err(e) => Err(e),
                        });
                    } else if let Err(e) = result {
                        tracing::warn!(rank, error = %e, "rank abandoned the job");
                    }
                }
                Err(RecvTimeoutError::Timeout) if outcome.is_some() => break,
                Err(RecvTimeoutError::Timeout) => {
                    if quiet_since.elapsed() >= watchdog {
                        outcome = Some(Err(EngineError::Failed(format!(
                            "rank 0 stopped answering for {watchdog:?}"
                        ))));
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if d.busy.iter().any(|&b| b) {
            d.late = Some(reply_rx);
        }
        outcome.unwrap_or_else(|| Err(EngineError::Failed("every rank exited".into())))
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
