//! Routes and handlers of the HTTP API, and `serve`, which runs them until
//! the shutdown future completes.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::result_store::ResultStore;
use common::rules::JobRequest;
use common::rules::ValidationError;
use common::status::JobState;
use futures_util::StreamExt;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use uuid::Uuid;

use super::error::ApiError;
use crate::admission::{QueueCap, RateLimit};
use crate::auth::{ApiKeys, Caller};
use crate::jobs::{Followed, Jobs, JobsError};
use crate::metrics::Metrics;

/// The largest request body accepted (a request is a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

const OPENAPI: &str = include_str!("../openapi.json");

/// Header that makes a retried submit return the same job.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

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
}

/// The API: `/v1/jobs*` need an API key (when keys are configured); the
/// page, `/v1/limits`, `/healthz`, `/openapi.json` and `/metrics` (unless
/// it has its own listener) are open.
pub fn router(state: AppState) -> Router {
    let jobs = Router::new()
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{id}", get(status).delete(cancel))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/jobs/{id}/result", get(result))
        .route("/v1/jobs/{id}/images", get(super::images::images))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let mut open = Router::new()
        .route("/v1/limits", get(super::limits::limits))
        .merge(super::page::routes())
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi));
    if state.metrics_here {
        open = open.route("/metrics", get(metrics));
    }
    jobs.merge(open)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Serves `/metrics` alone on `listener` (`--metrics-listen`).
pub async fn serve_metrics(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(metrics)).with_state(state);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Puts the [`Caller`] of the request's key in its extensions, or answers 401.
async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.keys.caller(header) {
        Some(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        None => {
            state.metrics.refused.with_label_values(&["unauthorized"]).inc();
            let mut response = (
                StatusCode::UNAUTHORIZED,
                Json(json!({
                    "error": "a valid API key is required: send `Authorization: Bearer <key>`"
                })),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// A refusal with a JSON body and, when given, `Retry-After` in whole seconds.
fn refuse(state: &AppState, code: StatusCode, reason: &str, message: String, retry_after: Option<u64>) -> Response {
    state.metrics.refused.with_label_values(&[reason]).inc();
    let mut response = (code, Json(json!({ "error": message }))).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .http_duration
        .with_label_values(&[route.as_str(), method.as_str()])
        .observe(start.elapsed().as_secs_f64());
    state
        .metrics
        .http_requests
        .with_label_values(&[route.as_str(), method.as_str(), response.status().as_str()])
        .inc();
    response
}

pub(super) fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse().map_err(|_| ApiError(JobsError::NotAJobId(id.to_string())))
}

fn invalid(state: &AppState, e: ValidationError) -> ApiError {
    let field = match e {
        ValidationError::UnknownField(_) => "unknown",
        ref other => other.field(),
    };
    state.metrics.validation_errors.with_label_values(&[field]).inc();
    ApiError(JobsError::Invalid(e))
}

async fn submit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let message = format!("the request body must be at most {MAX_BODY_BYTES} bytes");
            return refuse(&state, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message, None);
        }
        Err(rejection) => return rejection.into_response(),
    };
    if let Err(wait) = state.rate_limit.check(&caller.name) {
        let secs = wait.as_secs_f64().ceil() as u64;
        let message = format!("too many submits for key `{}`: retry in {secs} s", caller.name);
        return refuse(
            &state,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            message,
            Some(secs),
        );
    }
    if let Some(depth) = state.queue_cap.full() {
        let message = format!(
            "the queue is full ({depth} jobs waiting, the cap is {}): retry later",
            state.queue_cap.cap()
        );
        return refuse(&state, StatusCode::SERVICE_UNAVAILABLE, "queue_full", message, Some(5));
    }
    let Ok(_permit) = state.submit_permits.try_acquire() else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({ "error": "too many submits in flight; retry later" })),
        )
            .into_response();
    };
    let request = match JobRequest::from_json(&body) {
        Ok(r) => r,
        Err(e) => return invalid(&state, e).into_response(),
    };
    let key = headers.get(IDEMPOTENCY_KEY).and_then(|v| v.to_str().ok());
    let owner = (!state.keys.is_open()).then_some(caller.name.as_str());
    let submitted = match state.jobs.submit(&request, key, owner).await {
        Ok(s) => s,
        Err(JobsError::Invalid(e)) => return invalid(&state, e).into_response(),
        Err(e @ JobsError::Publish { .. }) => {
            state.metrics.publish_failures.inc();
            return ApiError(e).into_response();
        }
        Err(e) => return ApiError(e).into_response(),
    };
    if submitted.replayed {
        state.metrics.jobs_replayed.inc();
    } else {
        state.metrics.jobs_submitted.inc();
    }
    let id = submitted.status.id;
    let status_url = format!("/v1/jobs/{id}");
    let body = json!({
        "id": id,
        "status_url": status_url,
        "events_url": format!("/v1/jobs/{id}/events"),
        "status": submitted.status,
    });
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&status_url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if submitted.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

async fn status(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match state.jobs.visible_status(id, &caller).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match state.jobs.cancel(id, &caller).await {
        Ok(status) => {
            state.metrics.jobs_cancelled.inc();
            (StatusCode::ACCEPTED, Json(status)).into_response()
        }
        Err(e) => ApiError(e).into_response(),
    }
}

async fn events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let stream = match state.jobs.follow(id, &caller).await {
        Ok(s) => s,
        Err(e) => return ApiError(e).into_response(),
    };
    let stream = stream.map(|followed| {
        let event = match &followed {
            Followed::Status(status) => Event::default().event("status").json_data(status),
            Followed::Event(event) => Event::default().event(event.kind.as_str()).json_data(event),
        };
        Ok::<_, Infallible>(event.unwrap_or_else(|e| Event::default().comment(format!("unencodable event: {e}"))))
    });
    let mut stopping = state.stopping.clone();
    let stream = stream.take_until(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

async fn result(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let status = match state.jobs.visible_status(id, &caller).await {
        Ok(s) => s,
        Err(e) => return ApiError(e).into_response(),
    };
    match (&status.state, &status.result) {
        (JobState::Succeeded, Some(result)) => {
            Redirect::temporary(&state.results.presign_get(&result.grid.key)).into_response()
        }
        _ => ApiError(JobsError::NoResult(Box::new(status))).into_response(),
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    let (rabbitmq, redis) = state.jobs.health().await;
    let code = if rabbitmq && redis {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    let body = json!({
        "rabbitmq": word(rabbitmq),
        "redis": word(redis),
        "queue_depth": state.queue_cap.depth(),
    });
    (code, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
