//! Errors in the worker service, and what they decide about redelivery (as
//! apalis' `AbortError` / `RetryAfterError`): a poison job is rejected to the
//! dead-letter queue and marked `failed`; a transient failure is retried and
//! then nacked for redelivery; nothing else is lost.

use common::queue::QueueError;
use common::result_store::ResultStoreError;
use common::status_store::StatusStoreError;

/// Why one job did not finish.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job can never succeed as published: reject it (dead-letter) and mark it failed.
    #[error("poison job: {0}")]
    Poison(String),
    /// A service is unreachable and stayed so for the whole retry window:
    /// nack it, RabbitMQ gives it to a worker again.
    #[error("transient failure: {0}")]
    Transient(String),
}

impl From<StatusStoreError> for JobError {
    fn from(e: StatusStoreError) -> Self {
        if e.is_transient() {
            JobError::Transient(e.to_string())
        } else {
            JobError::Poison(e.to_string())
        }
    }
}

impl From<ResultStoreError> for JobError {
    fn from(e: ResultStoreError) -> Self {
        // A 4xx from S3 (signature, permissions) will not fix itself, but it is
        // not the job's fault either: hand it back rather than lose it.
        JobError::Transient(e.to_string())
    }
}

/// Why the service itself stopped (the process exits non-zero).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Status(#[from] StatusStoreError),
    #[error(transparent)]
    Results(#[from] ResultStoreError),
    #[error("the LoRA cache directory cannot be used: {0}")]
    LoraCache(String),
    #[error("warm-up generation failed: {0}")]
    Warmup(String),
    #[error("the consumer stream ended: RabbitMQ closed the channel")]
    ConsumerClosed,
}

impl From<lapin::Error> for ServiceError {
    fn from(e: lapin::Error) -> Self {
        ServiceError::Queue(QueueError::Amqp(e))
    }
}
