//! The consume loop: prefetch one job, handle it, settle it, repeat; on the
//! shutdown signal stop consuming, finish the current job, settle it, return.

use std::future::Future;
use std::sync::Arc;

use common::queue::{self, declare_topology};
use common::result_store::ResultStore;
use common::status_store::StatusStore;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use tokio::sync::watch;

use super::config::WorkerConfig;
use super::error::ServiceError;
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

    let conn = queue::connect(&config.service.amqp_url.0, &format!("sdxl-worker {worker_name}")).await?;
    let channel = conn.create_channel().await?;
    declare_topology(&channel, &names).await?;
    // One job at a time: the engine runs one, so the broker holds the rest
    // where any other worker can take them.
    channel.basic_qos(1, BasicQosOptions::default()).await?;
    let tag = format!("sdxl-worker-{worker_name}");
    let mut consumer = channel
        .basic_consume(
            names.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!("consuming");

    let ctx = JobContext {
        engine,
        status,
        results,
        config,
        worker_name,
    };
    let mut consuming = true;
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            next = consumer.next() => next,
        };
        let delivery = match next {
            None => return Err(ServiceError::ConsumerClosed),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(d)) => d,
        };
        let handling = job::handle(&ctx, &delivery.data);
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
        settle(&delivery, disposition).await?;
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
    tracing::info!("stopped");
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
    let job = EngineJob {
        prompt: "warm-up".into(),
        negative_prompt: None,
        width: config.warmup_size,
        height: config.warmup_size,
        num_inference_steps: config.warmup_steps,
        guidance_scale: 5.0,
        seed: 0,
        num_images: None,
        preview_every: 0,
    };
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
