//! The deliverer: drains `{queue}.webhooks` and POSTs each event, signed,
//! to its job's webhook. A 2xx answer settles it; anything else (another
//! status, a timeout, a refused connection or target) sends it to wait in
//! the retry queue of the next delay, and after the last one to
//! `{queue}.webhooks.dead`. Each outcome is recorded on the job's record
//! (`webhooks.{event}`). A delivery is acked only once its next step is
//! confirmed by RabbitMQ, so a dispatcher that stops (or dies) mid-way
//! leaves the event on a queue for the next one: at least once.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::queue::{self, QueueError};
use common::result_store::ResultStore;
use common::rules::WebhookEvent;
use common::status::{DeliveryState, JobStatus, WebhookDelivery};
use common::status_store::StatusStore;
use common::webhook::{declare_webhook_retries, publish_webhook, WebhookMessage};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use serde::Serialize;
use tokio::sync::watch;

use super::signing::signature_header;
use super::target::{self, PublicResolver};

/// How deliveries are made.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Private and loopback targets, and plain http, are allowed.
    pub allow_private: bool,
    /// The wait before each retry; after the last, the event is dead.
    pub retry_delays: Vec<Duration>,
    /// One attempt's limit, connection to the end of the answer.
    pub timeout: Duration,
    /// Deliveries in flight at once.
    pub concurrency: u16,
}

/// The body of a webhook POST (Standard Webhooks' envelope).
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    /// `job.running`, `job.succeeded`, `job.failed` or `job.cancelled`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the attempt was made.
    pub timestamp: chrono::DateTime<Utc>,
    /// The job's status record as of the event, its result's URLs presigned now.
    pub data: &'a JobStatus,
}

struct Deliverer {
    store: StatusStore,
    results: Arc<ResultStore>,
    config: DeliveryConfig,
    http: reqwest::Client,
}

/// Starts delivering in the background until `stopping` turns true; the
/// connection is made again (with a pause) when RabbitMQ drops it.
pub fn spawn(
    amqp_url: String,
    store: StatusStore,
    results: Arc<ResultStore>,
    config: DeliveryConfig,
    mut stopping: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(PublicResolver {
            allow_private: config.allow_private,
        }))
        .timeout(config.timeout)
        .user_agent(concat!("sdxl-queue-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let deliverer = Arc::new(Deliverer {
        store,
        results,
        config,
        http,
    });
    tokio::spawn(async move {
        loop {
            tokio::select! {
                ended = session(&amqp_url, deliverer.clone()) => {
                    if let Err(e) = ended {
                        tracing::warn!(error = %e, "webhook deliverer: RabbitMQ session ended; reconnecting");
                    }
                }
                _ = stopping.wait_for(|s| *s) => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    });
    Ok(())
}

async fn session(amqp_url: &str, deliverer: Arc<Deliverer>) -> Result<(), QueueError> {
    let names = deliverer.store.names().clone();
    let conn = queue::connect(amqp_url, "sdxl-dispatcher webhooks").await?;
    let consume = conn.create_channel().await?;
    let publish = conn.create_channel().await?;
    publish.confirm_select(ConfirmSelectOptions::default()).await?;
    declare_webhook_retries(&publish, &names, &deliverer.config.retry_delays).await?;
    consume
        .basic_qos(deliverer.config.concurrency.max(1), BasicQosOptions::default())
        .await?;
    let mut consumer = consume
        .basic_consume(
            names.webhook_queue().as_str().into(),
            "sdxl-dispatcher-webhooks".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %names.webhook_queue(), "delivering webhooks");
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let (deliverer, publish) = (deliverer.clone(), publish.clone());
        // At most `concurrency` in flight: the broker's prefetch.
        tokio::spawn(async move { deliverer.handle(&publish, delivery).await });
    }
    Ok(())
}

