//! The one place where errors become HTTP answers (as TEI's `server.rs`):
//! every refusal the API makes — 401, 404, 409, 413, 422, 429, 503 — is an
//! [`ApiError`], with its status, its JSON body ([`ErrorBody`]), its headers
//! (`WWW-Authenticate` on 401, `Retry-After` on every 429 and 503) and the
//! reason it is counted under in `sdxl_dispatcher_requests_refused_total`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use common::result_store::ResultStoreError;
use common::status::JobStatus;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::list_query::ListQueryError;
use crate::jobs::JobsError;
use crate::loras::RegistryError;

/// How long a client should wait before retrying when a service behind the
/// API (Redis, RabbitMQ, S3) is unreachable or the queue is full.
pub const RETRY_UNAVAILABLE_SECS: u64 = 5;

/// Every refusal of the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Jobs(#[from] JobsError),
    #[error("a valid API key is required: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the request body must be at most {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    #[error("the query string could not be read: {0}")]
    BadQuery(String),
    /// A bad `GET /v1/jobs` parameter (422 naming it).
    #[error(transparent)]
    ListQuery(#[from] ListQueryError),
    #[error("too many submits for key `{key}`: retry in {retry_after} s")]
    RateLimited { key: String, retry_after: u64 },
    #[error("too many submits in flight; retry later")]
    Busy,
    #[error("the queue is full ({depth} jobs waiting, the cap is {cap}): retry later")]
    QueueFull { depth: u64, cap: u64 },
    #[error("no route {0}")]
    NoRoute(String),
    /// Presigning a result's URL failed (S3's credentials could not be had).
    #[error("the result's URL could not be signed: {0}")]
    Results(#[from] ResultStoreError),
}

/// The body of every refusal: `error` always, the rest where it applies.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, in words that name the field, the value and the rule.
    pub error: String,
    /// A validation error's field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The job's record, when the refusal is about its state (409).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<JobStatus>>,
    /// A job that could not be queued (503): its id; its record says `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_url: Option<String>,
}

/// Put on every refusal's response, for the tracking middleware to count
/// (it holds the metrics; the error does not).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: &'static str,
    /// The field of a validation error (`unknown` for an unknown field).
    pub field: Option<String>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Jobs(e) => match e {
                JobsError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                JobsError::NotFound(_) | JobsError::NotAJobId(_) => StatusCode::NOT_FOUND,
                JobsError::AlreadyFinished(_) | JobsError::NoResult(_) => StatusCode::CONFLICT,
                JobsError::Store(_)
                | JobsError::Publish { .. }
                | JobsError::NoPublisher
                | JobsError::NoObjectStore
                | JobsError::Objects(_) => StatusCode::SERVICE_UNAVAILABLE,
                JobsError::Registry(e) => registry_status(e),
            },
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Registry(e) => registry_status(e),
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadBody(_) | ApiError::BadQuery(_) => StatusCode::BAD_REQUEST,
            ApiError::ListQuery(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } | ApiError::Busy => StatusCode::TOO_MANY_REQUESTS,
            ApiError::QueueFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::Results(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The label of the refused-requests metric.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Jobs(e) => match e {
                JobsError::Invalid(_) => "invalid",
                JobsError::NotFound(_) | JobsError::NotAJobId(_) => "not_found",
                JobsError::AlreadyFinished(_) | JobsError::NoResult(_) => "conflict",
                JobsError::Store(_) | JobsError::NoPublisher | JobsError::NoObjectStore => "unavailable",
                JobsError::Objects(_) => "storage_unavailable",
                JobsError::Publish { .. } => "publish_failed",
                JobsError::Registry(e) => registry_reason(e),
            },
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Registry(e) => registry_reason(e),
            ApiError::Unauthorized => "unauthorized",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::BadBody(_) => "bad_body",
            ApiError::BadQuery(_) => "bad_query",
            ApiError::ListQuery(_) => "invalid",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Busy => "busy",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::NoRoute(_) => "no_route",
            ApiError::Results(_) => "storage_unavailable",
        }
    }

    /// Seconds for `Retry-After`: on every 429 and 503.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after, .. } => Some((*retry_after).max(1)),
            ApiError::Busy => Some(1),
            _ if self.status() == StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_UNAVAILABLE_SECS),
            _ => None,
        }
    }

    fn body(&self) -> ErrorBody {
        let mut body = ErrorBody {
            error: self.to_string(),
            field: None,
            status: None,
            id: None,
            status_url: None,
        };
        match self {
            ApiError::Jobs(JobsError::Invalid(e)) => body.field = Some(e.field().to_string()),
            ApiError::ListQuery(e) => body.field = Some(e.field().to_string()),
            ApiError::Jobs(JobsError::AlreadyFinished(s) | JobsError::NoResult(s)) => body.status = Some(s.clone()),
            ApiError::Jobs(JobsError::Publish { id, .. }) => {
                body.id = Some(*id);
                body.status_url = Some(format!("/v1/jobs/{id}"));
            }
            _ => {}
        }
        body
    }

    fn refusal(&self) -> Refusal {
        let field = match self {
            ApiError::Jobs(JobsError::Invalid(common::ValidationError::UnknownField(_))) => Some("unknown".into()),
            ApiError::Jobs(JobsError::Invalid(e)) => Some(e.field().to_string()),
            ApiError::ListQuery(e) => Some(e.field().to_string()),
            _ => None,
        };
        Refusal {
            reason: self.reason(),
            field,
        }
    }
}

