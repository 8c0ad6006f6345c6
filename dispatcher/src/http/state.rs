//! What every handler shares: the job front end, the result store, the
//! metrics, the admission controls and the shutdown signal.

use std::sync::Arc;

use common::result_store::ResultStore;
use tokio::sync::{watch, Semaphore};

use crate::admission::{QueueCap, RateLimit};
use crate::auth::ApiKeys;
use crate::jobs::Jobs;
use crate::metrics::Metrics;

/// The largest request body accepted (a request is a few hundred bytes),
/// but for a submit that carries images and a LoRA upload ([`BodyLimits`]).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub jobs: Arc<Jobs>,
    pub results: Arc<ResultStore>,
    pub metrics: Metrics,
    /// Submits in flight; when none is left the answer is 429.
    pub submit_permits: Arc<Semaphore>,
    /// Becomes true on shutdown: event streams end then, so that the
    /// graceful shutdown does not wait for running jobs.
    pub stopping: watch::Receiver<bool>,
    pub keys: Arc<ApiKeys>,
    pub rate_limit: Arc<RateLimit>,
    pub queue_cap: QueueCap,
    /// `/metrics` on the API's listener (false: it has its own).
    pub metrics_here: bool,
    pub body_limits: BodyLimits,
}

/// The body limits of the routes that take more than [`MAX_BODY_BYTES`].
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// `POST /v1/jobs` with input images (one without is still held to
    /// [`MAX_BODY_BYTES`] by the handler).
    pub submit: usize,
    /// `PUT /v1/loras/{name}`.
    pub lora: usize,
}

impl BodyLimits {
    /// A submit with an image and a mask of `max_image_bytes` each, in base64.
    pub fn new(max_image_bytes: usize, max_lora_bytes: usize) -> Self {
        let base64 = |n: usize| n.div_ceil(3) * 4 + 64;
        BodyLimits {
            submit: MAX_BODY_BYTES + 2 * base64(max_image_bytes),
            lora: max_lora_bytes,
        }
    }
}
