//! The router and `serve`: which routes need a key, the middleware that
//! authenticates and the one that counts, the open routes (`/healthz`,
//! `/metrics`, `/openapi.json`), and serving until the shutdown future ends.
//! Routes are registered through `utoipa_axum`, so that each one is in the
//! OpenAPI document by construction.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Refusal, RETRY_UNAVAILABLE_SECS};
pub use super::state::{AppState, BodyLimits, MAX_BODY_BYTES};
use super::{job_routes, limits, list_routes, lora_routes, openapi, page, queue_routes, webhook_routes};

/// Every documented route: the `/v1/jobs*` and `/v1/loras*` ones, which
/// need an API key (when keys are configured), and the open ones: the page,
/// `/v1/limits`, `/healthz`, `/openapi.json` and `/metrics` (unless it has
/// its own listener).
fn routers(metrics_here: bool, limits: BodyLimits) -> (OpenApiRouter<AppState>, OpenApiRouter<AppState>) {
    let submit = OpenApiRouter::new()
        .routes(routes!(job_routes::submit))
        .layer(DefaultBodyLimit::max(limits.submit));
    let upload = OpenApiRouter::new()
        .routes(routes!(
            lora_routes::put_lora,
            lora_routes::get_lora,
            lora_routes::delete_lora
        ))
        .layer(DefaultBodyLimit::max(limits.lora));
    let jobs = OpenApiRouter::new()
        .merge(submit)
        .routes(routes!(list_routes::list))
        .routes(routes!(job_routes::status, job_routes::cancel))
        .routes(routes!(job_routes::events))
        .routes(routes!(job_routes::result))
        .routes(routes!(job_routes::images))
        .routes(routes!(lora_routes::list_loras))
        .routes(routes!(queue_routes::queue))
        .routes(routes!(webhook_routes::get_secret))
        .routes(routes!(webhook_routes::rotate_secret))
        .merge(upload);
    let mut open = OpenApiRouter::new()
        .routes(routes!(limits::limits))
        .routes(routes!(page::index))
        .routes(routes!(page::asset))
        .routes(routes!(healthz))
        .routes(routes!(openapi_json));
    if metrics_here {
        open = open.routes(routes!(metrics));
    }
    (jobs, open)
}

/// The OpenAPI document of the routes [`router`] serves, before the rules
/// are filled in ([`openapi::finish`]).
#[cfg(test)]
pub fn document(metrics_here: bool) -> utoipa::openapi::OpenApi {
    let (jobs, open) = routers(metrics_here, BodyLimits::new(1, 1));
    let mut doc = openapi::base();
    doc.merge(jobs.into_openapi());
    doc.merge(open.into_openapi());
    doc
}

pub fn router(state: AppState) -> Router {
    let (jobs, open) = routers(state.metrics_here, state.body_limits);
    let (jobs, jobs_doc) = jobs.split_for_parts();
    let (open, open_doc) = open.split_for_parts();
    let mut doc = openapi::base();
    doc.merge(jobs_doc);
    doc.merge(open_doc);
    let doc = Arc::new(openapi::finish(doc, state.jobs.caps()));
    jobs.route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .merge(open)
        .fallback(no_route)
        .layer(axum::Extension(doc))
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

/// Puts the [`crate::auth::Caller`] of the request's key in its extensions, or answers 401.
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
        None => ApiError::Unauthorized.into_response(),
    }
}

/// Counts every request by route, method and status, and every refusal by
/// its reason (and a validation error by its field).
async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    let m = &state.metrics;
    m.http_duration
        .with_label_values(&[route.as_str(), method.as_str()])
        .observe(start.elapsed().as_secs_f64());
    m.http_requests
        .with_label_values(&[route.as_str(), method.as_str(), response.status().as_str()])
        .inc();
    if let Some(refusal) = response.extensions().get::<Refusal>() {
        m.refused.with_label_values(&[refusal.reason]).inc();
        if let Some(field) = &refusal.field {
            m.validation_errors.with_label_values(&[field.as_str()]).inc();
        }
    }
    response
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_string())
}

/// Whether the services behind the API answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `unreachable`.
    pub rabbitmq: String,
    /// `ok` or `unreachable`.
    pub redis: String,
    /// Jobs waiting in the queue, as last read (null: not read yet, or no cap configured).
    pub queue_depth: Option<u64>,
}

/// Health of RabbitMQ and Redis, and the queue's depth.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses(
        (status = 200, description = "Both reachable", body = Health),
        (status = 503, description = "One is unreachable", body = Health,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
async fn healthz(State(state): State<AppState>) -> Response {
    let (rabbitmq, redis) = state.jobs.health().await;
    let word = |ok: bool| if ok { "ok" } else { "unreachable" }.to_string();
    let body = Health {
        rabbitmq: word(rabbitmq),
        redis: word(redis),
        queue_depth: state.queue_cap.depth(),
    };
    if rabbitmq && redis {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        let retry = [(header::RETRY_AFTER, HeaderValue::from(RETRY_UNAVAILABLE_SECS))];
        (StatusCode::SERVICE_UNAVAILABLE, retry, Json(body)).into_response()
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "The metrics", content_type = "text/plain", body = String))
)]
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
async fn openapi_json(axum::Extension(doc): axum::Extension<Arc<serde_json::Value>>) -> Response {
    Json(doc.as_ref().clone()).into_response()
}
