//! Webhook events on their way out. When a job enters a state its webhook
//! subscribes to, whoever wrote that state (the worker; the dispatcher for a
//! cancel while queued or a failed publish) puts a [`WebhookMessage`] on the
//! durable queue `{queue}.webhooks` before it settles the job, and the
//! dispatcher's deliverer drains it: at least once, across restarts.
//!
//! Retries wait in one queue per delay, `{queue}.webhooks.retry-{ms}ms`, whose
//! messages expire after that delay back into `{queue}.webhooks` (RabbitMQ
//! dead-lettering; one queue per delay because a queue only expires its head).
//! An event that outlasts every retry ends in `{queue}.webhooks.dead`.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::names::Names;
use crate::queue::{publish_confirmed, QueueError, DEFAULT_CONFIRM_TIMEOUT};
use crate::rules::WebhookEvent;
use crate::status::{JobStatus, WebhookDelivery};
use crate::status_store::{StatusStore, StatusStoreError};

/// One event of one job, to be POSTed to its webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookMessage {
    /// The `webhook-id` header: the same for every attempt of this event and
    /// for a second publish of it, so that a receiver can drop duplicates.
    pub id: String,
    pub job_id: Uuid,
    pub event: WebhookEvent,
    pub url: String,
    /// The API key whose secret signs it (`None`: the open server's `anonymous`).
    #[serde(default)]
    pub owner: Option<String>,
    /// Attempts made before this one.
    #[serde(default)]
    pub attempts: u32,
    /// The record as it was when the job entered the state (its result's
    /// URLs are presigned again at each attempt).
    pub record: JobStatus,
}

/// The `webhook-id` of a job's event. A job runs again after a worker died
/// mid-job, and each `running` is an event of its own; a job ends once.
pub fn webhook_id(job: Uuid, event: WebhookEvent, attempt: u32) -> String {
    match event {
        WebhookEvent::Running => format!("msg_{}_running_{attempt}", job.simple()),
        other => format!("msg_{}_{other}", job.simple()),
    }
}

impl WebhookMessage {
    /// The message for `record` having entered the state of `event`, if its
    /// webhook wants that event.
    pub fn for_record(record: &JobStatus, event: WebhookEvent) -> Option<WebhookMessage> {
        let url = record.request.webhook_for(event)?;
        Some(WebhookMessage {
            id: webhook_id(record.id, event, record.attempt),
            job_id: record.id,
            event,
            url: url.to_string(),
            owner: record.owner.clone(),
            attempts: 0,
            record: record.clone(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("putting the webhook event on its queue: {0}")]
    Queue(#[from] QueueError),
    #[error("recording the webhook event: {0}")]
    Store(#[from] StatusStoreError),
}

/// Puts the event of the state `record` is in on `{queue}.webhooks` (when its
/// webhook wants it and the record does not say it was put there already),
/// then records it on the job as `queued`. Call it after writing the state
/// and before settling anything that would make the state be written
/// again: an event is then announced at least once. Returns whether it
/// published.
pub async fn announce(channel: &Channel, store: &StatusStore, record: &JobStatus) -> Result<bool, AnnounceError> {
    let Some(event) = WebhookEvent::of_state(record.state) else {
        return Ok(false);
    };
    let Some(message) = WebhookMessage::for_record(record, event) else {
        return Ok(false);
    };
    if record.webhooks.get(&event).is_some_and(|d| d.webhook_id == message.id) {
        return Ok(false);
    }
    publish_webhook(channel, &store.names().webhook_queue(), &message).await?;
    store
        .update(record.id, |current| {
            let current = current?;
            if current.webhooks.get(&event).is_some_and(|d| d.webhook_id == message.id) {
                return None;
            }
            let mut next = current.clone();
            next.webhooks.insert(event, WebhookDelivery::queued(&message.id));
            Some(next)
        })
        .await?;
    Ok(true)
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions::durable()
}

/// Declares `{queue}.webhooks` (both sides publish to it).
pub async fn declare_webhook_queue(channel: &Channel, names: &Names) -> Result<(), QueueError> {
    channel
        .queue_declare(names.webhook_queue().as_str().into(), durable(), FieldTable::default())
        .await?;
    Ok(())
}

/// Declares the retry queue of each delay and the dead queue (the deliverer's).
pub async fn declare_webhook_retries(channel: &Channel, names: &Names, delays: &[Duration]) -> Result<(), QueueError> {
    declare_webhook_queue(channel, names).await?;
    for delay in delays {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(millis(*delay)));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(names.webhook_queue().as_str())),
        );
        channel
            .queue_declare(names.webhook_retry_queue(*delay).as_str().into(), durable(), args)
            .await?;
    }
    channel
        .queue_declare(
            names.webhook_dead_queue().as_str().into(),
            durable(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

fn millis(d: Duration) -> i64 {
    d.as_millis().clamp(1, i64::MAX as u128) as i64
}

/// Publishes `message` (persistent) to the queue `queue` on a channel in
/// confirm mode and returns once RabbitMQ confirmed it.
pub async fn publish_webhook(channel: &Channel, queue: &str, message: &WebhookMessage) -> Result<(), QueueError> {
    let payload = serde_json::to_vec(message)?;
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message.id.as_str().into());
    publish_confirmed(channel, queue, &payload, props, message.job_id, DEFAULT_CONFIRM_TIMEOUT).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{validate, JobRequest};
    use chrono::Utc;

    fn record(events: Option<Vec<String>>) -> JobStatus {
        let request = JobRequest {
            prompt: Some("p".into()),
            webhook_url: Some("https://example.com/hook".into()),
            webhook_events: events,
            ..Default::default()
        };
        let mut status = JobStatus::queued(Uuid::new_v4(), validate(&request, || 1).unwrap(), Utc::now());
        status.owner = Some("alice".into());
        status
    }

    #[test]
    fn a_message_only_for_subscribed_events_with_stable_ids() {
        let r = record(None);
        assert!(WebhookMessage::for_record(&r, WebhookEvent::Running).is_none());
        let m = WebhookMessage::for_record(&r, WebhookEvent::Succeeded).unwrap();
        assert_eq!(
            (m.url.as_str(), m.owner.as_deref()),
            ("https://example.com/hook", Some("alice"))
        );
        assert_eq!(
            m.id,
            WebhookMessage::for_record(&r, WebhookEvent::Succeeded).unwrap().id
        );
        let mut r = record(Some(vec!["running".into()]));
        r.attempt = 1;
        let first = WebhookMessage::for_record(&r, WebhookEvent::Running).unwrap().id;
        r.attempt = 2;
        assert_ne!(first, WebhookMessage::for_record(&r, WebhookEvent::Running).unwrap().id);
        let back: WebhookMessage = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}
