//! The status record of a job, as stored in Redis (`sdxl:job:{id}`) and
//! returned by `GET /v1/jobs/{id}` and `dispatcher status`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::rules::{Scheduler, ValidJob, WebhookEvent};

/// Where a job is in its life. `queued → running → succeeded | failed |
/// cancelled`; `queued → cancelled | failed` too; `running → running` on a
/// redelivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// No worker will touch a job in a terminal state again.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job state `{0}`")]
pub struct UnknownState(pub String);

impl std::str::FromStr for JobState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            other => return Err(UnknownState(other.to_string())),
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    pub step: u32,
    pub total_steps: u32,
}

/// One stored object: the grid or one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageRef {
    pub bucket: String,
    pub key: String,
    /// Presigned GET URL, valid for the dispatcher's/worker's presign TTL;
    /// `GET /v1/jobs/{id}/result` gives a fresh one for the grid.
    pub url: String,
    pub width: u32,
    pub height: u32,
    /// For an image: its seed. For the grid: the seed of its first image.
    pub seed: u64,
}

/// How long each stage took, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    /// From `created_at` to the worker taking the job (last attempt).
    pub queue_wait_ms: u64,
    /// The whole model call: text encode + denoise + decode + grid.
    pub model_ms: u64,
    pub text_encode_ms: u64,
    /// img2img and inpainting: the VAE encoding the input image.
    #[serde(default)]
    pub image_encode_ms: u64,
    /// The whole denoising loop, previews included.
    pub denoise_ms: u64,
    /// Of `denoise_ms`: making and handing over previews.
    #[serde(default)]
    pub preview_ms: u64,
    pub decode_ms: u64,
    /// Encoding and uploading the grid and the images.
    pub upload_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobResult {
    pub grid: ImageRef,
    pub images: Vec<ImageRef>,
    pub timings: Timings,
    /// The sampler that made the images (manifests written before there was
    /// a choice say nothing: euler).
    #[serde(default)]
    pub scheduler: Scheduler,
    /// The batch the job ran in, when its images shared one denoising loop
    /// with other jobs' (absent for a job run alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<JobBatch>,
}

/// Jobs whose images one worker denoised together (same size, steps,
/// sampler, guidance on or off, start and LoRAs; each image the one its job
/// makes alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobBatch {
    /// The same for every job of the batch.
    pub id: Uuid,
    /// How many jobs shared the loop, this one included.
    pub jobs: u32,
    /// How many images the loop made, every job's on every rank.
    pub images: u32,
}

/// The status record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobStatus {
    pub id: Uuid,
    pub state: JobState,
    pub request: ValidJob,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// The worker that runs or ran it (host name and process id).
    #[serde(default)]
    pub worker: Option<String>,
    /// How many times a worker started it (1 on the first delivery).
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub progress: Progress,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub result: Option<JobResult>,
    /// The name of the API key that submitted it (absent on an open server
    /// and from the CLI): only that key, or an admin key, can see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// A queued job only: how many jobs are ahead of it in the queue
    /// (priority, then submit order); 0 is next. Read when the record is
    /// served, never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Per event of the job's webhook: its deliveries so far.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub webhooks: BTreeMap<WebhookEvent, WebhookDelivery>,
}

impl JobStatus {
    /// A new `queued` record.
    pub fn queued(id: Uuid, request: ValidJob, now: DateTime<Utc>) -> Self {
        let total_steps = request.num_inference_steps;
        JobStatus {
            id,
            state: JobState::Queued,
            request,
            created_at: now,
            started_at: None,
            finished_at: None,
            worker: None,
            attempt: 0,
            progress: Progress { step: 0, total_steps },
            error: None,
            result: None,
            owner: None,
            queue_position: None,
            webhooks: BTreeMap::new(),
        }
    }
}

/// Where one event's deliveries stand, on the job's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// On the queue, not tried yet.
    Queued,
    /// Tried and refused (or timed out); waiting for the next attempt.
    Retrying,
    /// A 2xx answer.
    Delivered,
    /// Every attempt failed: parked in `{queue}.webhooks.dead`.
    Dead,
}

/// The deliveries of one event of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WebhookDelivery {
    pub webhook_id: String,
    pub state: DeliveryState,
    pub attempts: u32,
    /// The HTTP status of the last answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    /// Why the last attempt failed, when there was no answer or not a 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
}

impl WebhookDelivery {
    pub fn queued(webhook_id: &str) -> Self {
        WebhookDelivery {
            webhook_id: webhook_id.to_string(),
            state: DeliveryState::Queued,
            attempts: 0,
            last_status: None,
            last_error: None,
            last_attempt_at: None,
            next_attempt_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_display_and_from_str_agree_with_serde() {
        for s in [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(s.to_string().parse::<JobState>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.to_string());
        }
        assert!("done".parse::<JobState>().is_err());
        assert!(JobState::Cancelled.is_terminal() && !JobState::Running.is_terminal());
    }
}
