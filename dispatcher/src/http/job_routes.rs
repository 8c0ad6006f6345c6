//! The `/v1/jobs` routes: submit, status, cancel, events (SSE), result and
//! images. Each handler returns `Result<_, ApiError>`; its `#[utoipa::path]`
//! is its entry in the OpenAPI document, every answer it can give included.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use common::event::QueuedEvent;
use common::rules::JobRequest;
use common::status::{ImageRef, JobState, JobStatus};
use futures_util::StreamExt;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody};
use super::extract::JobId;
use super::prefer;
use super::state::{AppState, MAX_BODY_BYTES};
use crate::auth::Caller;
use crate::jobs::{Followed, JobsError};

/// Header that makes a retried submit return the same job.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// What a submit answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Submitted {
    pub id: Uuid,
    /// `GET` it for the status record.
    pub status_url: String,
    /// `GET` it for the job's events (Server-Sent Events).
    pub events_url: String,
    /// The `queued` record (or, for a replayed `Idempotency-Key`, the job's current one).
    pub status: JobStatus,
}

/// The grid and the images of a succeeded job, with URLs signed now.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResultImages {
    pub grid: ImageRef,
    pub images: Vec<ImageRef>,
}

/// Submit a job: validated, recorded `queued`, then published to RabbitMQ
/// with a publisher confirm. With `Prefer: wait[=N]` the answer waits for
/// the job to end, at most N seconds (60 at most and by default): `200` with
/// the final status record if it ended by then, else `202` as without it.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body(content = JobRequest, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header,
         description = "A retried submit with the same key (of the same API key) returns the same job"),
        ("Prefer" = Option<String>, Header,
         description = "RFC 7240 preferences; `wait[=N]` (N seconds, at most 60, 60 when not given) waits for the job to end: 200 with its final record if it ends in time, else 202. Other preferences are ignored"),
    ),
    responses(
        (status = 200, description = "`Prefer: wait` and the job ended in time: its final status record", body = JobStatus, headers(
            ("Location" = String, description = "The status URL"),
            ("Preference-Applied" = String, description = "`wait=N`, the seconds waited at most"),
            ("Idempotent-Replayed" = String, description = "`true` when an earlier submit with this Idempotency-Key made the job"),
        )),
        (status = 202, description = "Queued (with `Prefer: wait`: not ended within the wait)", body = Submitted, headers(
            ("Location" = String, description = "The status URL"),
            ("Preference-Applied" = String, description = "With `Prefer: wait`: `wait=N`, the seconds waited"),
            ("Idempotent-Replayed" = String, description = "`true` when an earlier submit with this Idempotency-Key made the job"),
        )),
        (status = 400, description = "The body could not be read", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB (over 64 KiB plus two base64 images of the image cap, with `image` or `mask`)", body = ErrorBody),
        (status = 422, description = "A field breaks a rule (the body names it)", body = ErrorBody),
        (status = 429, description = "Over the key's rate limit or too many submits in flight", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "The queue is full, or RabbitMQ or Redis is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge {
            limit: state.body_limits.submit,
        },
        _ => ApiError::BadBody(rejection.body_text()),
    })?;
    // The larger limit is for images only, and a body over the plain one
    // without them is refused before it counts against the rate limit.
    let large = if body.len() > MAX_BODY_BYTES {
        let request = JobRequest::from_json(&body).map_err(JobsError::Invalid)?;
        if request.image.is_none() && request.mask.is_none() {
            return Err(ApiError::BodyTooLarge { limit: MAX_BODY_BYTES });
        }
        Some(request)
    } else {
        None
    };
    state
        .rate_limit
        .check(&caller.name)
        .await
        .map_err(|wait| ApiError::RateLimited {
            key: caller.name.clone(),
            retry_after: wait.as_secs_f64().ceil() as u64,
        })?;
    if let Some(depth) = state.queue_cap.full() {
        return Err(ApiError::QueueFull {
            depth,
            cap: state.queue_cap.cap(),
        });
    }
    let permit = state.submit_permits.try_acquire().map_err(|_| ApiError::Busy)?;
    let request = match large {
        Some(request) => request,
        None => JobRequest::from_json(&body).map_err(JobsError::Invalid)?,
    };
    let key = headers.get(IDEMPOTENCY_KEY).and_then(|v| v.to_str().ok());
    let owner = (!state.keys.is_open()).then_some(caller.name.as_str());
    let submitted = state.jobs.submit(&request, key, owner).await.inspect_err(|e| {
        if matches!(e, JobsError::Publish { .. }) {
            state.metrics.publish_failures.inc();
        }
    })?;
    if submitted.replayed {
        state.metrics.jobs_replayed.inc();
    } else {
        state.metrics.jobs_submitted.inc();
    }
    // A permit counts submits in flight, not jobs being waited for.
    drop(permit);
    let id = submitted.status.id;
    let status_url = format!("/v1/jobs/{id}");
    let wait = prefer::wait(&headers);
    let mut response = match wait {
        Some(secs) => match wait_finished(&state, id, &caller, secs).await? {
            Some(finished) => (StatusCode::OK, Json(finished)).into_response(),
            None => {
                // The record as it is now (running, most likely), not as submitted.
                let status = state.jobs.status(id).await.unwrap_or(submitted.status);
                accepted(id, &status_url, status)
            }
        },
        None => accepted(id, &status_url, submitted.status),
    };
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&status_url) {
        headers.insert(header::LOCATION, location);
    }
    if let Some(applied) = wait.and_then(|secs| HeaderValue::from_str(&prefer::applied(secs)).ok()) {
        headers.insert("preference-applied", applied);
    }
    if submitted.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