impl Deliverer {
    async fn handle(&self, publish: &Channel, delivery: Delivery) {
        let message: WebhookMessage = match serde_json::from_slice(&delivery.data) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "an undecodable webhook message: dropping it");
                let _ = delivery.ack(BasicAckOptions::default()).await;
                return;
            }
        };
        let (id, event) = (message.id.clone(), message.event);
        // A second publish of an event already settled is not sent again.
        if let Ok(Some(record)) = self.store.get(message.job_id).await {
            let settled = record.webhooks.get(&event).is_some_and(|d| {
                d.webhook_id == id && matches!(d.state, DeliveryState::Delivered | DeliveryState::Dead)
            });
            if settled {
                let _ = delivery.ack(BasicAckOptions::default()).await;
                return;
            }
        }
        let outcome = self.attempt(&message).await;
        let attempts = message.attempts + 1;
        let mut entry = WebhookDelivery {
            webhook_id: id.clone(),
            state: DeliveryState::Delivered,
            attempts,
            last_status: None,
            last_error: None,
            last_attempt_at: Some(Utc::now()),
            next_attempt_at: None,
        };
        let next = match outcome {
            Ok(status) if (200..300).contains(&status) => {
                entry.last_status = Some(status);
                None
            }
            failed => {
                match failed {
                    Ok(status) => {
                        entry.last_status = Some(status);
                        entry.last_error = Some(format!("answered {status}"));
                    }
                    Err(e) => entry.last_error = Some(e),
                }
                let mut again = message.clone();
                again.attempts = attempts;
                match self.config.retry_delays.get(message.attempts as usize) {
                    Some(delay) => {
                        entry.state = DeliveryState::Retrying;
                        entry.next_attempt_at = chrono::Duration::from_std(*delay).ok().map(|d| Utc::now() + d);
                        Some((self.store.names().webhook_retry_queue(*delay), again))
                    }
                    None => {
                        entry.state = DeliveryState::Dead;
                        Some((self.store.names().webhook_dead_queue(), again))
                    }
                }
            }
        };
        tracing::info!(job = %message.job_id, %event, attempts, state = ?entry.state,
            status = ?entry.last_status, error = ?entry.last_error, "webhook attempt");
        if let Some((queue, again)) = next {
            if let Err(e) = publish_webhook(publish, &queue, &again).await {
                // Not acked: the event comes back, and is attempted again.
                tracing::warn!(error = %e, "could not queue the webhook's next attempt; requeueing it");
                let requeue = BasicNackOptions {
                    requeue: true,
                    multiple: false,
                };
                let _ = delivery.nack(requeue).await;
                return;
            }
        }
        self.record(message.job_id, event, entry).await;
        if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
            tracing::warn!(error = %e, "could not ack a webhook delivery (it may be sent again)");
        }
    }

    /// One POST: the status of the answer, or why there was none.
    async fn attempt(&self, message: &WebhookMessage) -> Result<u16, String> {
        target::check(&message.url, self.config.allow_private)
            .await
            .map_err(|e| format!("the URL {e}"))?;
        let mut record = message.record.clone();
        if let Some(result) = record.result.as_mut() {
            for image in std::iter::once(&mut result.grid).chain(result.images.iter_mut()) {
                image.url = self
                    .results
                    .presign_get(&image.key)
                    .await
                    .map_err(|e| format!("presigning {}: {e}", image.key))?;
            }
        }
        let now = Utc::now();
        let body = serde_json::to_vec(&Envelope {
            kind: format!("job.{}", message.event),
            timestamp: now,
            data: &record,
        })
        .map_err(|e| e.to_string())?;
        let owner = message.owner.as_deref().unwrap_or("anonymous");
        let secrets = self
            .store
            .webhook_signing_secrets(owner)
            .await
            .map_err(|e| format!("reading the signing secret: {e}"))?;
        let timestamp = now.timestamp();
        let response = self
            .http
            .post(&message.url)
            .header("content-type", "application/json")
            .header("webhook-id", &message.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature_header(&secrets, &message.id, timestamp, &body),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        Ok(response.status().as_u16())
    }

    /// Writes the outcome on the job's record (best effort: the delivery
    /// itself is already settled on RabbitMQ's side).
    async fn record(&self, job: uuid::Uuid, event: WebhookEvent, entry: WebhookDelivery) {
        let written = self
            .store
            .update(job, |current| {
                let mut next = current?.clone();
                let newer = next
                    .webhooks
                    .get(&event)
                    .is_some_and(|d| d.webhook_id == entry.webhook_id && d.attempts > entry.attempts);
                if newer {
                    return None;
                }
                next.webhooks.insert(event, entry.clone());
                Some(next)
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(%job, %event, error = %e, "could not record the webhook attempt on the job");
        }
    }
}
