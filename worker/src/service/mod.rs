//! The job service around the engine: takes jobs off RabbitMQ, runs them on
//! an [`Engine`](crate::engine::Engine), stores results in S3 and status and
//! events in Redis. Only this module talks to the network; the engine never
//! does, and this module never sees a tensor.
//!
//! - [`config`]: `worker run`'s flags (clap with `env`);
//! - [`consumer`]: the consume loop (prefetch = the batch capacity, manual
//!   acks, graceful shutdown);
//! - [`batch`]: which held deliveries run together;
//! - [`job`]: one job from delivery to ack/reject/nack, in phases around
//!   the engine call its batch shares;
//! - [`context`], [`lease`], [`finish`]: what jobs share, a job's lease,
//!   its terminal status and events;
//! - [`generation`]: the engine call itself (blocking thread, each job's
//!   cancel and deadline);
//! - [`inputs`]: a job's input images and LoRAs (the on-disk LoRA cache);
//! - [`events`]: engine events to the Redis channel and the status record;
//! - [`results`]: encoding and storing the grid, the images and the manifest;
//! - [`retry`]: backoff for transient failures;
//! - [`error`]: what decides redelivery;
//! - [`shutdown`]: SIGTERM and Ctrl-C.

pub mod batch;
pub mod config;
pub mod consumer;
pub mod context;
pub mod error;
pub mod events;
pub mod finish;
pub mod generation;
pub mod inputs;
pub mod job;
pub mod lease;
pub mod results;
pub mod retry;
pub mod shutdown;

pub use config::WorkerConfig;
pub use consumer::run;
pub use error::{JobError, ServiceError};
