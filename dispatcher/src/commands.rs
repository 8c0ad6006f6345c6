//! What the client commands do and print. Results go to stdout (JSON), the
//! progress bar and messages to stderr.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use base64::Engine as _;
use common::config::ServiceArgs;
use common::event::{EventKind, JobEvent, PREVIEW_DATA_URI_PREFIX};
use common::result_store::ResultStore;
use common::status::{JobState, JobStatus};
use common::status_store::StatusStore;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::admission::{QueueCap, RateLimit};
use crate::auth::{ApiKeys, Caller};
use crate::cli::{JobArgs, LorasCommand, ServeArgs, SubmitArgs, WatchArgs};
use crate::http::server::{self, AppState, BodyLimits};
use crate::jobs::{Followed, Jobs, Storage};
use crate::loras::{LoraRegistry, DEFAULT_MAX_LORA_BYTES};
use crate::metrics::Metrics;

async fn store(service: &ServiceArgs) -> anyhow::Result<StatusStore> {
    StatusStore::connect(&service.redis_url.0, service.names(), service.status_ttl)
        .await
        .context("connecting to Redis")
}

/// The object store for input images, and the LoRA registry on it.
fn storage(service: &ServiceArgs) -> anyhow::Result<Storage> {
    let results = Arc::new(ResultStore::new(&service.s3)?);
    Ok(Storage {
        loras: LoraRegistry::new(results.clone(), DEFAULT_MAX_LORA_BYTES),
        results,
    })
}

/// `loras put|list|delete`.
pub async fn loras(command: LorasCommand) -> anyhow::Result<()> {
    match command {
        LorasCommand::Put { name, file, service } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let storage = storage(&service)?;
            storage.results.ensure_bucket().await?;
            print_json(&storage.loras.put(&name, bytes, None).await?)
        }
        LorasCommand::List { service } => print_json(&storage(&service)?.loras.list().await?),
        LorasCommand::Delete { name, service } => {
            if !storage(&service)?.loras.delete(&name).await? {
                bail!("no LoRA `{name}` in the registry");
            }
            Ok(())
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

pub async fn serve(
    args: ServeArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let keys = ApiKeys::load(args.api_keys.as_deref(), args.api_keys_file.as_deref())?;
    if keys.is_open() {
        tracing::warn!(
            "no API keys configured (SDXL_API_KEYS, SDXL_API_KEYS_FILE): the API is open to anyone who can reach it"
        );
    } else {
        tracing::info!(keys = keys.len(), "API keys loaded");
    }
    let caps = args.caps.caps()?;
    let status = store(&args.service).await?;
    let limiter_store = status.clone();
    let results = Arc::new(ResultStore::new(&args.service.s3)?);
    // Best effort: the worker creates the bucket too.
    if let Err(e) = results.ensure_bucket().await {
        tracing::warn!(error = %e, "could not check the bucket");
    }
    let storage = Storage {
        results: results.clone(),
        loras: LoraRegistry::new(results.clone(), args.max_lora_bytes),
    };
    let jobs = Jobs::with_publisher(status.clone(), &args.service.amqp_url.0, caps, args.publish_timeout)
        .await
        .context("connecting to RabbitMQ")?
        .with_storage(storage)
        .allowing_private_webhooks(args.webhooks.webhook_allow_private);
    jobs.spawn_order_sweep(std::time::Duration::from_secs(10));
    if args.webhooks.webhook_allow_private {
        tracing::warn!("SDXL_WEBHOOK_ALLOW_PRIVATE: webhooks may point at private addresses, over plain http");
    }
    let queue_cap = QueueCap::new(args.max_queue_depth);
    queue_cap.spawn_poller(args.service.amqp_url.0.clone(), args.service.names());
    let (stop, stopping) = tokio::sync::watch::channel(false);
    crate::webhooks::deliver::spawn(
        args.service.amqp_url.0.clone(),
        status,
        results.clone(),
        args.webhooks.delivery(),
        stopping.clone(),
    )?;
    let rate_limit = Arc::new(RateLimit::new(limiter_store, args.rate_limit, args.rate_burst));
    let state = AppState {
        jobs: Arc::new(jobs),
        results,
        metrics: Metrics::new()?,
        submit_permits: Arc::new(Semaphore::new(args.max_pending_submits.max(1))),
        stopping,
        keys: Arc::new(keys),
        rate_limit,
        queue_cap,
        metrics_here: args.metrics_listen.is_none(),
        body_limits: BodyLimits::new(caps.max_image_bytes, args.max_lora_bytes),
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, queue = %args.service.queue, "serving");
    if let Some(addr) = args.metrics_listen {
        let metrics_listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr} (metrics)"))?;
        tracing::info!(addr = %metrics_listener.local_addr()?, "serving /metrics");
        let (metrics_state, mut metrics_stop) = (state.clone(), stop.subscribe());
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = metrics_stop.wait_for(|s| *s).await;
            };
            if let Err(e) = server::serve_metrics(metrics_listener, metrics_state, shutdown).await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        });
    }
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    server::serve(listener, state, shutdown).await?;
    Ok(())
}

