//! `GET /v1/queue`: how many jobs wait, per priority, from the queue order
//! that `queue_position` is read from (see `common::status_store`'s
//! `queue_order`).

use axum::extract::State;
use axum::Json;
use common::names::MAX_PRIORITY;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::auth::Caller;

/// The jobs of one priority that wait.
#[derive(Debug, Serialize, ToSchema)]
pub struct PriorityDepth {
    pub priority: u8,
    pub queued: u64,
}

/// The queue's depth.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueDepth {
    /// Every queued job (of every key).
    pub queued: u64,
    /// Per priority, the highest (served first) first; every priority is listed.
    pub by_priority: Vec<PriorityDepth>,
}

/// How many jobs wait in the queue, per priority. A queued job's own place
/// is its status record's `queue_position`.
#[utoipa::path(
    get,
    path = "/v1/queue",
    tag = "jobs",
    responses(
        (status = 200, description = "Jobs waiting, per priority", body = QueueDepth),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 503, description = "Redis is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn queue(State(state): State<AppState>, _caller: Caller) -> Result<Json<QueueDepth>, ApiError> {
    let counts = state.jobs.queue_counts().await?;
    let by_priority = (0..=MAX_PRIORITY)
        .rev()
        .map(|priority| PriorityDepth {
            priority,
            queued: counts.by_priority.get(usize::from(priority)).copied().unwrap_or(0),
        })
        .collect();
    Ok(Json(QueueDepth {
        queued: counts.total(),
        by_priority,
    }))
}
