//! `worker run`: starts the rank group once (one thread per device, each with
//! its own pipeline) and serves jobs from the queue until SIGTERM or Ctrl-C
//! (see `worker::service`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use worker::ranks::{default_ranks, DeviceKind, RankGroup, RankGroupConfig};
use worker::service::{self, WorkerConfig};

use crate::args::{ModelArgs, UsageError};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Ranks (devices) to spread each job's images over; one image per rank
    /// by default. Default: every visible CUDA device, or 1 on CPU.
    #[arg(long, env = "SDXL_RANKS")]
    pub ranks: Option<usize>,
    /// How long a rank waits for the others in a collective before the job fails.
    #[arg(long, env = "SDXL_COLLECTIVE_TIMEOUT", default_value = "5m", value_parser = common::config::parse_duration)]
    pub collective_timeout: Duration,
    #[command(flatten)]
    pub service: WorkerConfig,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let device = args.model.device.kind();
    let ranks = args.ranks.unwrap_or_else(|| default_ranks(device));
    if ranks == 0 {
        return Err(UsageError("--ranks 0 must be at least 1".into()).into());
    }
    tracing::info!(model = %args.model.model, ranks, "loading the pipeline");
    let engine = RankGroup::start(RankGroupConfig {
        memory_budget: args.model.memory.memory_budget,
        load: args.model.load_options_on(Device::Cpu),
        device,
        ranks,
        collective_timeout: args.collective_timeout,
        // The service warms up through the engine, once every rank is loaded.
        warm_up: false,
    })
    .context("loading the model")?;
    // Batches pay on GPUs (the UNet does more images per second in one
    // call); on the CPU an image costs the same batched or not.
    let mut config = args.service;
    config.max_batch_jobs = Some(config.batch_jobs(device == DeviceKind::Cuda) as u16);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(service::run(config, Arc::new(engine), service::shutdown::signal()))?;
    Ok(())
}
