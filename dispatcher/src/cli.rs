//! The command line: `serve` and the client commands `submit`, `status`,
//! `watch` and `cancel`. Every flag also reads an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use common::config::{parse_duration, ServiceArgs};
use common::rules::JobRequest;
use common::rules::{Caps, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_LORAS};
use uuid::Uuid;

use crate::loras::DEFAULT_MAX_LORA_BYTES;

#[derive(Debug, Parser)]
#[command(
    name = "dispatcher",
    version,
    about = "Submit SDXL generation jobs and follow them: HTTP API and CLI"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API.
    Serve(ServeArgs),
    /// Validate a request and queue it; prints the job id.
    Submit(Box<SubmitArgs>),
    /// Print the status record of a job as JSON.
    Status(JobArgs),
    /// Print one JSON line per event of a job until its terminal event.
    Watch(WatchArgs),
    /// Cancel a queued or running job; prints the status record as JSON.
    Cancel(JobArgs),
    /// The LoRA registry: upload, list, remove.
    #[command(subcommand)]
    Loras(LorasCommand),
    /// Print `sha256:<hex>` of the API key read from stdin, for an
    /// `SDXL_API_KEYS_FILE` that holds no key in clear.
    HashKey,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SDXL_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Submits handled at once; more are answered 429.
    #[arg(long, env = "SDXL_MAX_PENDING_SUBMITS", default_value_t = 256)]
    pub max_pending_submits: usize,
    /// API keys, `name:key[:admin]` (or `name:sha256:<hex>[:admin]`), comma-separated.
    /// With no key at all (here or in the file) the API is open to anyone.
    #[arg(long, env = "SDXL_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// A file of API keys, one `name:key[:admin]` per line (`#` comments).
    #[arg(long, env = "SDXL_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Serve `/metrics` on this address only (and not on `--listen`).
    #[arg(long, env = "SDXL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Submits per minute per API key, shared by every dispatcher on the same
    /// Redis prefix (GCRA in Redis); 0: no limit.
    #[arg(long, env = "SDXL_RATE_LIMIT", default_value_t = 120)]
    pub rate_limit: u32,
    /// Submits a key may make at once before the rate applies.
    #[arg(long, env = "SDXL_RATE_BURST", default_value_t = 20)]
    pub rate_burst: u32,
    /// Submits are refused (503) while this many jobs wait in the queue; 0: no cap.
    #[arg(long, env = "SDXL_MAX_QUEUE_DEPTH", default_value_t = 10_000)]
    pub max_queue_depth: u64,
    /// Most bytes of an uploaded LoRA file.
    #[arg(long, env = "SDXL_MAX_LORA_BYTES", default_value_t = DEFAULT_MAX_LORA_BYTES)]
    pub max_lora_bytes: usize,
    /// How long a submit waits for RabbitMQ to confirm its job; past it the
    /// job is marked failed and the client gets a 503 (a frozen or blocked
    /// broker must not hold requests forever).
    #[arg(long, env = "SDXL_PUBLISH_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub publish_timeout: Duration,
    #[command(flatten)]
    pub caps: CapsArgs,
    #[command(flatten)]
    pub webhooks: WebhookArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
}

/// How webhooks are checked and delivered.
#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// Let webhooks point at loopback, private and link-local addresses, and
    /// use plain http (for tests and closed networks; never on a server that
    /// takes requests from outside).
    /// `SDXL_WEBHOOK_ALLOW_PRIVATE` takes 1/0, true/false, yes/no, on/off.
    #[arg(long, env = "SDXL_WEBHOOK_ALLOW_PRIVATE", value_parser = clap::builder::BoolishValueParser::new())]
    pub webhook_allow_private: bool,
    /// The wait before each retry of a refused or failed delivery,
    /// comma-separated (about 1 h in all); after the last, the event is
    /// parked in `{queue}.webhooks.dead`.
    #[arg(long, env = "SDXL_WEBHOOK_RETRY_DELAYS", default_value = "5s,30s,2m,5m,10m,20m,30m",
          value_delimiter = ',', value_parser = parse_duration)]
    pub webhook_retry_delays: Vec<Duration>,
    /// One delivery attempt's limit.
    #[arg(long, env = "SDXL_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,
    /// Deliveries in flight at once.
    #[arg(long, env = "SDXL_WEBHOOK_CONCURRENCY", default_value_t = 16)]
    pub webhook_concurrency: u16,
}

impl WebhookArgs {
    pub fn delivery(&self) -> crate::webhooks::DeliveryConfig {
        crate::webhooks::DeliveryConfig {
            allow_private: self.webhook_allow_private,
            retry_delays: self.webhook_retry_delays.clone(),
            timeout: self.webhook_timeout,
            concurrency: self.webhook_concurrency,
        }
    }
}

/// The caps on what one job may ask (at most the ranges of the request's
/// fields, which are their defaults).
#[derive(Debug, Clone, Args)]
pub struct CapsArgs {
    /// Most denoising steps a job may ask for (1–100).
    #[arg(long, env = "SDXL_MAX_STEPS", default_value_t = Caps::default().max_steps)]
    pub max_steps: u32,
    /// Most pixels (width × height) of one image (65536–4194304).
    #[arg(long, env = "SDXL_MAX_PIXELS", default_value_t = Caps::default().max_pixels)]
    pub max_pixels: u64,
    /// Most images a job may ask for (1–16).
    #[arg(long, env = "SDXL_MAX_IMAGES", default_value_t = Caps::default().max_images)]
    pub max_images: u32,
    /// Most LoRAs a job may name (0–16).
    #[arg(long, env = "SDXL_MAX_LORAS", default_value_t = DEFAULT_MAX_LORAS)]
    pub max_loras: u32,
    /// Most bytes of one input image (`image`, `mask`), once decoded from base64.
    #[arg(long, env = "SDXL_MAX_IMAGE_BYTES", default_value_t = DEFAULT_MAX_IMAGE_BYTES)]
    pub max_image_bytes: usize,
}

impl CapsArgs {
    pub fn caps(&self) -> anyhow::Result<Caps> {
        Caps {
            max_steps: self.max_steps,
            max_pixels: self.max_pixels,
            max_images: self.max_images,
            max_loras: self.max_loras,
            max_image_bytes: self.max_image_bytes,
        }
        .checked()
        .map_err(anyhow::Error::msg)
    }
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Every request field, as a flag of the same name (`common::rules::JobRequest`).
    #[command(flatten)]
    pub request: JobRequest,
    /// Follow the job with a progress bar and print its final status as JSON.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: save the grid to this file.
    #[arg(long, requires = "wait")]
    pub output: Option<PathBuf>,
    /// Makes a retried submit return the same job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    #[command(flatten)]
    pub caps: CapsArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
}

#[derive(Debug, Subcommand)]
pub enum LorasCommand {
    /// Check a LoRA file and register it under NAME (replacing one of that name).
    Put {
        name: String,
        file: PathBuf,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Print every registered LoRA's record as JSON.
    List {
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Remove a LoRA.
    Delete {
        name: String,
        #[command(flatten)]
        service: ServiceArgs,
    },
}

#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job id.
    pub id: Uuid,
    #[command(flatten)]
    pub service: ServiceArgs,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The job id.
    pub id: Uuid,
    /// Save each preview as `DIR/{id}-{step}.jpg`.
    #[arg(long)]
    pub save_previews: Option<PathBuf>,
    #[command(flatten)]
    pub service: ServiceArgs,
}
