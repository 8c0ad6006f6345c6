//! `worker run`: loads the pipeline once and serves jobs from the queue until
//! SIGTERM or Ctrl-C (see `worker::service`).

use std::sync::Arc;

use anyhow::Context;
use worker::pipeline_engine::PipelineEngine;
use worker::sdxl::pipeline::SdxlPipeline;
use worker::service::{self, WorkerConfig};

use crate::cli::{ModelArgs, UsageError};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Ranks (devices) the pipeline runs on; one image per rank by default.
    #[arg(long, env = "SDXL_RANKS", default_value_t = 1)]
    pub ranks: usize,
    #[command(flatten)]
    pub service: WorkerConfig,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.ranks != 1 {
        return Err(UsageError(format!("--ranks {}: this worker runs one rank", args.ranks)).into());
    }
    tracing::info!(model = %args.model.model, "loading the pipeline");
    let pipeline = SdxlPipeline::load(&args.model.load_options(0)?).context("loading the model")?;
    let engine = Arc::new(PipelineEngine::new(pipeline));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(service::run(args.service, engine, service::shutdown::signal()))?;
    Ok(())
}