fn registry_status(e: &RegistryError) -> StatusCode {
    match e {
        RegistryError::BadName(_) | RegistryError::NotALora(_) => StatusCode::UNPROCESSABLE_ENTITY,
        RegistryError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
        RegistryError::BadRecord { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        RegistryError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn registry_reason(e: &RegistryError) -> &'static str {
    match e {
        RegistryError::BadName(_) | RegistryError::NotALora(_) => "invalid_lora",
        RegistryError::TooLarge { .. } => "body_too_large",
        RegistryError::NotFound(_) => "not_found",
        RegistryError::BadRecord { .. } => "bad_record",
        RegistryError::Store(_) => "storage_unavailable",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = (status, Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, ApiError::Unauthorized) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(self.refusal());
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::rules::ValidationError;

    #[test]
    fn each_error_has_its_status() {
        let status = |e: JobsError| ApiError::Jobs(e).status();
        assert_eq!(
            status(JobsError::Invalid(ValidationError::Priority(10))),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(status(JobsError::NotFound(Uuid::nil())), StatusCode::NOT_FOUND);
        assert_eq!(status(JobsError::NotAJobId("x".into())), StatusCode::NOT_FOUND);
        assert_eq!(status(JobsError::NoPublisher), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ApiError::Busy.status(), StatusCode::TOO_MANY_REQUESTS);
    }

    #[tokio::test]
    async fn a_validation_error_names_the_field_in_the_body() {
        let response = ApiError::Jobs(JobsError::Invalid(ValidationError::Priority(10))).into_response();
        assert_eq!(response.extensions().get::<Refusal>().unwrap().reason, "invalid");
        let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["field"], "priority");
        assert_eq!(v["error"], "`priority` must be between 0 and 9, got 10");
    }

    /// Every 429 and 503 says when to come back; a 401 says how to authenticate.
    #[test]
    fn refusals_carry_their_headers() {
        let errors = [
            ApiError::RateLimited {
                key: "k".into(),
                retry_after: 0,
            },
            ApiError::Busy,
            ApiError::QueueFull { depth: 9, cap: 9 },
            ApiError::Jobs(JobsError::NoPublisher),
        ];
        for e in errors {
            let code = e.status();
            let response = e.into_response();
            assert!(
                code == StatusCode::TOO_MANY_REQUESTS || code == StatusCode::SERVICE_UNAVAILABLE,
                "{code}"
            );
            let after = response.headers().get(header::RETRY_AFTER).expect("Retry-After");
            assert!(after.to_str().unwrap().parse::<u64>().unwrap() >= 1);
        }
        let response = ApiError::Unauthorized.into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }
}
