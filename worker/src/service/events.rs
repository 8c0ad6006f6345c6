//! The `PreviewSink`: carries engine events from the engine's thread to Redis.
//!
//! The engine calls a plain closure on its own thread; that closure only puts
//! the event on a bounded channel (blocking the engine briefly if Redis is
//! slow, which is the backpressure we want). A task on the async side
//! publishes each event on `{prefix}:job:{id}:events` and keeps the status
//! record's `progress` current. Events are best effort: a Redis hiccup loses
//! a progress event, never the job.

use base64::Engine as _;
use common::event::{EventKind, JobEvent, PREVIEW_DATA_URI_PREFIX};
use common::status::{JobState, Progress};
use common::status_store::StatusStore;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::engine::EngineEvent;

/// How many events may wait between the engine and Redis.
const EVENT_BUFFER: usize = 64;

pub struct PreviewSink {
    tx: mpsc::Sender<EngineEvent>,
    task: JoinHandle<()>,
}

impl PreviewSink {
    /// Starts forwarding events of job `id`.
    pub fn start(store: StatusStore, id: Uuid) -> Self {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let task = tokio::spawn(forward(store, id, rx));
        PreviewSink { tx, task }
    }

    /// The callback handed to the engine (called on its thread).
    pub fn callback(&self) -> impl FnMut(EngineEvent) + Send + 'static {
        let tx = self.tx.clone();
        move |event| {
            // Fails only when the forwarder is gone, i.e. the job is over.
            let _ = tx.blocking_send(event);
        }
    }

    /// Waits until every event sent so far is published.
    pub async fn finish(self) {
        drop(self.tx);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "event forwarder ended abnormally");
        }
    }
}

/// Turns an engine event into the wire event.
pub fn to_job_event(id: Uuid, event: EngineEvent) -> JobEvent {
    match event {
        EngineEvent::Progress { step, total_steps } => JobEvent {
            kind: EventKind::Progress,
            job_id: id,
            step: step as u32,
            total_steps: total_steps as u32,
            image: None,
            error: None,
        },
        EngineEvent::Preview {
            step,
            total_steps,
            jpeg,
        } => JobEvent {
            kind: EventKind::Preview,
            job_id: id,
            step: step as u32,
            total_steps: total_steps as u32,
            image: Some(format!(
                "{PREVIEW_DATA_URI_PREFIX}{}",
                base64::engine::general_purpose::STANDARD.encode(jpeg)
            )),
            error: None,
        },
    }
}

async fn forward(store: StatusStore, id: Uuid, mut rx: mpsc::Receiver<EngineEvent>) {
    while let Some(event) = rx.recv().await {
        let event = to_job_event(id, event);
        if event.kind == EventKind::Progress {
            let progress = Progress {
                step: event.step,
                total_steps: event.total_steps,
            };
            let update = store
                .update(id, |current| match current {
                    Some(s) if s.state == JobState::Running && s.progress.step < progress.step => {
                        let mut next = s.clone();
                        next.progress = progress;
                        Some(next)
                    }
                    _ => None,
                })
                .await;
            if let Err(e) = update {
                tracing::warn!(error = %e, step = event.step, "could not record progress");
            }
        }
        if let Err(e) = store.publish_event(&event).await {
            tracing::warn!(error = %e, kind = event.kind.as_str(), "could not publish event");
        }
    }
}
