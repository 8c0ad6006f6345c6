//! `GET /v1/jobs`: the caller's jobs, newest first, a page at a time (an
//! admin key, and the caller of an open server, sees every job).

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use common::job_index::Scope;
use common::status::{JobState, JobStatus};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::list_query::ListQuery;
use super::state::AppState;
use crate::auth::Caller;
use crate::jobs::JobsError;

/// One page of jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    /// The status records, newest first.
    pub jobs: Vec<JobStatus>,
    /// Pass it as `cursor` for the next page; null when there is none. A
    /// page may hold fewer than `limit` jobs and still have one (a `state`
    /// filter looks at 1,024 jobs at most per page).
    pub next_cursor: Option<String>,
}

/// The query parameters, as documented (they are read by [`ListQuery`]).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ListParams {
    /// Only the jobs in this state.
    state: Option<JobState>,
    /// Jobs per page (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// The `next_cursor` of the page before (an opaque token).
    cursor: Option<String>,
}

/// The caller's jobs, newest first: those its API key submitted, or every
/// job for an admin key (and on an open server). Records expire after the
/// status TTL and leave the list with them.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(ListParams),
    responses(
        (status = 200, description = "A page of jobs", body = JobList),
        (status = 400, description = "The query string could not be read", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
        (status = 422, description = "`state`, `limit` or `cursor` is not allowed (the body names it)", body = ErrorBody),
        (status = 503, description = "Redis is unreachable", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let query = ListQuery::parse(&params)?;
    let scope = if caller.admin {
        Scope::All
    } else {
        Scope::Owner(&caller.name)
    };
    let page = state
        .jobs
        .index()
        .page(scope, query.state, query.limit, query.after.as_ref())
        .await
        .map_err(JobsError::Store)?;
    Ok(Json(JobList {
        jobs: page.jobs,
        next_cursor: page.next.map(|c| c.encode()),
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// The document has the three parameters, with the limit's range, and
    /// every answer.
    #[test]
    fn the_listing_is_documented_with_its_parameters_and_answers() {
        let doc: Value = serde_json::to_value(crate::http::server::document(false)).unwrap();
        let get = &doc["paths"]["/v1/jobs"]["get"];
        let params: Vec<&str> = get["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(params, ["state", "limit", "cursor"]);
        let limit = &get["parameters"][1]["schema"];
        assert_eq!(
            (limit["minimum"].as_u64(), limit["maximum"].as_u64()),
            (Some(1), Some(100)),
            "{limit}"
        );
        let answers: Vec<&String> = get["responses"].as_object().unwrap().keys().collect();
        assert_eq!(answers, ["200", "400", "401", "422", "503"]);
        assert!(doc["components"]["schemas"]["JobList"].is_object());
        assert!(doc["paths"]["/v1/jobs"]["post"].is_object(), "the submit stays");
    }
}