/// `submit`: returns the final state with `--wait`.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<Option<JobState>> {
    let status = store(&args.service).await?;
    let jobs = Jobs::with_publisher(
        status,
        &args.service.amqp_url.0,
        args.caps.caps()?,
        common::queue::DEFAULT_CONFIRM_TIMEOUT,
    )
    .await
    .context("connecting to RabbitMQ")?
    .with_storage(storage(&args.service)?);
    // The CLI talks to RabbitMQ and Redis with the service's own credentials:
    // an operator's tool, whose jobs belong to no API key.
    let submitted = jobs
        .submit(&args.request, args.idempotency_key.as_deref(), None)
        .await?;
    let id = submitted.status.id;
    if !args.wait {
        println!("{id}");
        return Ok(None);
    }
    eprintln!("job {id} queued (seed {})", submitted.status.request.seed);
    let final_status = follow_with_bar(&jobs, id).await?;
    print_json(&final_status)?;
    if let (Some(path), Some(result)) = (&args.output, &final_status.result) {
        download(&result.grid.url, path).await?;
        eprintln!("grid saved to {}", path.display());
    }
    Ok(Some(final_status.state))
}

async fn follow_with_bar(jobs: &Jobs, id: Uuid) -> anyhow::Result<JobStatus> {
    let mut stream = jobs.follow(id, &Caller::anonymous()).await?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} steps {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("queued");
    while let Some(followed) = stream.next().await {
        match followed {
            Followed::Status(s) => {
                bar.set_length(s.progress.total_steps.into());
                bar.set_position(s.progress.step.into());
                bar.set_message(s.state.to_string());
            }
            Followed::Position(p) => bar.set_message(format!("queued, {p} ahead")),
            Followed::Event(e) => {
                bar.set_length(e.total_steps.into());
                bar.set_position(e.step.into());
                bar.set_message(match e.kind {
                    EventKind::Preview => format!("preview at step {}", e.step),
                    other => other.as_str().to_string(),
                });
                if e.kind.is_terminal() {
                    break;
                }
            }
        }
    }
    bar.finish();
    Ok(jobs.status(id).await?)
}

async fn download(url: &str, path: &Path) -> anyhow::Result<()> {
    let response = reqwest::get(url).await.context("downloading the grid")?;
    if !response.status().is_success() {
        bail!("downloading the grid: HTTP {}", response.status());
    }
    let bytes = response.bytes().await?;
    tokio::fs::write(path, &bytes)
        .await
        .with_context(|| format!("writing {}", path.display()))
}

pub async fn status(args: JobArgs) -> anyhow::Result<()> {
    let jobs = Jobs::new(store(&args.service).await?);
    print_json(&jobs.status(args.id).await?)
}

pub async fn cancel(args: JobArgs) -> anyhow::Result<()> {
    let jobs = Jobs::new(store(&args.service).await?);
    print_json(&jobs.cancel(args.id, &Caller::anonymous()).await?)
}

/// `watch`: returns the terminal event's kind.
pub async fn watch(args: WatchArgs) -> anyhow::Result<EventKind> {
    let jobs = Jobs::new(store(&args.service).await?);
    if let Some(dir) = &args.save_previews {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut stream = jobs.follow(args.id, &Caller::anonymous()).await?;
    while let Some(followed) = stream.next().await {
        let Followed::Event(event) = followed else {
            continue;
        };
        println!("{}", serde_json::to_string(&event)?);
        if let (Some(dir), EventKind::Preview) = (&args.save_previews, event.kind) {
            save_preview(dir, &event)?;
        }
        if event.kind.is_terminal() {
            return Ok(event.kind);
        }
    }
    bail!("the event stream of job {} ended without a terminal event", args.id)
}

fn save_preview(dir: &Path, event: &JobEvent) -> anyhow::Result<()> {
    let Some(data) = event
        .image
        .as_deref()
        .and_then(|i| i.strip_prefix(PREVIEW_DATA_URI_PREFIX))
    else {
        return Ok(());
    };
    let jpeg = base64::engine::general_purpose::STANDARD
        .decode(data)
        .context("decoding a preview")?;
    let path = dir.join(format!("{}-{:03}.jpg", event.job_id, event.step));
    std::fs::write(&path, jpeg).with_context(|| format!("writing {}", path.display()))
}

/// `hash-key`: the digest of the key on stdin, for a key file.
pub fn hash_key() -> anyhow::Result<()> {
    let mut key = String::new();
    std::io::stdin()
        .read_line(&mut key)
        .context("reading the key from stdin")?;
    let key = key.trim_end_matches(['\r', '\n']);
    if key.len() < 16 {
        bail!("a key must be at least 16 characters");
    }
    println!("{}", crate::auth::hashed(key));
    Ok(())
}
