//! The worker: the rank threads that run the `sdxl` pipeline on every device
//! of the node, and the job service around them.
//!
//! - [`engine`]: the boundary between the two (`Engine`, `EngineJob`);
//! - [`ranks`]: one thread per device, the collectives, rank 0's grid;
//! - [`service`]: RabbitMQ in, S3 and Redis out; never touches a tensor;
//! - [`imaging`]: grids and previews as pictures.

pub mod engine;
pub mod imaging;
pub mod ranks;
pub mod service;
