//! The consume loop: prefetch one job, handle it, settle it, repeat; on the
//! shutdown signal stop consuming, finish the current job, settle it, return.
//! A lost RabbitMQ connection is made again with backoff.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use common::queue::{self, declare_topology};
use common::result_store::ResultStore;
use common::status_store::StatusStore;
use common::webhook::declare_webhook_queue;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use tokio::sync::watch;

use super::config::WorkerConfig;
use super::error::ServiceError;
use super::inputs::LoraCache;
use super::job::{self, Disposition, JobContext};
use super::retry::{retry, Backoff};
use crate::engine::{Engine, EngineJob};

/// Runs the worker service until `shutdown` completes (then it finishes the
/// job in hand and returns `Ok`) or a service fails for good.
pub async fn run(
    config: WorkerConfig,
    engine: Arc<dyn Engine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let names = config.service.names();
    let worker_name = config.worker_name();
    let status = StatusStore::connect(&config.service.redis_url.0, names.clone(), config.service.status_ttl).await?;
    let results = ResultStore::new(&config.service.s3)?;
    retry(Backoff::new(config.retry_for), "creating the bucket", || {
        results.ensure_bucket()
    })
    .await?;
    tracing::info!(bucket = results.bucket_name(), queue = %names.queue, worker = %worker_name, "services ready");

    warm_up(engine.clone(), &config).await?;

    let loras = LoraCache::new(config.lora_cache_dir(), config.lora_cache_bytes)
        .map_err(|e| ServiceError::LoraCache(format!("{}: {e}", config.lora_cache_dir().display())))?;
    tracing::info!(dir = %loras.dir().display(), max_bytes = config.lora_cache_bytes, "LoRA cache");
    let ctx = JobContext {
        engine,
        status,
        results,
        config,
        worker_name,
        loras,
        webhooks: std::sync::Mutex::new(None),
    };
    // RabbitMQ restarts and network cuts end a session; the worker connects
    // again with backoff. It gives up (exits non-zero, for its supervisor to
    // restart it) only when no connection could be made for `retry_for`.
    let backoff = Backoff::new(ctx.config.retry_for);
    let mut failing_since: Option<Instant> = None;
    let mut attempt = 0;
    loop {
        match session(&ctx, &mut stop).await {
            Ok(()) => break,
            Err(SessionError::Lost(e, consumed)) => {
                if consumed {
                    failing_since = None;
                    attempt = 0;
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= backoff.max_elapsed {
                    return Err(e);
                }
                let delay = backoff.delay(attempt);
                attempt += 1;
                tracing::warn!(error = %e, ?delay, "RabbitMQ connection lost or refused: reconnecting");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Why a session ended early: the error, and whether it had consumed (so
/// the connection had worked, and the backoff starts over).
enum SessionError {
    Lost(ServiceError, bool),
}

/// One connection: declare, consume and handle jobs until shutdown (`Ok`)
/// or until the connection or channel fails.
async fn session(ctx: &JobContext, stop: &mut watch::Receiver<bool>) -> Result<(), SessionError> {
    let names = ctx.config.service.names();
    let lost = |e: ServiceError| SessionError::Lost(e, false);
    let conn = queue::connect(
        &ctx.config.service.amqp_url.0,
        &format!("sdxl-worker {}", ctx.worker_name),
    )
    .await
    .map_err(|e| lost(e.into()))?;
    let channel = conn.create_channel().await.map_err(|e| lost(e.into()))?;
    declare_topology(&channel, &names).await.map_err(|e| lost(e.into()))?;
    // Webhook events are published on a channel of their own, in confirm mode.
    let webhooks = conn.create_channel().await.map_err(|e| lost(e.into()))?;
    webhooks
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| lost(e.into()))?;
    declare_webhook_queue(&webhooks, &names)
        .await
        .map_err(|e| lost(e.into()))?;
    if let Ok(mut slot) = ctx.webhooks.lock() {
        *slot = Some(webhooks);
    }
    // One job at a time: the engine runs one, so the broker holds the rest
    // where any other worker can take them.
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .map_err(|e| lost(e.into()))?;
    let tag = format!("sdxl-worker-{}", ctx.worker_name);
    let mut consumer = channel
        .basic_consume(
            names.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lost(e.into()))?;
    tracing::info!("consuming");
    let lost = |e: ServiceError| SessionError::Lost(e, true);

    let mut consuming = true;
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            next = consumer.next() => next,
        };
        let delivery = match next {
            None => return Err(lost(ServiceError::ConsumerClosed)),
            Some(Err(e)) => return Err(lost(e.into())),
            Some(Ok(d)) => d,
        };
        let handling = job::handle(ctx, &delivery.data);
        tokio::pin!(handling);
        let disposition = tokio::select! {
            d = &mut handling => d,
            _ = stop.wait_for(|s| *s) => {
                tracing::info!("shutting down: no new jobs, finishing this one");
                consuming = false;
                if let Err(e) = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await {
                    tracing::warn!(error = %e, "could not cancel the consumer");
                }
                handling.await
            }
        };
        if let Err(e) = settle(&delivery, disposition).await {
            // The job's outcome is already stored and recorded: the broker
            // redelivers the message, and its next handler acks it at once.
            tracing::warn!(error = %e, ?disposition, "could not settle the delivery; it will be redelivered");
            return Err(lost(e));
        }
        if *stop.borrow() {
            break;
        }
    }
    if consuming {
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }
    // Closing the channel hands any message delivered but not settled back
    // to the queue.
    let _ = channel.close(200, "worker shutting down".into()).await;
    let _ = conn.close(200, "worker shutting down".into()).await;
    Ok(())
}

async fn settle(delivery: &Delivery, disposition: Disposition) -> Result<(), ServiceError> {
    match disposition {
        Disposition::Ack => delivery.ack(BasicAckOptions::default()).await?,
        Disposition::Reject => delivery.reject(BasicRejectOptions { requeue: false }).await?,
        Disposition::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await?
        }
    };
    Ok(())
}

/// One short generation before consuming, so that the first job does not pay
/// for lazy initialisation (kernels, allocator pools, page cache).
async fn warm_up(engine: Arc<dyn Engine>, config: &WorkerConfig) -> Result<(), ServiceError> {
    if config.warmup_steps == 0 {
        return Ok(());
    }
    let job = EngineJob::text(
        "warm-up",
        config.warmup_size,
        config.warmup_size,
        config.warmup_steps,
        0,
    );
    let start = std::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        engine.generate(&job, &mut |_| {}, &cancel)
    })
    .await
    .map_err(|e| ServiceError::Warmup(e.to_string()))?
    .map_err(|e| ServiceError::Warmup(e.to_string()))?;
    tracing::info!(elapsed = ?start.elapsed(), "warmed up");
    Ok(())
}
