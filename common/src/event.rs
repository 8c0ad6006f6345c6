//! The events of a job, published as JSON on the Redis channel
//! `sdxl:job:{id}:events` and relayed as SSE by the dispatcher.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::status::JobState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Progress,
    Preview,
    Succeeded,
    Failed,
    Cancelled,
}

impl EventKind {
    /// A terminal event is the last one of a job.
    pub fn is_terminal(self) -> bool {
        matches!(self, EventKind::Succeeded | EventKind::Failed | EventKind::Cancelled)
    }

    /// The terminal event that announces a terminal state.
    pub fn terminal_for(state: JobState) -> Option<EventKind> {
        match state {
            JobState::Succeeded => Some(EventKind::Succeeded),
            JobState::Failed => Some(EventKind::Failed),
            JobState::Cancelled => Some(EventKind::Cancelled),
            JobState::Queued | JobState::Running => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Progress => "progress",
            EventKind::Preview => "preview",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
        }
    }
}

/// The `data:` prefix of preview images.
pub const PREVIEW_DATA_URI_PREFIX: &str = "data:image/jpeg;base64,";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobEvent {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub job_id: Uuid,
    pub step: u32,
    pub total_steps: u32,
    /// Previews only: `data:image/jpeg;base64,...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `failed` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The SSE stream's `queued` event: a queued job's place in line, sent
/// when the stream starts and whenever it changes (not published on Redis:
/// the dispatcher reads the queue order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QueuedEvent {
    /// Always `queued`.
    #[serde(rename = "type")]
    pub kind: String,
    pub job_id: Uuid,
    /// Jobs ahead of this one (priority, then submit order); 0 is next.
    pub queue_position: u64,
}

impl QueuedEvent {
    pub fn new(job_id: Uuid, queue_position: u64) -> Self {
        QueuedEvent {
            kind: "queued".into(),
            job_id,
            queue_position,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_uses_type() {
        let e = JobEvent {
            kind: EventKind::Preview,
            job_id: Uuid::nil(),
            step: 5,
            total_steps: 20,
            image: Some(format!("{PREVIEW_DATA_URI_PREFIX}AAAA")),
            error: None,
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "preview");
        assert_eq!(v["step"], 5);
        assert!(v.get("error").is_none());
        assert_eq!(serde_json::from_value::<JobEvent>(v).unwrap(), e);
        assert_eq!(EventKind::terminal_for(JobState::Failed), Some(EventKind::Failed));
        assert!(!EventKind::Progress.is_terminal());
    }
}
