//! `GET /v1/jobs/{id}/images`: the grid and each image of a succeeded job,
//! with presigned URLs made now. The URLs in the status record were signed
//! by the worker when it stored the result and expire after its presign TTL,
//! while the record lives for days; a client that shows an older job (the web
//! page's recent jobs) asks here for URLs that work.

use axum::extract::{Extension, Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use common::result_store::ResultStore;
use common::status::{ImageRef, JobState};
use serde::Serialize;

use super::error::ApiError;
use super::server::{parse_id, AppState};
use crate::auth::Caller;
use crate::jobs::JobsError;

#[derive(Debug, Serialize)]
struct ResultImages {
    grid: ImageRef,
    images: Vec<ImageRef>,
}

fn presigned(results: &ResultStore, mut image: ImageRef) -> ImageRef {
    image.url = results.presign_get(&image.key);
    image
}

pub async fn images(
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
    let result = match (&status.state, &status.result) {
        (JobState::Succeeded, Some(result)) => result.clone(),
        _ => return ApiError(JobsError::NoResult(Box::new(status))).into_response(),
    };
    Json(ResultImages {
        grid: presigned(&state.results, result.grid),
        images: result
            .images
            .into_iter()
            .map(|image| presigned(&state.results, image))
            .collect(),
    })
    .into_response()
}
