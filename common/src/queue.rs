//! The job queue on RabbitMQ: its topology, the message that travels on it,
//! and publishing with publisher confirms.
//!
//! Topology (declared by both sides, idempotently): a durable queue
//! `{queue}` with `x-max-priority` and a dead-letter exchange `{queue}.dlx`
//! (direct) that routes rejected messages to the durable queue `{queue}.dead`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::names::{Names, MAX_PRIORITY};
use crate::rules::JobRequest;
use crate::rules::{random_seed, validate, ValidJob};

/// What travels on the queue. `R` is [`crate::ValidJob`] when published and
/// [`serde_json::Value`] when consumed: the worker validates it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobMessage<R> {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub request: R,
    /// The API key name that submitted it, so that a worker that has to
    /// rebuild a lost status record gives it back to its owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Why a message taken off the queue cannot be run. `id` is the job id when
/// the message had a readable one, so that the worker can mark that job
/// failed (its client is waiting on it) before dead-lettering the message;
/// without one there is no record to update and the message is only
/// dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub id: Option<Uuid>,
    pub reason: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.id {
            Some(id) => write!(f, "job {id}: {}", self.reason),
            None => write!(f, "undecodable message: {}", self.reason),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes and validates a message's payload, as the worker must: anything
/// can be published to a queue, so the request is checked again with the
/// dispatcher's own rules ([`JobRequest::from_value`], then [`validate`]).
/// A request without a seed (the dispatcher always sets one) gets one drawn.
pub fn decode_message(payload: &[u8]) -> Result<JobMessage<ValidJob>, DecodeError> {
    let message: JobMessage<serde_json::Value> = serde_json::from_slice(payload).map_err(|e| {
        /// The id alone, for a message whose other fields are broken.
        #[derive(Deserialize)]
        struct IdOnly {
            id: Uuid,
        }
        DecodeError {
            id: serde_json::from_slice::<IdOnly>(payload).ok().map(|m| m.id),
            reason: format!("not a job message: {e}"),
        }
    })?;
    let invalid = |e: crate::ValidationError| DecodeError {
        id: Some(message.id),
        reason: e.to_string(),
    };
    let request = JobRequest::from_value(message.request).map_err(invalid)?;
    let job = validate(&request, random_seed).map_err(invalid)?;
    // A job reads its inputs from its own prefix only: a message pointing at
    // another job's objects (or anywhere else in the bucket) is refused.
    let own = [
        ("image", job.image.as_ref(), Names::input_object(message.id)),
        ("mask", job.mask.as_ref(), Names::mask_object(message.id)),
    ];
    for (field, stored, expected) in own {
        if let Some(stored) = stored {
            if stored.key != expected {
                return Err(DecodeError {
                    id: Some(message.id),
                    reason: format!("`{field}` must be the job's own `{expected}`, got `{}`", stored.key),
                });
            }
        }
    }
    Ok(JobMessage {
        id: message.id,
        created_at: message.created_at,
        request: job,
        owner: message.owner,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not confirm the publish of job {0} (nack)")]
    Nacked(Uuid),
    #[error("RabbitMQ returned job {0} as unroutable: is queue `{1}` declared?")]
    Unroutable(Uuid, String),
    #[error("RabbitMQ did not confirm the publish of job {0} within {1:?}")]
    Unconfirmed(Uuid, Duration),
    #[error("RabbitMQ did not complete the connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("encoding job message: {0}")]
    Encode(#[from] serde_json::Error),
}

/// How long a publish waits for RabbitMQ's confirm unless told otherwise.
/// A broker that neither confirms nor closes the channel (frozen, cut off
/// by the network, or blocking publishers on a resource alarm) would
/// otherwise hold the caller, and the client behind it, forever.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// How long opening a connection (TCP and the AMQP handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens a connection to `url`, named after the process for the management
/// UI, within [`CONNECT_TIMEOUT`].
pub async fn connect(url: &str, name: &str) -> Result<Connection, QueueError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props))
        .await
        .map_err(|_| QueueError::ConnectTimeout(CONNECT_TIMEOUT))?
        .map_err(QueueError::from)
}

/// Declares the queue, the dead-letter exchange and the dead-letter queue.
/// Both sides call it, so that whichever starts first creates them.
pub async fn declare_topology(channel: &Channel, names: &Names) -> Result<(), QueueError> {
    let dlx = names.dead_letter_exchange();
    let dlq = names.dead_letter_queue();
    channel
        .exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            dlq.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            names.queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::LongInt(MAX_PRIORITY.into()));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dlx.as_str())),
    );
    channel
        .queue_declare(names.queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await?;
    Ok(())
}

