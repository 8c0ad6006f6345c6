//! The worker: the SDXL pipeline in candle and the job service around it.

pub mod engine;
pub mod imaging;
pub mod ranks;
pub mod sdxl;
pub mod service;
