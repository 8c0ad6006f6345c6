//! The HTTP API (`dispatcher serve`).

pub mod error;
pub mod images;
pub mod limits;
pub mod page;
pub mod server;