/// How many messages wait in the job queue and in its dead-letter queue
/// (ready ones, not those delivered and not yet settled), read with passive
/// declares, which fail if a queue does not exist.
pub async fn queue_depths(channel: &Channel, names: &Names) -> Result<(u32, u32), QueueError> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let jobs = channel
        .queue_declare(names.queue.as_str().into(), passive, FieldTable::default())
        .await?;
    let dead = channel
        .queue_declare(
            names.dead_letter_queue().as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await?;
    Ok((jobs.message_count(), dead.message_count()))
}

/// Publishes `payload` to the queue `queue` (default exchange, `mandatory`)
/// on a channel in confirm mode and returns once RabbitMQ confirmed it: a
/// nack, an unroutable return or no confirm `within` is an error naming job
/// `id`. After [`QueueError::Unconfirmed`] the message may still be queued
/// (the confirm was late, not refused): the caller treats the job as not
/// queued and the worker finds its record already terminal.
pub async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    props: BasicProperties,
    id: Uuid,
    within: Duration,
) -> Result<(), QueueError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirmed = async {
        channel
            .basic_publish("".into(), queue.into(), options, payload, props)
            .await?
            .await
    };
    let confirm = tokio::time::timeout(within, confirmed)
        .await
        .map_err(|_| QueueError::Unconfirmed(id, within))??;
    if !confirm.is_ack() {
        return Err(QueueError::Nacked(id));
    }
    if confirm.take_message().is_some() {
        return Err(QueueError::Unroutable(id, queue.to_string()));
    }
    Ok(())
}

/// Publishes jobs to the queue and waits for the broker's confirm of each.
#[derive(Clone)]
pub struct JobPublisher {
    channel: Channel,
    names: Names,
    confirm_timeout: Duration,
}

impl JobPublisher {
    /// A channel in confirm mode on `conn`, with the topology declared.
    pub async fn new(conn: &Connection, names: Names) -> Result<Self, QueueError> {
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        declare_topology(&channel, &names).await?;
        Ok(JobPublisher {
            channel,
            names,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
        })
    }

