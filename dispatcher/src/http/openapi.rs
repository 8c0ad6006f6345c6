//! The OpenAPI document, generated: the paths from each handler's
//! `#[utoipa::path]`, the schemas from the types they take and return, and
//! the request's ranges, multiples and choices from the rules this
//! dispatcher enforces ([`RequestLimits`] within its caps), so that the
//! document describes exactly what the server accepts.

use common::rules::{Caps, IntegerLimit, RequestLimits};
use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi;
use utoipa::Modify;

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "sdxl-queue",
        description = "Stable Diffusion XL images from a queue of GPU workers: submit a job, follow its previews, fetch its grid.",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "jobs", description = "Generation jobs (need an API key when the server has keys)"),
        (name = "webhooks", description = "The key's webhook signing secret (Standard Webhooks)"),
        (name = "loras", description = "The LoRA registry (listing needs an API key; changes an admin key)"),
        (name = "limits", description = "What a request may ask"),
        (name = "page", description = "The web page"),
        (name = "operations", description = "Health, metrics and this document"),
    ),
    components(schemas(common::event::JobEvent, common::event::QueuedEvent, common::status::JobStatus)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key: `Authorization: Bearer <key>`"))
                    .build(),
            ),
        );
    }
}

/// The document's frame (info, tags, security scheme); the router adds the paths.
pub fn base() -> OpenApi {
    <ApiDoc as utoipa::OpenApi>::openapi()
}

/// The whole document as served: `doc` with the request's rules within `caps`.
pub fn finish(doc: OpenApi, caps: &Caps) -> Value {
    let mut value = serde_json::to_value(&doc).unwrap_or_else(|_| json!({}));
    let limits = RequestLimits::within(caps);
    if let Some(props) = value.pointer_mut("/components/schemas/JobRequest/properties") {
        apply_limits(props, &limits);
    }
    if let Some(props) = value.pointer_mut("/components/schemas/LoraRequest/properties") {
        props["name"]["pattern"] = json!(format!(
            "^[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{}}}$",
            limits.loras.name_max_chars - 1
        ));
        props["scale"]["minimum"] = json!(limits.loras.scale.min);
        props["scale"]["maximum"] = json!(limits.loras.scale.max);
        props["sha256"]["pattern"] = json!("^[0-9a-fA-F]{64}$");
    }
    if let Some(content) = value.pointer_mut("/paths/~1v1~1jobs~1{id}~1events/get/responses/200/content") {
        content["text/event-stream"] = json!({ "itemSchema": sse_item_schema() });
    }
    value
}

/// Each event of the job's SSE stream (OpenAPI 3.2's `itemSchema`): first
/// `status` with the status record, `queued` (a `QueuedEvent`) while the job
/// waits, then events whose data is a `JobEvent`.
/// (utoipa writes OpenAPI 3.1, which has no word for a stream's items.)
fn sse_item_schema() -> Value {
    let event = |names: Value, data: &str| {
        json!({
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": names,
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": { "$ref": format!("#/components/schemas/{data}") }
                },
                "id": { "type": "string" },
                "retry": { "type": "integer" }
            }
        })
    };
    let kinds = json!({ "enum": ["progress", "preview", "succeeded", "failed", "cancelled"] });
    json!({ "oneOf": [
        event(json!({ "const": "status" }), "JobStatus"),
        event(json!({ "const": "queued" }), "QueuedEvent"),
        event(kinds, "JobEvent"),
    ] })
}

fn integer(prop: &mut Value, limit: &IntegerLimit) {
    prop["minimum"] = json!(limit.min);
    prop["maximum"] = json!(limit.max);
    if let Some(m) = limit.multiple_of {
        prop["multipleOf"] = json!(m);
    }
}

