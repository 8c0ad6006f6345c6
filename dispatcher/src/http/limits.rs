//! `GET /v1/limits`: every request field's range and default, as validation
//! enforces them (the web page builds its form from it).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use common::rules::RequestLimits;

use super::server::AppState;

/// The rules within this dispatcher's caps.
pub async fn limits(State(state): State<AppState>) -> Response {
    Json(RequestLimits::within(state.jobs.caps())).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OpenAPI document lists exactly the fields the endpoint answers.
    #[test]
    fn openapi_describes_every_field() {
        let doc: serde_json::Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
        let schema = &doc["components"]["schemas"]["RequestLimits"];
        let mut documented: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let served = serde_json::to_value(RequestLimits::current()).unwrap();
        let mut fields: Vec<&str> = served.as_object().unwrap().keys().map(String::as_str).collect();
        documented.sort_unstable();
        fields.sort_unstable();
        assert_eq!(documented, fields);
        assert!(doc["paths"]["/v1/limits"]["get"].is_object());
        assert!(doc["paths"]["/v1/jobs/{id}/images"]["get"].is_object());
    }
}
