//! Webhooks (Standard Webhooks): where a job's status record is POSTed on
//! the events it subscribes to. [`target`] refuses addresses inside our own
//! network, [`signing`] signs each POST with the key's secret, and
//! [`deliver`] drains the durable queue that workers and this dispatcher
//! put the events on (`common::webhook`), retrying with backoff.

pub mod deliver;
pub mod signing;
pub mod target;

pub use deliver::DeliveryConfig;
