//! The `/v1/loras` routes: the LoRA registry. Anyone with a key lists it;
//! only an admin key uploads or deletes.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::auth::Caller;
use crate::jobs::JobsError;
use crate::loras::{LoraRecord, LoraRegistry, RegistryError};

/// What `GET /v1/loras` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoraList {
    pub loras: Vec<LoraRecord>,
}

fn registry(state: &AppState) -> Result<&LoraRegistry, ApiError> {
    state
        .jobs
        .storage()
        .map(|s| &s.loras)
        .ok_or(ApiError::Jobs(JobsError::NoObjectStore))
}

fn admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "only an admin key may change the LoRA registry".into(),
        ))
    }
}

/// Upload a LoRA (safetensors: kohya, PEFT or older diffusers names; LoCon
/// convolutions included) under `name`, replacing one of that name. Its
/// header is checked: every key must be a LoRA tensor of a type the workers
/// run. Jobs accepted before a replacement and run after it fail (they are
/// pinned to the old file's sha256).
#[utoipa::path(
    put,
    path = "/v1/loras/{name}",
    tag = "loras",
    params(("name" = String, Path, description = "1–64 of A-Z a-z 0-9 . _ -")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The .safetensors file"),
    responses(
        (status = 201, description = "Registered", body = LoraRecord),
        (status = 200, description = "Replaced one of that name", body = LoraRecord),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 413, description = "Over the upload cap", body = ErrorBody),
        (status = 422, description = "A bad name, or not a LoRA file (the key is named)", body = ErrorBody),
        (status = 503, description = "The object store is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn put_lora(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<LoraRecord>), ApiError> {
    admin(&caller)?;
    let registry = registry(&state)?;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge {
            limit: registry.max_bytes(),
        },
        _ => ApiError::BadBody(rejection.body_text()),
    })?;
    let existed = registry.get(&name).await?.is_some();
    let record = registry.put(&name, body.to_vec(), Some(&caller.name)).await?;
    let code = if existed { StatusCode::OK } else { StatusCode::CREATED };
    Ok((code, Json(record)))
}

/// Every registered LoRA: name, bytes, sha256, format, ranks, parts.
#[utoipa::path(
    get,
    path = "/v1/loras",
    tag = "loras",
    responses(
        (status = 200, description = "The registry, by name", body = LoraList),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 503, description = "The object store is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn list_loras(State(state): State<AppState>, _caller: Caller) -> Result<Json<LoraList>, ApiError> {
    Ok(Json(LoraList {
        loras: registry(&state)?.list().await?,
    }))
}

/// One registered LoRA's record.
#[utoipa::path(
    get,
    path = "/v1/loras/{name}",
    tag = "loras",
    params(("name" = String, Path, description = "The LoRA's name")),
    responses(
        (status = 200, description = "Its record", body = LoraRecord),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 404, description = "Not registered", body = ErrorBody),
        (status = 503, description = "The object store is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn get_lora(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<LoraRecord>, ApiError> {
    registry(&state)?
        .get(&name)
        .await?
        .map(Json)
        .ok_or_else(|| RegistryError::NotFound(name).into())
}

/// Remove a LoRA. Queued jobs that name it fail when they run.
#[utoipa::path(
    delete,
    path = "/v1/loras/{name}",
    tag = "loras",
    params(("name" = String, Path, description = "The LoRA's name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "Not registered", body = ErrorBody),
        (status = 503, description = "The object store is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn delete_lora(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin(&caller)?;
    if registry(&state)?.delete(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(RegistryError::NotFound(name).into())
    }
}
