//! Extractors the job handlers share: the job id of the path, parsed once,
//! and the authenticated caller the `authenticate` middleware put on the
//! request. A bad id is the same 404 as a job that does not exist.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use uuid::Uuid;

use super::error::ApiError;
use crate::auth::Caller;
use crate::jobs::JobsError;

/// The `{id}` of a `/v1/jobs/{id}…` path.
#[derive(Debug, Clone, Copy)]
pub struct JobId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for JobId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::NoRoute(e.to_string()))?;
        id.parse()
            .map(JobId)
            .map_err(|_| ApiError::Jobs(JobsError::NotAJobId(id)))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or(ApiError::Unauthorized)
    }
}