fn apply_limits(props: &mut Value, l: &RequestLimits) {
    props["prompt"]["minLength"] = json!(l.prompt.min_chars);
    props["prompt"]["maxLength"] = json!(l.prompt.max_chars);
    props["negative_prompt"]["maxLength"] = json!(l.negative_prompt.max_chars);
    integer(&mut props["num_inference_steps"], &l.num_inference_steps);
    integer(&mut props["width"], &l.width);
    integer(&mut props["height"], &l.height);
    integer(&mut props["num_images"], &l.num_images);
    integer(&mut props["preview_every"], &l.preview_every);
    integer(&mut props["priority"], &l.priority);
    integer(&mut props["seed"], &l.seed);
    props["guidance_scale"]["minimum"] = json!(l.guidance_scale.min);
    props["guidance_scale"]["maximum"] = json!(l.guidance_scale.max);
    // A nullable choice: `null` (not given) is one of the allowed values.
    let mut formats: Vec<Value> = l.output_format.one_of.iter().map(|f| json!(f)).collect();
    formats.push(Value::Null);
    props["output_format"]["enum"] = Value::Array(formats);
    let mut samplers: Vec<Value> = l.scheduler.one_of.iter().map(|s| json!(s)).collect();
    samplers.push(Value::Null);
    props["scheduler"]["enum"] = Value::Array(samplers);
    props["strength"]["exclusiveMinimum"] = json!(l.strength.min_exclusive);
    props["strength"]["maximum"] = json!(l.strength.max);
    props["loras"]["maxItems"] = json!(l.loras.max_count);
    props["webhook_url"]["maxLength"] = json!(l.webhook.url_max_chars);
    props["webhook_url"]["format"] = json!("uri");
    props["webhook_events"]["minItems"] = json!(1);
    props["webhook_events"]["items"] = json!({ "type": "string", "enum": l.webhook.events });
    let bytes = format!(" At most {} bytes once decoded on this server.", l.max_image_bytes);
    for input in ["image", "mask"] {
        if let Some(Value::String(d)) = props[input].get_mut("description") {
            d.push_str(&bytes);
        }
    }
    let pixels = format!(" Width × height may be at most {} pixels on this server.", l.max_pixels);
    for side in ["width", "height"] {
        if let Some(Value::String(d)) = props[side].get_mut("description") {
            d.push_str(&pixels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::server::document;

    fn served() -> Value {
        finish(document(true), &Caps::default())
    }

    /// Every route the server answers is in the document, with the methods
    /// it takes, and the document has no route the server lacks.
    #[test]
    fn every_route_is_documented() {
        let doc = served();
        let paths = doc["paths"].as_object().unwrap();
        let mut documented: Vec<String> = paths
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| ["get", "post", "delete", "put", "patch"].contains(&k.as_str()))
                    .map(move |m| format!("{} {path}", m.to_uppercase()))
            })
            .collect();
        documented.sort();
        let expected = [
            "DELETE /v1/jobs/{id}",
            "DELETE /v1/loras/{name}",
            "GET /",
            "GET /healthz",
            "GET /metrics",
            "GET /openapi.json",
            "GET /v1/jobs",
            "GET /v1/jobs/{id}",
            "GET /v1/jobs/{id}/events",
            "GET /v1/jobs/{id}/images",
            "GET /v1/jobs/{id}/result",
            "GET /v1/limits",
            "GET /v1/loras",
            "GET /v1/loras/{name}",
            "GET /v1/queue",
            "GET /v1/webhook-secret",
            "GET /web/{file}",
            "POST /v1/jobs",
            "POST /v1/webhook-secret/rotate",
            "PUT /v1/loras/{name}",
        ];
        assert_eq!(documented, expected);
    }

    /// The request's schema carries the ranges validation enforces.
    #[test]
    fn the_request_schema_has_the_enforced_ranges() {
        let doc = served();
        let props = &doc["components"]["schemas"]["JobRequest"]["properties"];
        let limits = RequestLimits::current();
        assert_eq!(
            props["num_inference_steps"]["maximum"],
            json!(limits.num_inference_steps.max)
        );
        assert_eq!(props["width"]["multipleOf"], json!(8));
        assert_eq!(props["seed"]["maximum"], json!(u64::MAX));
        assert!(props["output_format"]["enum"]
            .as_array()
            .unwrap()
            .contains(&Value::Null));
        let samplers = props["scheduler"]["enum"].as_array().unwrap();
        assert!(samplers.contains(&json!("dpmpp_2m_karras")) && samplers.contains(&Value::Null));
        let required = doc["components"]["schemas"]["JobRequest"]["required"]
            .as_array()
            .unwrap();
        assert_eq!(required, &vec![json!("prompt")]);
        assert_eq!(
            doc["components"]["schemas"]["JobRequest"]["additionalProperties"],
            json!(false)
        );
        // The doc comments quote the same numbers as the rules.
        let steps = props["num_inference_steps"]["description"].as_str().unwrap();
        let (lo, hi) = common::rules::STEPS_RANGE;
        assert!(steps.contains(&format!("{lo}–{hi}")), "{steps}");
        let width = props["width"]["description"].as_str().unwrap();
        let (lo, hi) = common::rules::SIZE_RANGE;
        assert!(width.contains(&format!("{lo}–{hi}")), "{width}");
    }

    /// `/v1/limits` answers exactly the fields its schema lists.
    #[test]
    fn the_limits_schema_lists_every_served_field() {
        let doc = served();
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
    }

    /// The event stream's first event, `status`, is described with its data.
    #[test]
    fn the_sse_stream_documents_the_status_event() {
        let doc = served();
        let item = &doc["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
            ["itemSchema"];
        assert_eq!(item["oneOf"][0]["properties"]["event"]["const"], "status");
        assert_eq!(
            item["oneOf"][0]["properties"]["data"]["contentSchema"]["$ref"],
            "#/components/schemas/JobStatus"
        );
        assert!(doc["components"]["schemas"]["JobEvent"].is_object());
    }
}
