//! A job's end: the terminal status written (compare-and-set, once), then
//! the terminal event published, then the webhook event announced; all of
//! it before the delivery is settled.

use chrono::Utc;
use common::event::{EventKind, JobEvent};
use common::status::{JobResult, JobState, JobStatus};
use common::status_store::Update;
use uuid::Uuid;

use super::context::JobContext;
use super::error::JobError;
use super::retry::retry;

fn terminal_event(id: Uuid, kind: EventKind, status: &JobStatus) -> JobEvent {
    JobEvent {
        kind,
        job_id: id,
        step: status.progress.step,
        total_steps: status.progress.total_steps,
        image: None,
        error: status.error.clone(),
    }
}

/// Writes a terminal state (unless the record is terminal already), then
/// publishes the terminal event. `base` is the record to finish when Redis
/// has lost it (restarted without persistence, or expired).
async fn finish(
    ctx: &JobContext,
    id: Uuid,
    kind: EventKind,
    base: Option<&JobStatus>,
    change: impl Fn(&mut JobStatus) + Copy,
) -> Result<(), JobError> {
    let backoff = ctx.backoff();
    let update = retry(backoff, "writing the final status", || {
        ctx.status.update(id, |current| {
            let mut next = match current {
                Some(s) if s.state.is_terminal() => return None,
                Some(s) => s.clone(),
                None => base?.clone(),
            };
            next.finished_at = Some(Utc::now());
            change(&mut next);
            Some(next)
        })
    })
    .await?;
    match update {
        Update::Written(status) => {
            tracing::info!(state = %status.state, "job finished");
            let event = terminal_event(id, kind, &status);
            retry(backoff, "publishing the final event", || {
                ctx.status.publish_event(&event)
            })
            .await?;
            ctx.announce(&status).await
        }
        // Finished before: its end may still need announcing.
        Update::Unchanged(Some(status)) => ctx.announce(&status).await,
        Update::Unchanged(None) => Ok(()),
    }
}

pub async fn finish_succeeded(ctx: &JobContext, id: Uuid, base: &JobStatus, result: JobResult) -> Result<(), JobError> {
    let result = &result;
    finish(ctx, id, EventKind::Succeeded, Some(base), move |s| {
        s.state = JobState::Succeeded;
        s.progress.step = s.progress.total_steps;
        s.result = Some(result.clone());
    })
    .await
}

pub async fn finish_cancelled(ctx: &JobContext, id: Uuid, base: &JobStatus) -> Result<(), JobError> {
    finish(ctx, id, EventKind::Cancelled, Some(base), |s| {
        s.state = JobState::Cancelled
    })
    .await
}

pub async fn mark_failed(ctx: &JobContext, id: Uuid, reason: &str) -> Result<(), JobError> {
    finish(ctx, id, EventKind::Failed, None, |s| {
        s.state = JobState::Failed;
        s.error = Some(reason.to_string());
    })
    .await
}