fn accepted(id: Uuid, status_url: &str, status: JobStatus) -> Response {
    let body = Submitted {
        id,
        status_url: status_url.to_string(),
        events_url: format!("{status_url}/events"),
        status,
    };
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

/// `Prefer: wait=secs`: the job's final record if it ends within `secs`;
/// `None` after that, or at once when the server begins to shut down (its
/// graceful shutdown must not wait for jobs).
async fn wait_finished(state: &AppState, id: Uuid, caller: &Caller, secs: u64) -> Result<Option<JobStatus>, ApiError> {
    let mut stopping = state.stopping.clone();
    tokio::select! {
        finished = state.jobs.wait_finished(id, caller, Duration::from_secs(secs)) => Ok(finished?),
        _ = stopping.wait_for(|s| *s) => Ok(None),
    }
}

/// The job's status record.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)")),
    responses(
        (status = 200, description = "The status record", body = JobStatus),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such job (or another key's)", body = ErrorBody),
        (status = 503, description = "Redis is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    JobId(id): JobId,
) -> Result<Json<JobStatus>, ApiError> {
    Ok(Json(state.jobs.visible_status(id, &caller).await?))
}

/// Cancel a queued or running job: a queued one is `cancelled` at once, a
/// running one stops between two steps.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)")),
    responses(
        (status = 202, description = "Cancel requested; the record after the request", body = JobStatus),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such job (or another key's)", body = ErrorBody),
        (status = 409, description = "The job has already finished (its record is in `status`)", body = ErrorBody),
        (status = 503, description = "Redis is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    JobId(id): JobId,
) -> Result<(StatusCode, Json<JobStatus>), ApiError> {
    let status = state.jobs.cancel(id, &caller).await?;
    state.metrics.jobs_cancelled.inc();
    Ok((StatusCode::ACCEPTED, Json(status)))
}

/// The job's events as Server-Sent Events: first an event named `status`
/// whose data is the status record (`JobStatus`); while the job is queued, a
/// `queued` event (`QueuedEvent`) with its place in line, sent again when
/// the place changes; then one event per
/// `progress`, `preview` (a blurred JPEG grid as a data URI), and exactly one
/// terminal event (`succeeded`, `failed` or `cancelled`) whose data is a
/// `JobEvent`; the stream ends after it.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)")),
    responses(
        (status = 200, description = "`event: status` with a `JobStatus`, `event: queued` with a `QueuedEvent` while it waits, then `event: progress|preview|succeeded|failed|cancelled` each with a `JobEvent` (the `itemSchema` describes each event)",
         content_type = "text/event-stream"),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such job (or another key's)", body = ErrorBody),
        (status = 503, description = "Redis is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn events(State(state): State<AppState>, caller: Caller, JobId(id): JobId) -> Result<Response, ApiError> {
    let stream = state.jobs.follow(id, &caller).await?;
    let stream = stream.map(move |followed| {
        let event = match &followed {
            Followed::Status(status) => Event::default().event("status").json_data(status),
            Followed::Event(event) => Event::default().event(event.kind.as_str()).json_data(event),
            Followed::Position(p) => Event::default().event("queued").json_data(QueuedEvent::new(id, *p)),
        };
        Ok::<_, Infallible>(event.unwrap_or_else(|e| Event::default().comment(format!("unencodable event: {e}"))))
    });
    let mut stopping = state.stopping.clone();
    let stream = stream.take_until(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// The grid of a succeeded job: a redirect to a presigned URL made now.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/result",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)")),
    responses(
        (status = 307, description = "To the grid's presigned URL",
         headers(("Location" = String, description = "The presigned URL"))),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such job (or another key's)", body = ErrorBody),
        (status = 409, description = "The job has not succeeded (its record is in `status`)", body = ErrorBody),
        (status = 503, description = "Redis is unreachable, or S3 credentials could not be had to sign the URL", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn result(State(state): State<AppState>, caller: Caller, JobId(id): JobId) -> Result<Response, ApiError> {
    let status = state.jobs.visible_status(id, &caller).await?;
    match (&status.state, &status.result) {
        (JobState::Succeeded, Some(result)) => {
            let url = state.results.presign_get(&result.grid.key).await?;
            Ok(Redirect::temporary(&url).into_response())
        }
        _ => Err(JobsError::NoResult(Box::new(status)).into()),
    }
}

/// The grid and each image of a succeeded job, with presigned URLs made now
/// (those in the status record expire after the presign TTL, the record
/// lives for days).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/images",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id (a UUID)")),
    responses(
        (status = 200, description = "The grid and the images", body = ResultImages),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "No such job (or another key's)", body = ErrorBody),
        (status = 409, description = "The job has not succeeded (its record is in `status`)", body = ErrorBody),
        (status = 503, description = "Redis is unreachable, or S3 credentials could not be had to sign the URL", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn images(
    State(state): State<AppState>,
    caller: Caller,
    JobId(id): JobId,
) -> Result<Json<ResultImages>, ApiError> {
    let status = state.jobs.visible_status(id, &caller).await?;
    let result = match (&status.state, &status.result) {
        (JobState::Succeeded, Some(result)) => result.clone(),
        _ => return Err(JobsError::NoResult(Box::new(status)).into()),
    };
    let mut grid = result.grid;
    let mut images = result.images;
    for image in std::iter::once(&mut grid).chain(images.iter_mut()) {
        image.url = state.results.presign_get(&image.key).await?;
    }
    Ok(Json(ResultImages { grid, images }))
}
