//! The consume loop: hold up to a batch of deliveries (the prefetch), run
//! the compatible ones among them as one batch, settle each as its job
//! ends, repeat; the others stay held, unsettled, for the next round. On
//! the shutdown signal stop consuming, finish the batch in hand, settle its
//! deliveries, return (what is still held goes back to the queue when the
//! channel closes). A lost RabbitMQ connection is made again with backoff.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use common::queue::{self, declare_topology};
use common::result_store::ResultStore;
use common::status_store::StatusStore;
use common::webhook::declare_webhook_queue;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use tokio::sync::watch;

use super::batch::{plan, BatchCaps, Candidate};
use super::config::WorkerConfig;
use super::context::JobContext;
use super::error::ServiceError;
use super::inputs::LoraCache;
use super::job::{self, Disposition, Prepared};
use super::retry::{retry, Backoff};
use crate::engine::{Engine, EngineJob};

/// Runs the worker service until `shutdown` completes (then it finishes the
/// batch in hand and returns `Ok`) or a service fails for good.
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

/// A delivery taken from the consumer and not settled yet.
struct Held {
    delivery: Delivery,
    candidate: Candidate,
    /// Its place in the order of arrival.
    arrival: u64,
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
    // As many jobs as one batch may hold: the engine runs one batch at a
    // time, so the broker keeps the rest where any other worker can take
    // them. 1 (the CPU default) is one job at a time.
    let caps = BatchCaps {
        jobs: ctx.config.batch_jobs(false),
        images_per_rank: ctx.config.max_batch_images.into(),
    };
    channel
        .basic_qos(caps.jobs as u16, BasicQosOptions::default())
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
    tracing::info!(max_batch_jobs = caps.jobs, "consuming");
    let lost = |e: ServiceError| SessionError::Lost(e, true);

    let world = ctx.engine.world_size();
    let mut held: Vec<Held> = Vec::new();
    let mut arrivals = 0u64;
    let mut hold = |delivery: Delivery, held: &mut Vec<Held>| {
        let priority = delivery.properties.priority().unwrap_or(0);
        let candidate = Candidate::of(&delivery.data, priority, world);
        arrivals += 1;
        held.push(Held {
            delivery,
            candidate,
            arrival: arrivals,
        });
    };
    let mut consuming = true;
    loop {
        if held.is_empty() {
            let next = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                next = consumer.next() => next,
            };
            hold(next_delivery(next).map_err(lost)?, &mut held);
        }
        // What else is already on its way joins the choice.
        while caps.jobs > 1 && held.len() < caps.jobs {
            match tokio::time::timeout(ctx.config.batch_wait, consumer.next()).await {
                Err(_) => break,
                Ok(next) => hold(next_delivery(next).map_err(lost)?, &mut held),
            }
        }
        held.sort_by_key(|h| h.arrival);
        let candidates: Vec<Candidate> = held.iter().map(|h| h.candidate.clone()).collect();
        let mut slots: Vec<Option<Held>> = held.drain(..).map(Some).collect();
        let batch: Vec<Held> = plan(&candidates, caps)
            .into_iter()
            .filter_map(|i| slots[i].take())
            .collect();
        held.extend(slots.into_iter().flatten());

        let handling = run_batch(ctx, batch, &mut held);
        tokio::pin!(handling);
        let settled = tokio::select! {
            r = &mut handling => r,
            _ = stop.wait_for(|s| *s) => {
                tracing::info!("shutting down: no new jobs, finishing this batch");
                consuming = false;
                if let Err(e) = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await {
                    tracing::warn!(error = %e, "could not cancel the consumer");
                }
                handling.await
            }
        };
        if let Err(e) = settled {
            // The jobs' outcomes are already stored and recorded: the broker
            // redelivers the messages, and their next handler acks them at once.
            tracing::warn!(error = %e, "could not settle a delivery; it will be redelivered");
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

/// The consumer's next item as a delivery, or why the session is over.
fn next_delivery(next: Option<Result<Delivery, lapin::Error>>) -> Result<Delivery, ServiceError> {
    match next {
        None => Err(ServiceError::ConsumerClosed),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(d)) => Ok(d),
    }
}

/// One batch: each delivery prepared (the lead first, waiting for its lease
/// as a job alone does; then the others together, each stepping back into
/// `held` when another worker holds its lease), one engine call for those
/// ready, and every delivery settled as soon as its own job ends. A failed
/// settle (the connection is gone) does not stop the others: every job is
/// still finished, its outcome stored, so that its redelivery is acked at
/// once; the first such error is returned at the end.
async fn run_batch(ctx: &JobContext, batch: Vec<Held>, held: &mut Vec<Held>) -> Result<(), ServiceError> {
    let mut failed: Option<ServiceError> = None;
    let mut ready = Vec::with_capacity(batch.len());
    let mut running = Vec::with_capacity(batch.len());
    let mut batch = batch.into_iter();
    let lead: Vec<Held> = batch.next().into_iter().collect();
    let others: Vec<Held> = batch.collect();
    for (group, wait) in [(lead, true), (others, false)] {
        let prepared =
            futures_util::future::join_all(group.iter().map(|h| job::prepare(ctx, &h.delivery.data, wait))).await;
        for (h, p) in group.into_iter().zip(prepared) {
            match p {
                Prepared::Settled(disposition) => settle_noting(&h.delivery, disposition, &mut failed).await,
                Prepared::Busy => held.push(h),
                Prepared::Ready(r) => {
                    ready.push(*r);
                    running.push(h);
                }
            }
        }
    }
    if !ready.is_empty() {
        let mut ends: FuturesUnordered<_> = job::generate(ctx, ready)
            .into_iter()
            .zip(running)
            .map(|(end, h)| async move { (end.await, h) })
            .collect();
        while let Some((disposition, h)) = ends.next().await {
            settle_noting(&h.delivery, disposition, &mut failed).await;
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Settles `delivery`, unless an earlier settle of this session failed (its
/// channel is gone: the broker hands the message back by itself); keeps the
/// first error.
async fn settle_noting(delivery: &Delivery, disposition: Disposition, failed: &mut Option<ServiceError>) {
    if failed.is_some() {
        return;
    }
    if let Err(e) = settle(delivery, disposition).await {
        tracing::warn!(error = %e, ?disposition, "could not settle a delivery");
        *failed = Some(e);
    }
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
