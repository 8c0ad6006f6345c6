//! Status records, cancel flags, idempotency keys and event channels in Redis.
//!
//! A status record is one JSON string under `{prefix}:job:{id}` with a TTL.
//! Both the dispatcher (queued → cancelled) and the worker (queued → running →
//! ...) change it, so every change is a compare-and-set: read, compute the next
//! record, and write it only if the stored string is still the one read (a
//! small Lua script); on a race, read again and recompute.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, AsyncConnectionConfig, RedisResult};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::event::JobEvent;
use crate::names::Names;
use crate::status::{JobState, JobStatus};

mod queue_order;
mod secrets;
pub use queue_order::QueueCounts;
pub use secrets::{new_secret, PREVIOUS_SECRET_TTL};

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
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
}

impl StatusStoreError {
    /// Whether trying again later may succeed (Redis unreachable or busy).
    pub fn is_transient(&self) -> bool {
        match self {
            StatusStoreError::Redis(e) => {
                e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
            }
            StatusStoreError::Contended(_) | StatusStoreError::Timeout(_) => true,
            StatusStoreError::Corrupt { .. } => false,
        }
    }

    /// The connection was closed before the command could be written.
    fn was_not_sent(&self) -> bool {
        match self {
            StatusStoreError::Redis(e) => {
                e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.kind() == redis::ErrorKind::IoError
                        && e.to_string().to_ascii_lowercase().contains("broken pipe")
            }
            _ => false,
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

/// `ARGV[3]` = `renew`: sets the lease `KEYS[1]` to `ARGV[1]` for `ARGV[2]`
/// ms if it is free or already `ARGV[1]`'s; `release`: deletes it if it is
/// `ARGV[1]`'s. Returns 1 when it did.
const LEASE: &str = r"
local cur = redis.call('GET', KEYS[1])
if ARGV[3] == 'renew' then
  if cur == false or cur == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
  end
  return 0
end
if cur == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// No command may take longer than this, reconnection included: a Redis that
/// went away must surface as a (transient) error, never as a hang.
const COMMAND_DEADLINE: Duration = Duration::from_secs(6);

async fn deadline<T>(fut: impl Future<Output = RedisResult<T>>) -> Result<T, StatusStoreError> {
    match tokio::time::timeout(COMMAND_DEADLINE, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(StatusStoreError::Timeout(COMMAND_DEADLINE)),
    }
}

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
    /// One multiplexed connection, made on first use and dropped after a
    /// transient error so that the next command makes a fresh one. (redis'
    /// `ConnectionManager` was seen to time out for 90 s after a Redis
    /// restart; this does not.)
    conn: Arc<Mutex<Option<MultiplexedConnection>>>,
    names: Names,
    ttl: Duration,
    script: redis::Script,
    lease_script: redis::Script,
    enqueue_script: redis::Script,
}

impl StatusStore {
    /// Connects (to check the URL and that Redis answers); commands time out
    /// and the connection is re-made when Redis comes back.
    pub async fn connect(url: &str, names: Names, ttl: Duration) -> Result<Self, StatusStoreError> {
        let store = StatusStore {
            client: redis::Client::open(url)?,
            conn: Arc::new(Mutex::new(None)),
            names,
            ttl,
            script: redis::Script::new(COMPARE_AND_SET),
            lease_script: redis::Script::new(LEASE),
            enqueue_script: redis::Script::new(queue_order::ENQUEUE),
        };
        store.connection().await?;
        Ok(store)
    }

    async fn connection(&self) -> Result<MultiplexedConnection, StatusStoreError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(5));
        let conn = deadline(self.client.get_multiplexed_async_connection_with_config(&config)).await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Runs one command with a deadline; a transient failure drops the
    /// connection. A command that failed because the connection was already
    /// gone (Redis restarted since the last command: it was never sent) is
    /// tried once more on a new connection, so the first request after a
    /// restart does not fail.
    pub(crate) async fn run<T, Fut>(&self, op: impl Fn(MultiplexedConnection) -> Fut) -> Result<T, StatusStoreError>
    where
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            let conn = self.connection().await?;
            let result = deadline(op(conn)).await;
            if result.as_ref().is_err_and(StatusStoreError::is_transient) {
                *self.conn.lock().await = None;
                if tries == 1 && result.as_ref().is_err_and(StatusStoreError::was_not_sent) {
                    continue;
                }
            }
            return result;
        }
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// How long a status record lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn ttl_secs(&self) -> u64 {
        self.ttl.as_secs().max(1)
    }

    pub async fn ping(&self) -> Result<(), StatusStoreError> {
        let _: String = self
            .run(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn get_raw(&self, id: Uuid) -> Result<Option<String>, StatusStoreError> {
        let key = self.names.status_key(id);
        self.run(|mut c| {
            let key = key.clone();
            async move { c.get(key).await }
        })
        .await
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
        self.compare_and_set(status.id, String::new(), json).await
    }

    /// Writes `new` if the record is still `expected` ("" = missing).
    async fn compare_and_set(&self, id: Uuid, expected: String, new: String) -> Result<bool, StatusStoreError> {
        let (script, key, ttl) = (self.script.clone(), self.names.status_key(id), self.ttl_secs());
        self.run(|mut c| {
            let (script, key, expected, new) = (script.clone(), key.clone(), expected.clone(), new.clone());
            async move {
                script
                    .key(key)
                    .arg(expected)
                    .arg(new)
                    .arg(ttl)
                    .invoke_async(&mut c)
                    .await
            }
        })
        .await
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
            if self.compare_and_set(id, raw.unwrap_or_default(), json).await? {
                // A job that leaves `queued` leaves the line (see `queue_order`;
                // the sweep catches what a failure here leaves behind).
                let was_queued = current.as_ref().is_some_and(|s| s.state == JobState::Queued);
                if was_queued && new.state != JobState::Queued {
                    if let Err(e) = self.dequeue_order(id).await {
                        tracing::warn!(%id, error = %e, "could not take the job out of the queue order");
                    }
                }
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
        let channel = self.names.events_channel(event.job_id);
        let _: i64 = self
            .run(|mut c| {
                let (channel, json) = (channel.clone(), json.clone());
                async move { c.publish(channel, json).await }
            })
            .await?;
        Ok(())
    }

    /// Raises the cancel flag that the worker running the job polls.
    pub async fn request_cancel(&self, id: Uuid) -> Result<(), StatusStoreError> {
        let (key, ttl) = (self.names.cancel_key(id), self.ttl_secs());
        let _: () = self
            .run(|mut c| {
                let key = key.clone();
                async move { c.set_ex(key, 1, ttl).await }
            })
            .await?;
        Ok(())
    }

    pub async fn cancel_requested(&self, id: Uuid) -> Result<bool, StatusStoreError> {
        let key = self.names.cancel_key(id);
        self.run(|mut c| {
            let key = key.clone();
            async move { c.exists(key).await }
        })
        .await
    }

    /// Binds an `Idempotency-Key` to `id` unless it is already bound; returns
    /// the job it was bound to before, if any.
    pub async fn claim_idempotency_key(&self, key: &str, id: Uuid) -> Result<Option<Uuid>, StatusStoreError> {
        let redis_key = self.names.idempotency_key(key);
        let mut set_nx = redis::cmd("SET");
        set_nx
            .arg(&redis_key)
            .arg(id.to_string())
            .arg("NX")
            .arg("EX")
            .arg(self.ttl_secs());
        let set: bool = self
            .run(|mut c| {
                let cmd = set_nx.clone();
                async move { cmd.query_async::<Option<String>>(&mut c).await }
            })
            .await?
            .is_some();
        if set {
            return Ok(None);
        }
        let existing: Option<String> = self
            .run(|mut c| {
                let key = redis_key.clone();
                async move { c.get(key).await }
            })
            .await?;
        Ok(existing.and_then(|s| s.parse().ok()))
    }

    /// Takes the job's lease for `holder` for `ttl`, unless another holder
    /// has it: then returns that holder. A worker runs a job only while it
    /// holds its lease, so that two deliveries of one message (a duplicate,
    /// or a redelivery while the first worker still runs it) never run at
    /// once; the lease of a worker that died expires after `ttl`.
    pub async fn acquire_lease(
        &self,
        id: Uuid,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StatusStoreError> {
        let key = self.names.lease_key(id);
        let mut set_nx = redis::cmd("SET");
        set_nx
            .arg(&key)
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        let set: Option<String> = self
            .run(|mut c| {
                let cmd = set_nx.clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        if set.is_some() {
            return Ok(None);
        }
        let current: Option<String> = self
            .run(|mut c| {
                let key = key.clone();
                async move { c.get(key).await }
            })
            .await?;
        match current {
            // Ours already (a retry after a lost reply) or expired meanwhile: try again once.
            Some(other) if other != holder => Ok(Some(other)),
            _ => {
                let renewed = self.renew_lease(id, holder, ttl).await?;
                Ok((!renewed).then(|| "another worker".to_string()))
            }
        }
    }

    /// Extends the lease if `holder` still has it (or takes it if it is
    /// free); false when another holder has it.
    pub async fn renew_lease(&self, id: Uuid, holder: &str, ttl: Duration) -> Result<bool, StatusStoreError> {
        let key = self.names.lease_key(id);
        let (h, ms) = (holder.to_string(), ttl.as_millis().max(1) as u64);
        let script = self.lease_script.clone();
        let renewed: i64 = self
            .run(|mut c| {
                let (script, key, h) = (script.clone(), key.clone(), h.clone());
                async move { script.key(key).arg(h).arg(ms).arg("renew").invoke_async(&mut c).await }
            })
            .await?;
        Ok(renewed == 1)
    }

    /// Gives the lease up if `holder` has it.
    pub async fn release_lease(&self, id: Uuid, holder: &str) -> Result<(), StatusStoreError> {
        let key = self.names.lease_key(id);
        let h = holder.to_string();
        let script = self.lease_script.clone();
        let _: i64 = self
            .run(|mut c| {
                let (script, key, h) = (script.clone(), key.clone(), h.clone());
                async move { script.key(key).arg(h).arg(0).arg("release").invoke_async(&mut c).await }
            })
            .await?;
        Ok(())
    }

    /// Releases a key claimed by a submit that then failed.
    pub async fn release_idempotency_key(&self, key: &str) -> Result<(), StatusStoreError> {
        let key = self.names.idempotency_key(key);
        let _: i64 = self
            .run(|mut c| {
                let key = key.clone();
                async move { c.del(key).await }
            })
            .await?;
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
