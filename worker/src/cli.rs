//! The worker's command line: the subcommands and where each one goes. Each
//! command's flags and work live in its own file; the flags they share are
//! in `args.rs`.

use clap::{Parser, Subcommand};

use crate::{bench, check_kernels, generate, init_random, run};

#[derive(Debug, Parser)]
#[command(name = "worker", version, about = "SDXL worker: generate images with candle")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make images from a prompt, with no services, and write them as PNG.
    Generate(Box<generate::GenerateArgs>),
    /// Write a diffusers folder with random weights from a folder of configs.
    InitRandom(init_random::InitRandomArgs),
    /// Time each stage of the pipeline on one device (table and JSON).
    Bench(Box<bench::BenchArgs>),
    /// Check each CUDA kernel against candle in f32, and time both.
    CheckKernels(check_kernels::CheckKernelsArgs),
    /// Serve jobs from the queue (RabbitMQ → S3 + Redis) until SIGTERM.
    Run(Box<run::RunArgs>),
}

impl Cli {
    /// `worker run`: a long-running service (logs at `info` by default).
    pub fn is_service(&self) -> bool {
        matches!(self.command, Command::Run(_))
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::InitRandom(args) => init_random::run(args),
        Command::Bench(args) => bench::run(*args),
        Command::CheckKernels(args) => check_kernels::run(args),
        Command::Run(args) => run::run(*args),
    }
}