    /// Waits at most `timeout` for each publish's confirm.
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Publishes one job (persistent, with its priority, `mandatory` so that
    /// an unroutable message comes back) and returns once RabbitMQ has
    /// confirmed it. Any other outcome is an error: the caller must not
    /// report the job as queued.
    pub async fn publish<R: Serialize>(&self, message: &JobMessage<R>, priority: u8) -> Result<(), QueueError> {
        let payload = serde_json::to_vec(message)?;
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(priority.min(MAX_PRIORITY))
            .with_content_type("application/json".into())
            .with_message_id(message.id.to_string().as_str().into());
        publish_confirmed(
            &self.channel,
            &self.names.queue,
            &payload,
            props,
            message.id,
            self.confirm_timeout,
        )
        .await
    }

    /// The channel (confirm mode), for the webhook events this side publishes.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Whether the channel is still usable (for `/healthz`).
    pub fn is_connected(&self) -> bool {
        self.channel.status().connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_message() -> JobMessage<ValidJob> {
        let request = JobRequest {
            prompt: Some("a lighthouse at dusk".into()),
            guidance_scale: Some(7.25),
            num_images: Some(2),
            ..Default::default()
        };
        JobMessage {
            id: Uuid::new_v4(),
            created_at: Utc::now(),
            request: validate(&request, || 99).unwrap(),
            owner: Some("alice".into()),
        }
    }

    #[test]
    fn a_published_message_decodes_to_itself() {
        let message = valid_message();
        let decoded = decode_message(&serde_json::to_vec(&message).unwrap()).unwrap();
        assert_eq!(decoded.id, message.id);
        assert_eq!(decoded.created_at, message.created_at);
        assert_eq!(decoded.request, message.request);
    }

    #[test]
    fn inputs_travel_as_keys_of_the_job_own_prefix() {
        let mut message = valid_message();
        let stored = |key: String| crate::rules::StoredImage {
            key,
            width: 512,
            height: 512,
        };
        message.request.image = Some(stored(Names::input_object(message.id)));
        message.request.mask = Some(stored(Names::mask_object(message.id)));
        message.request.strength = Some(0.5);
        let decoded = decode_message(&serde_json::to_vec(&message).unwrap()).unwrap();
        assert_eq!(decoded.request, message.request);
        // Another job's input is refused.
        message.request.image = Some(stored(Names::input_object(Uuid::new_v4())));
        let e = decode_message(&serde_json::to_vec(&message).unwrap()).unwrap_err();
        assert_eq!(e.id, Some(message.id));
        assert!(e.reason.contains("`image` must be the job's own"), "{e}");
        // Image data on the queue is refused.
        let mut value = serde_json::to_value(&message).unwrap();
        value["request"]["image"] = serde_json::json!("iVBORw0KGgo=");
        let e = decode_message(&serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert!(e.reason.contains("inline data"), "{e}");
    }

    #[test]
    fn garbage_has_no_id() {
        for payload in [
            &b"this is not a job"[..],
            b"",
            b"{",
            b"[]",
            b"null",
            br#"{"id":"nope"}"#,
        ] {
            let e = decode_message(payload).unwrap_err();
            assert_eq!(e.id, None, "{e}");
            assert!(
                e.to_string().starts_with("undecodable message: not a job message: "),
                "{e}"
            );
        }
    }

    #[test]
    fn a_broken_envelope_with_a_readable_id_names_the_job() {
        let id = Uuid::new_v4();
        let payload = serde_json::json!({ "id": id, "created_at": "yesterday", "request": {} });
        let e = decode_message(&serde_json::to_vec(&payload).unwrap()).unwrap_err();
        assert_eq!(e.id, Some(id));
        assert!(e.reason.contains("not a job message"), "{e}");
    }

    #[test]
    fn an_invalid_request_names_the_job_and_the_field() {
        let id = Uuid::new_v4();
        for (request, field) in [
            (serde_json::json!({ "prompt": "x", "width": 100 }), "`width`"),
            (serde_json::json!({ "prompt": "x", "width": "wide" }), "`width`"),
            (serde_json::json!({ "prompt": "x", "steps": 3 }), "`steps`"),
            (serde_json::json!({}), "`prompt`"),
            (serde_json::json!([1, 2]), "JSON object"),
        ] {
            let payload = serde_json::json!({ "id": id, "created_at": Utc::now(), "request": request });
            let e = decode_message(&serde_json::to_vec(&payload).unwrap()).unwrap_err();
            assert_eq!(e.id, Some(id), "{e}");
            assert!(e.to_string().starts_with(&format!("job {id}: ")), "{e}");
            assert!(e.reason.contains(field), "{e} should name {field}");
        }
    }

    #[test]
    fn a_missing_seed_is_drawn() {
        let payload =
            serde_json::json!({ "id": Uuid::new_v4(), "created_at": Utc::now(), "request": { "prompt": "x" } });
        let job = decode_message(&serde_json::to_vec(&payload).unwrap()).unwrap().request;
        assert_eq!(job.prompt, "x");
    }
}
