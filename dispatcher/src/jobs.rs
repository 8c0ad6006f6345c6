//! What the HTTP API and the CLI both do with jobs: submit (validate, write
//! `queued`, publish with confirms), read the status, cancel, and follow the
//! events. One implementation, two front ends.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::event::{EventKind, JobEvent};
use common::job_index::JobIndex;
use common::queue::{JobMessage, QueueError};
use common::result_store::{ResultStore, ResultStoreError};
use common::rules::JobRequest;
use common::rules::{random_seed, validate_within, Caps, ValidationError};
use common::status::{JobState, JobStatus};
use common::status_store::{QueueCounts, StatusStore, StatusStoreError, Update};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::auth::Caller;
use crate::inputs::Inputs;
use crate::loras::{LoraRegistry, RegistryError, ResolveError};
use crate::publishing::Publishing;

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("job {0} not found")]
    NotFound(Uuid),
    #[error("`{0}` is not a job id (a UUID)")]
    NotAJobId(String),
    #[error("job {} is already {}", .0.id, .0.state)]
    AlreadyFinished(Box<JobStatus>),
    #[error("job {} has not succeeded (it is {})", .0.id, .0.state)]
    NoResult(Box<JobStatus>),
    #[error("status store: {0}")]
    Store(#[from] StatusStoreError),
    /// RabbitMQ did not confirm: the record of job `id` now says `failed`.
    #[error("job {id} could not be queued (its status says failed): {source}")]
    Publish {
        id: Uuid,
        #[source]
        source: QueueError,
    },
    #[error("this front end cannot submit (no RabbitMQ connection)")]
    NoPublisher,
    #[error("this front end has no object store for input images and LoRAs")]
    NoObjectStore,
    #[error("object store: {0}")]
    Objects(#[from] ResultStoreError),
    #[error("LoRA registry: {0}")]
    Registry(#[from] RegistryError),
}

impl From<ResolveError> for JobsError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::Invalid(e) => JobsError::Invalid(e),
            ResolveError::Registry(e) => JobsError::Registry(e),
        }
    }
}

/// Where a submitting front end keeps input images and finds LoRAs.
#[derive(Clone)]
pub struct Storage {
    pub results: Arc<ResultStore>,
    pub loras: LoraRegistry,
}

/// A submitted job: its `queued` record, and whether an earlier submit with
/// the same `Idempotency-Key` made it.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub status: JobStatus,
    pub replayed: bool,
}

/// What following a job yields: its status first, then its events.
#[derive(Debug, Clone)]
pub enum Followed {
    Status(Box<JobStatus>),
    Event(JobEvent),
    /// A queued job's place in line changed: this many jobs are ahead of it.
    Position(u64),
}

/// How often a follower re-reads a queued job's place in line.
const POSITION_POLL: Duration = Duration::from_millis(500);

pub type FollowStream = Pin<Box<dyn Stream<Item = Followed> + Send>>;

pub struct Jobs {
    status: StatusStore,
    /// Every submitted job, for `GET /v1/jobs`.
    index: JobIndex,
    publishing: Option<Arc<Publishing>>,
    caps: Caps,
    storage: Option<Storage>,
    /// Webhooks may point at private addresses, over plain http.
    webhook_allow_private: bool,
}

impl Jobs {
    /// For reading and cancelling only (`dispatcher status|watch|cancel`).
    pub fn new(status: StatusStore) -> Self {
        Jobs {
            index: JobIndex::new(status.clone()),
            status,
            publishing: None,
            caps: Caps::default(),
            storage: None,
            webhook_allow_private: false,
        }
    }

    /// For submitting too: connects to RabbitMQ and declares the topology.
    /// Requests are validated within `caps`; a publish RabbitMQ does not
    /// confirm within `confirm_timeout` fails the job.
    pub async fn with_publisher(
        status: StatusStore,
        amqp_url: &str,
        caps: Caps,
        confirm_timeout: Duration,
    ) -> Result<Self, QueueError> {
        let publishing = Publishing::open(amqp_url, status.names().clone(), confirm_timeout).await?;
        Ok(Jobs {
            index: JobIndex::new(status.clone()),
            status,
            publishing: Some(Arc::new(publishing)),
            caps,
            storage: None,
            webhook_allow_private: false,
        })
    }

