//! `GET /v1/webhook-secret` and `POST /v1/webhook-secret/rotate`: the calling
//! key's webhook signing secret (made on first use), and its replacement.
//! The replaced secret still signs deliveries for a day, beside the new one.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::auth::Caller;

/// A webhook signing secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookSecret {
    /// `whsec_` and the base64 of the key bytes (Standard Webhooks' form):
    /// check `webhook-signature` with it.
    pub secret: String,
    /// Replaced secrets keep signing, beside the current one, for this many seconds.
    pub previous_valid_for_secs: u64,
}

fn answer(secret: String) -> Json<WebhookSecret> {
    Json(WebhookSecret {
        secret,
        previous_valid_for_secs: common::status_store::PREVIOUS_SECRET_TTL.as_secs(),
    })
}

/// The calling key's webhook signing secret (made now if it has none).
#[utoipa::path(
    get,
    path = "/v1/webhook-secret",
    tag = "webhooks",
    responses(
        (status = 200, description = "The secret that signs this key's webhooks", body = WebhookSecret),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 503, description = "Redis is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn get_secret(State(state): State<AppState>, caller: Caller) -> Result<Json<WebhookSecret>, ApiError> {
    Ok(answer(state.jobs.webhook_secret(&caller.name).await?))
}

/// A new secret for the calling key; the old one signs too for a day.
#[utoipa::path(
    post,
    path = "/v1/webhook-secret/rotate",
    tag = "webhooks",
    responses(
        (status = 200, description = "The new secret", body = WebhookSecret),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 503, description = "Redis is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn rotate_secret(State(state): State<AppState>, caller: Caller) -> Result<Json<WebhookSecret>, ApiError> {
    Ok(answer(state.jobs.rotate_webhook_secret(&caller.name).await?))
}
