//! `GET /v1/limits`: every request field's range and default, as validation
//! enforces them within this dispatcher's caps (the web page builds its form
//! from it; the OpenAPI document's request schema carries the same numbers).

use axum::extract::State;
use axum::Json;
use common::rules::RequestLimits;

use super::state::AppState;

/// Every request field's range and default, within this server's caps.
#[utoipa::path(
    get,
    path = "/v1/limits",
    tag = "limits",
    responses((status = 200, description = "The rules in force", body = RequestLimits))
)]
pub async fn limits(State(state): State<AppState>) -> Json<RequestLimits> {
    Json(RequestLimits::within(state.jobs.caps()))
}