    /// Whether webhooks may point at private addresses, over plain http
    /// (`SDXL_WEBHOOK_ALLOW_PRIVATE`).
    pub fn allowing_private_webhooks(mut self, allow: bool) -> Self {
        self.webhook_allow_private = allow;
        self
    }

    /// The key's webhook signing secret, made now if it has none.
    pub async fn webhook_secret(&self, owner: &str) -> Result<String, JobsError> {
        Ok(self.status.webhook_secret(owner).await?)
    }

    /// A new signing secret for the key.
    pub async fn rotate_webhook_secret(&self, owner: &str) -> Result<String, JobsError> {
        Ok(self.status.rotate_webhook_secret(owner).await?)
    }

    /// With `storage`: jobs may carry input images and name LoRAs.
    pub fn with_storage(mut self, storage: Storage) -> Self {
        self.storage = Some(storage);
        self
    }

    pub fn storage(&self) -> Option<&Storage> {
        self.storage.as_ref()
    }

    /// The index of submitted jobs (`GET /v1/jobs`).
    pub fn index(&self) -> &JobIndex {
        &self.index
    }

    /// The caps requests are validated within.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// Whether RabbitMQ and Redis are reachable now.
    pub async fn health(&self) -> (bool, bool) {
        let rabbit = match &self.publishing {
            None => false,
            Some(p) => p.is_healthy().await,
        };
        let redis = self.status.ping().await.is_ok();
        (rabbit, redis)
    }

    /// Validates, writes `queued`, publishes with confirms. If RabbitMQ does
    /// not confirm, the record says `failed` and the caller gets the error.
    /// `owner` is the API key name the job belongs to (`None`: anyone's);
    /// an `Idempotency-Key` is the owner's own, never matched across owners.
    pub async fn submit(
        &self,
        request: &JobRequest,
        idempotency_key: Option<&str>,
        owner: Option<&str>,
    ) -> Result<Submitted, JobsError> {
        let id = Uuid::new_v4();
        // Inputs are decoded first (a bad image is the first thing to hear
        // about) and replaced by their keys under the job's prefix.
        let mut request = request.clone();
        let inputs = Inputs::take(&mut request, id, self.caps.max_image_bytes)?;
        let mut job = validate_within(&request, &self.caps, random_seed)?;
        if let Some(url) = &job.webhook_url {
            crate::webhooks::target::check(url, self.webhook_allow_private)
                .await
                .map_err(|reason| ValidationError::WebhookTarget {
                    value: url.clone(),
                    reason,
                })?;
        }
        if !inputs.is_empty() || !job.loras.is_empty() {
            let storage = self.storage.as_ref().ok_or(JobsError::NoObjectStore)?;
            storage.loras.resolve(&mut job.loras).await?;
        }
        let publishing = self.publishing.as_ref().ok_or(JobsError::NoPublisher)?;
        let idempotency_key = idempotency_key.map(|key| match owner {
            Some(owner) => format!("{owner}:{key}"),
            None => key.to_string(),
        });
        if let Some(key) = idempotency_key.as_deref() {
            if let Some(existing) = self.status.claim_idempotency_key(key, id).await? {
                let status = self.status.get(existing).await?.ok_or(JobsError::NotFound(existing))?;
                return Ok(Submitted { status, replayed: true });
            }
        }
        // Stored before the record exists and the message is published: a
        // worker that takes the job finds its inputs.
        if let Some(storage) = self.storage.as_ref().filter(|_| !inputs.is_empty()) {
            if let Err(e) = inputs.store(&storage.results).await {
                if let Some(key) = idempotency_key.as_deref() {
                    let _ = self.status.release_idempotency_key(key).await;
                }
                return Err(e.into());
            }
        }
        let mut status = JobStatus::queued(id, job.clone(), Utc::now());
        status.owner = owner.map(str::to_string);
        let created = self.status.create(&status).await;
        if !matches!(created, Ok(true)) {
            if let Some(key) = idempotency_key.as_deref() {
                let _ = self.status.release_idempotency_key(key).await;
            }
            created?;
        }
        // In line before it is published, so that no worker starts it first
        // (a failure leaves the job without a position, nothing worse).
        if let Err(e) = self.status.enqueue_order(id, job.priority).await {
            tracing::warn!(%id, error = %e, "could not put the job in the queue order");
        }
        // Listed before it is published, so that it is in the list from when
        // it is queued. A job that could not be listed still runs: the list
        // is a convenience, the record and the message are the job.
        if let Err(e) = self.index.add(&status).await {
            tracing::warn!(%id, error = %e, "could not add the job to the job index");
        }
        let message = JobMessage {
            id,
            created_at: status.created_at,
            request: job,
            owner: status.owner.clone(),
        };
        let published = publishing.publish(&message).await;
        if let Err(e) = published {
            tracing::error!(%id, error = %e, "publish not confirmed: marking the job failed");
            let reason = format!("the job could not be queued: {e}");
            let marked = self
                .status
                .update(id, |cur| {
                    let mut next = cur.filter(|s| s.state == JobState::Queued)?.clone();
                    next.state = JobState::Failed;
                    next.error = Some(reason.clone());
                    next.finished_at = Some(Utc::now());
                    Some(next)
                })
                .await;
            // Every terminal state has its terminal event, this one too.
            if let Ok(Update::Written(failed)) = marked {
                let _ = self
                    .status
                    .publish_event(&terminal_of(&failed, EventKind::Failed))
                    .await;
                // In the background: the broker that did not confirm may
                // not answer this either, and the client waits for its 503.
                let (publishing, store) = (publishing.clone(), self.status.clone());
                tokio::spawn(async move { publishing.announce(&store, &failed).await });
            }
            return Err(JobsError::Publish { id, source: e });
        }
        tracing::info!(%id, priority = status.request.priority, "job queued");
        status.queue_position = self.status.queue_position(id).await.ok().flatten();
        Ok(Submitted {
            status,
            replayed: false,
        })
    }

