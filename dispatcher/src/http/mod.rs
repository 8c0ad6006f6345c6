//! The HTTP API (`dispatcher serve`).

pub mod error;
pub mod server;
