//! What every job of this worker shares: the engine, the stores, the
//! configuration, the LoRA cache, and the channel of this RabbitMQ session
//! that webhook events go out on.

use std::sync::Arc;

use common::result_store::ResultStore;
use common::rules::WebhookEvent;
use common::status::JobStatus;
use common::status_store::StatusStore;
use common::webhook;
use lapin::Channel;

use super::config::WorkerConfig;
use super::error::JobError;
use super::inputs::LoraCache;
use super::retry::{retry, Backoff};
use crate::engine::Engine;

/// Everything a job needs, shared by all jobs of this worker.
pub struct JobContext {
    pub engine: Arc<dyn Engine>,
    pub status: StatusStore,
    pub results: ResultStore,
    pub config: WorkerConfig,
    pub worker_name: String,
    pub loras: LoraCache,
    /// The channel (confirm mode) of this RabbitMQ session that webhook
    /// events are published on; set by each session.
    pub webhooks: std::sync::Mutex<Option<Channel>>,
}

impl JobContext {
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.config.retry_for)
    }

    /// Announces the webhook event of `record`'s state (if its webhook wants
    /// it), before the delivery is settled: a failure requeues the job, whose
    /// next run announces it again.
    pub async fn announce(&self, record: &JobStatus) -> Result<(), JobError> {
        let channel = self.webhooks.lock().ok().and_then(|c| c.clone());
        let needed = WebhookEvent::of_state(record.state).is_some_and(|e| record.request.webhook_for(e).is_some());
        if !needed {
            return Ok(());
        }
        let channel = channel
            .ok_or_else(|| JobError::Transient("no RabbitMQ channel to announce the webhook event on".into()))?;
        retry(self.backoff(), "announcing the webhook event", || {
            webhook::announce(&channel, &self.status, record)
        })
        .await
        .map_err(|e| JobError::Transient(e.to_string()))?;
        Ok(())
    }
}
