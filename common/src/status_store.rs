//! Status records, cancel flags, idempotency keys and event channels in Redis.
//!
//! A status record is one JSON string under `{prefix}:job:{id}` with a TTL.
//! Both the dispatcher (queued → cancelled) and the worker (queued → running →
//! ...) change it, so every change is a compare-and-set: read, compute the next
//! record, and write it only if the stored string is still the one read (a
//! small Lua script); on a race, read again and recompute.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use uuid::Uuid;

use crate::event::JobEvent;
use crate::names::Names;
use crate::status::JobStatus;

#[derive(Debug, thiserror::Error)]
pub enum StatusStoreError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("status record of job {id} is not valid JSON: {source}")]
    Corrupt {
        id: Uuid,
        #[source]
        source: serde_json::Error,
    },
    #[error("status record of job {0} kept changing under us")]
    Contended(Uuid),
}

impl StatusStoreError {
    /// Whether trying again later may succeed (Redis unreachable or busy).
    pub fn is_transient(&self) -> bool {
        match self {
            StatusStoreError::Redis(e) => {
                e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
            }
            StatusStoreError::Contended(_) => true,
            StatusStoreError::Corrupt { .. } => false,
        }
    }
}

/// Writes `ARGV[2]` with a TTL of `ARGV[3]` seconds if the key still holds
/// `ARGV[1]` (an empty `ARGV[1]` means "if the key is missing").
const COMPARE_AND_SET: &str = r"
local cur = redis.call('GET', KEYS[1])
if (cur == false and ARGV[1] == '') or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
";

/// The outcome of [`StatusStore::update`].
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The record was written; here it is.
    Written(JobStatus),
    /// The closure declined to change this record (returned `None`).
    Unchanged(Option<JobStatus>),
}

#[derive(Clone)]
pub struct StatusStore {
    client: redis::Client,
    conn: ConnectionManager,
    names: Names,
    ttl: Duration,
    script: redis::Script,
}

impl StatusStore {
    /// Connects; commands time out after 5 s and the connection is re-made in
    /// the background when Redis comes back.
    pub async fn connect(url: &str, names: Names, ttl: Duration) -> Result<Self, StatusStoreError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(5))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        Ok(StatusStore {
            client,
            conn,
            names,
            ttl,
            script: redis::Script::new(COMPARE_AND_SET),
        })
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    fn ttl_secs(&self) -> u64 {
        self.ttl.as_secs().max(1)
    }

    pub async fn ping(&self) -> Result<(), StatusStoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn get_raw(&self, id: Uuid) -> Result<Option<String>, StatusStoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.get(self.names.status_key(id)).await?)
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<JobStatus>, StatusStoreError> {
        match self.get_raw(id).await? {
            None => Ok(None),
            Some(raw) => serde_json::from_str(&raw)
                .map(Some)
                .map_err(|source| StatusStoreError::Corrupt { id, source }),
        }
    }

    /// Writes a new record; false if one already exists.
    pub async fn create(&self, status: &JobStatus) -> Result<bool, StatusStoreError> {
        let json =
            serde_json::to_string(status).map_err(|source| StatusStoreError::Corrupt { id: status.id, source })?;
        let mut conn = self.conn.clone();
        let written: bool = self
            .script
            .key(self.names.status_key(status.id))
            .arg("")
            .arg(json)
            .arg(self.ttl_secs())
            .invoke_async(&mut conn)
            .await?;
        Ok(written)
    }

    /// Compare-and-set: `next` sees the current record (if any) and returns
    /// the record to write, or `None` to leave it as it is.
    pub async fn update(
        &self,
        id: Uuid,
        mut next: impl FnMut(Option<&JobStatus>) -> Option<JobStatus>,
    ) -> Result<Update, StatusStoreError> {
        for _ in 0..16 {
            let raw = self.get_raw(id).await?;
            let current: Option<JobStatus> = match &raw {
                None => None,
                Some(raw) => {
                    Some(serde_json::from_str(raw).map_err(|source| StatusStoreError::Corrupt { id, source })?)
                }
            };
            let Some(new) = next(current.as_ref()) else {
                return Ok(Update::Unchanged(current));
            };
            let json = serde_json::to_string(&new).map_err(|source| StatusStoreError::Corrupt { id, source })?;
            let mut conn = self.conn.clone();
            let written: bool = self
                .script
                .key(self.names.status_key(id))
                .arg(raw.unwrap_or_default())
                .arg(json)
                .arg(self.ttl_secs())
                .invoke_async(&mut conn)
                .await?;
            if written {
                return Ok(Update::Written(new));
            }
        }
        Err(StatusStoreError::Contended(id))
    }

    /// Publishes an event on the job's channel.
    pub async fn publish_event(&self, event: &JobEvent) -> Result<(), StatusStoreError> {
        let json = serde_json::to_string(event).map_err(|source| StatusStoreError::Corrupt {
            id: event.job_id,
            source,
        })?;
        let mut conn = self.conn.clone();
        let _: i64 = conn.publish(self.names.events_channel(event.job_id), json).await?;
        Ok(())
    }

    /// Raises the cancel flag that the worker running the job polls.
    pub async fn request_cancel(&self, id: Uuid) -> Result<(), StatusStoreError> {
        let mut conn = self.conn.clone();
        let _: () = conn.set_ex(self.names.cancel_key(id), 1, self.ttl_secs()).await?;
        Ok(())
    }

    pub async fn cancel_requested(&self, id: Uuid) -> Result<bool, StatusStoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.exists(self.names.cancel_key(id)).await?)
    }

    /// Binds an `Idempotency-Key` to `id` unless it is already bound; returns
    /// the job it was bound to before, if any.
    pub async fn claim_idempotency_key(&self, key: &str, id: Uuid) -> Result<Option<Uuid>, StatusStoreError> {
        let mut conn = self.conn.clone();
        let redis_key = self.names.idempotency_key(key);
        let set: bool = redis::cmd("SET")
            .arg(&redis_key)
            .arg(id.to_string())
            .arg("NX")
            .arg("EX")
            .arg(self.ttl_secs())
            .query_async::<Option<String>>(&mut conn)
            .await?
            .is_some();
        if set {
            return Ok(None);
        }
        let existing: Option<String> = conn.get(&redis_key).await?;
        Ok(existing.and_then(|s| s.parse().ok()))
    }

    /// Releases a key claimed by a submit that then failed.
    pub async fn release_idempotency_key(&self, key: &str) -> Result<(), StatusStoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = conn.del(self.names.idempotency_key(key)).await?;
        Ok(())
    }

    /// Subscribes to the job's events. Subscribe *before* reading the status,
    /// so that no event falls between the two.
    pub async fn subscribe(&self, id: Uuid) -> Result<impl Stream<Item = JobEvent> + Send + 'static, StatusStoreError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(self.names.events_channel(id)).await?;
        Ok(pubsub.into_on_message().filter_map(|msg| async move {
            let payload: String = msg.get_payload().ok()?;
            match serde_json::from_str::<JobEvent>(&payload) {
                Ok(event) => Some(event),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an undecodable event");
                    None
                }
            }
        }))
    }
}