    /// The record, with its place in line while it is queued.
    pub async fn status(&self, id: Uuid) -> Result<JobStatus, JobsError> {
        let mut status = self.status.get(id).await?.ok_or(JobsError::NotFound(id))?;
        if status.state == JobState::Queued {
            status.queue_position = self.status.queue_position(id).await?;
        }
        Ok(status)
    }

    /// How many jobs wait, per priority.
    pub async fn queue_counts(&self) -> Result<QueueCounts, JobsError> {
        Ok(self.status.queue_counts().await?)
    }

    /// Drops queue-order entries of jobs that are no longer queued, every
    /// `every` (what a process that died between two writes left behind).
    pub fn spawn_order_sweep(&self, every: Duration) {
        let store = self.status.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match store.sweep_order().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(stale = n, "dropped queue-order entries of jobs no longer queued"),
                    Err(e) => tracing::debug!(error = %e, "cannot sweep the queue order now"),
                }
            }
        });
    }

    /// The status, if `caller` may see the job; another key's job is "not
    /// found", exactly as a job that does not exist, so ids cannot be probed.
    pub async fn visible_status(&self, id: Uuid, caller: &Caller) -> Result<JobStatus, JobsError> {
        let status = self.status(id).await?;
        if caller.may_see(status.owner.as_deref()) {
            Ok(status)
        } else {
            Err(JobsError::NotFound(id))
        }
    }

    /// Cancels a job: a queued one is `cancelled` at once (the worker that
    /// takes it will skip it); a running one is flagged and the worker stops
    /// it between two steps. Returns the record after the request.
    pub async fn cancel(&self, id: Uuid, caller: &Caller) -> Result<JobStatus, JobsError> {
        let current = self.visible_status(id, caller).await?;
        if current.state.is_terminal() {
            return Err(JobsError::AlreadyFinished(Box::new(current)));
        }
        self.status.request_cancel(id).await?;
        let update = self
            .status
            .update(id, |cur| {
                let mut next = cur.filter(|s| s.state == JobState::Queued)?.clone();
                next.state = JobState::Cancelled;
                next.finished_at = Some(Utc::now());
                Some(next)
            })
            .await?;
        match update {
            Update::Written(status) => {
                let event = JobEvent {
                    kind: EventKind::Cancelled,
                    job_id: id,
                    step: status.progress.step,
                    total_steps: status.progress.total_steps,
                    image: None,
                    error: None,
                };
                self.status.publish_event(&event).await?;
                if let Some(publishing) = &self.publishing {
                    publishing.announce(&self.status, &status).await;
                }
                Ok(status)
            }
            Update::Unchanged(status) => status.ok_or(JobsError::NotFound(id)),
        }
    }

    /// Waits at most `timeout` for the job to end: its final record, or
    /// `None` while it has not ended. It follows the job's events (and the
    /// record every 2 s, see [`Jobs::follow`]) rather than polling.
    pub async fn wait_finished(
        &self,
        id: Uuid,
        caller: &Caller,
        timeout: Duration,
    ) -> Result<Option<JobStatus>, JobsError> {
        let mut followed = self.follow(id, caller).await?;
        let ended = tokio::time::timeout(timeout, async {
            while let Some(f) = followed.next().await {
                if matches!(&f, Followed::Event(e) if e.kind.is_terminal()) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !ended {
            return Ok(None);
        }
        // The worker writes the terminal record before it publishes the
        // terminal event: the record read now is the final one.
        let status = self.status(id).await?;
        Ok(status.state.is_terminal().then_some(status))
    }

    /// The status, then every event until the terminal one (which ends the
    /// stream). A terminal state seen in the record ends it too, so a missed
    /// event cannot make a follower wait forever.
    pub async fn follow(&self, id: Uuid, caller: &Caller) -> Result<FollowStream, JobsError> {
        // Subscribe before reading, so that nothing falls in between.
        let mut events = Box::pin(self.status.subscribe(id).await?);
        let status = self.visible_status(id, caller).await?;
        let store = self.status.clone();
        let (tx, mut rx) = mpsc::channel::<Followed>(64);
        tokio::spawn(async move {
            if tx.send(Followed::Status(Box::new(status.clone()))).await.is_err() {
                return;
            }
            if let Some(kind) = EventKind::terminal_for(status.state) {
                let _ = tx.send(Followed::Event(terminal_of(&status, kind))).await;
                return;
            }
            // While queued, the place in line: sent first, then on each change.
            let mut position = status.queue_position;
            if let Some(p) = position {
                if tx.send(Followed::Position(p)).await.is_err() {
                    return;
                }
            }
            let mut in_line = status.state == JobState::Queued;
            let mut reposition = tokio::time::interval(POSITION_POLL);
            reposition.tick().await;
            let mut recheck = tokio::time::interval(Duration::from_secs(2));
            recheck.tick().await;
            // If the subscription drops (Redis restarted), the status is still
            // polled, so the stream ends with the job all the same.
            let mut subscribed = true;
            loop {
                tokio::select! {
                    event = events.next(), if subscribed => {
                        let Some(event) = event else {
                            tracing::warn!(%id, "event subscription lost: following the status only");
                            subscribed = false;
                            continue;
                        };
                        let terminal = event.kind.is_terminal();
                        if tx.send(Followed::Event(event)).await.is_err() || terminal {
                            return;
                        }
                    }
                    _ = reposition.tick(), if in_line => {
                        match store.queue_position(id).await {
                            Ok(Some(p)) if position != Some(p) => {
                                position = Some(p);
                                if tx.send(Followed::Position(p)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(Some(_)) | Err(_) => {}
                            // Out of line: it started (or ended); the events say which.
                            Ok(None) => in_line = false,
                        }
                    }
                    _ = recheck.tick() => {
                        if tx.is_closed() {
                            return;
                        }
                        if let Ok(Some(status)) = store.get(id).await {
                            if let Some(kind) = EventKind::terminal_for(status.state) {
                                let _ = tx.send(Followed::Event(terminal_of(&status, kind))).await;
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))))
    }
}

fn terminal_of(status: &JobStatus, kind: EventKind) -> JobEvent {
    JobEvent {
        kind,
        job_id: status.id,
        step: status.progress.step,
        total_steps: status.progress.total_steps,
        image: None,
        error: status.error.clone(),
    }
}
