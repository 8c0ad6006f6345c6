//! `worker run`'s service flags, each with its environment variable. The
//! model flags (`--model`, `--device`, ...) belong to the engine side.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use common::config::{parse_duration, ServiceArgs};

#[derive(Debug, Clone, Args)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// How long a transient failure (S3 or Redis unreachable) is retried, with
    /// backoff, before the job is handed back to the queue for redelivery.
    #[arg(long, env = "SDXL_RETRY_FOR", default_value = "2m", value_parser = parse_duration)]
    pub retry_for: Duration,
    /// How often the cancel flag of the running job is checked.
    #[arg(long, env = "SDXL_CANCEL_POLL", default_value = "200ms", value_parser = parse_duration)]
    pub cancel_poll: Duration,
    /// JPEG quality of stored results in `jpeg` format.
    #[arg(long, env = "SDXL_JPEG_QUALITY", default_value_t = 90)]
    pub jpeg_quality: u8,
    /// Denoising steps of the warm-up generation run before consuming (0: none).
    #[arg(long, env = "SDXL_WARMUP_STEPS", default_value_t = 1)]
    pub warmup_steps: usize,
    /// Width and height of the warm-up generation: by default the default
    /// job size, so that its first job pays no start-up of its own (cuDNN's
    /// algorithm search and first kernel loads are per shape); lower it on
    /// a CPU, where a 1024² step of the full model takes minutes.
    #[arg(long, env = "SDXL_WARMUP_SIZE", default_value_t = common::rules::DEFAULT_SIZE as usize)]
    pub warmup_size: usize,
    /// A job still generating after this long is stopped and marked failed
    /// (its message is dead-lettered), so that no job holds the GPUs for ever.
    #[arg(long, env = "SDXL_JOB_DEADLINE", default_value = "30m", value_parser = parse_duration)]
    pub job_deadline: Duration,
    /// How long the lease of a running job lasts without renewal (it is
    /// renewed every third of it): a duplicate delivery of the job waits
    /// for the lease, and a crashed worker's lease frees after this long.
    #[arg(long, env = "SDXL_LEASE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// This worker's name in status records (default: host name and process id).
    #[arg(long, env = "SDXL_WORKER_NAME")]
    pub worker_name: Option<String>,
    /// Where LoRAs from the registry are kept between jobs (default:
    /// `$XDG_CACHE_HOME/sdxl-queue/loras`, else `~/.cache/sdxl-queue/loras`).
    #[arg(long, env = "SDXL_LORA_CACHE")]
    pub lora_cache: Option<PathBuf>,
    /// Most bytes the LoRA cache holds; the least recently used files go first.
    #[arg(long, env = "SDXL_LORA_CACHE_BYTES", default_value_t = 10 << 30)]
    pub lora_cache_bytes: u64,
    /// Most jobs run as one batch (their images in one denoising loop per
    /// rank), and so how many deliveries the worker holds at a time (its
    /// prefetch). Jobs batch when they agree on size, steps, scheduler,
    /// guidance on or off, start (strength) and LoRAs. Default: 4 on CUDA,
    /// 1 on the CPU, where a batch makes images no faster. 1: one job at a
    /// time.
    #[arg(long, env = "SDXL_MAX_BATCH_JOBS", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_batch_jobs: Option<u16>,
    /// Most images one rank makes in one batch, every job's together (a
    /// job with more runs alone).
    #[arg(long, env = "SDXL_MAX_BATCH_IMAGES", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_batch_images: u16,
    /// Once a job arrives, how long the worker waits for more deliveries
    /// already on their way before it forms a batch (only with
    /// `--max-batch-jobs` above 1).
    #[arg(long, env = "SDXL_BATCH_WAIT", default_value = "20ms", value_parser = parse_duration)]
    pub batch_wait: Duration,
}

impl WorkerConfig {
    /// `--max-batch-jobs`, or its default for the device (`cuda`: a GPU).
    pub fn batch_jobs(&self, cuda: bool) -> usize {
        self.max_batch_jobs.map_or(if cuda { 4 } else { 1 }, usize::from)
    }

    pub fn lora_cache_dir(&self) -> PathBuf {
        self.lora_cache.clone().unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir);
            cache.join("sdxl-queue").join("loras")
        })
    }

    pub fn worker_name(&self) -> String {
        self.worker_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "worker".into());
            format!("{host}:{}", std::process::id())
        })
    }
}
