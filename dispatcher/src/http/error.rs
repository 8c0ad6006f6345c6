//! The one place where errors become HTTP statuses (as TEI's `server.rs`):
//! validation → 422 naming the field, unknown job → 404, finished job → 409,
//! Redis or RabbitMQ trouble → 503.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::jobs::JobsError;

#[derive(Debug)]
pub struct ApiError(pub JobsError);

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> Self {
        ApiError(e)
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match &self.0 {
            JobsError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            JobsError::NotFound(_) | JobsError::NotAJobId(_) => StatusCode::NOT_FOUND,
            JobsError::AlreadyFinished(_) | JobsError::NoResult(_) => StatusCode::CONFLICT,
            JobsError::Store(_) | JobsError::Publish { .. } | JobsError::NoPublisher => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self.0, "request failed");
        }
        let body = match &self.0 {
            JobsError::Invalid(e) => json!({ "error": e.to_string(), "field": e.field() }),
            JobsError::AlreadyFinished(s) | JobsError::NoResult(s) => {
                json!({ "error": self.0.to_string(), "status": s })
            }
            JobsError::Publish { id, .. } => json!({
                "error": self.0.to_string(),
                "id": id,
                "status_url": format!("/v1/jobs/{id}"),
            }),
            other => json!({ "error": other.to_string() }),
        };
        (status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::rules::ValidationError;
    use uuid::Uuid;

    #[test]
    fn each_error_has_its_status() {
        let status = |e: JobsError| ApiError(e).status();
        assert_eq!(
            status(JobsError::Invalid(ValidationError::Priority(10))),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(status(JobsError::NotFound(Uuid::nil())), StatusCode::NOT_FOUND);
        assert_eq!(status(JobsError::NotAJobId("x".into())), StatusCode::NOT_FOUND);
        assert_eq!(status(JobsError::NoPublisher), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn a_validation_error_names_the_field_in_the_body() {
        let response = ApiError(JobsError::Invalid(ValidationError::Priority(10))).into_response();
        let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["field"], "priority");
        assert_eq!(v["error"], "`priority` must be between 0 and 9, got 10");
    }
}
