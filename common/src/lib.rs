//! What the dispatcher and the worker share: the job schema, its status, and the
//! names of the queues, Redis keys and channels both sides must agree on, plus
//! the thin clients of RabbitMQ ([`queue`]), Redis ([`status_store`], the job
//! index [`job_index`], the shared rate limit [`rate_limit`]) and S3
//! ([`result_store`]) that both sides use. No model code lives here.

pub mod config;
pub mod event;
pub mod job_index;
pub mod lora_record;
pub mod names;
pub mod queue;
pub mod rate_limit;
pub mod result_store;
pub mod rules;
pub mod status;
pub mod status_store;
pub mod webhook;

pub use event::{EventKind, JobEvent};
pub use names::Names;
pub use rules::{JobRequest, OutputFormat, ValidJob, ValidationError};
pub use status::{ImageRef, JobBatch, JobResult, JobState, JobStatus, Progress, Timings};
