//! The job service around the engine: takes jobs off RabbitMQ, runs them on
//! an [`Engine`](crate::engine::Engine), stores results in S3 and status and
//! events in Redis. Only this module talks to the network; the engine never
//! does, and this module never sees a tensor.
//!
//! - [`config`]: `worker run`'s flags (clap with `env`);
//! - [`consumer`]: the consume loop (prefetch 1, manual acks, graceful shutdown);
//! - [`job`]: one job from delivery to ack/reject/nack;
//! - [`generation`]: the engine call itself (blocking thread, cancel, deadline);
//! - [`inputs`]: a job's input images and LoRAs (the on-disk LoRA cache);
//! - [`events`]: engine events to the Redis channel and the status record;
//! - [`results`]: encoding and storing the grid, the images and the manifest;
//! - [`retry`]: backoff for transient failures;
//! - [`error`]: what decides redelivery;
//! - [`shutdown`]: SIGTERM and Ctrl-C.

pub mod config;
pub mod consumer;
pub mod error;
pub mod events;
pub mod generation;
pub mod inputs;
pub mod job;
pub mod results;
pub mod retry;
pub mod shutdown;

pub use config::WorkerConfig;
pub use consumer::run;
pub use error::{JobError, ServiceError};
