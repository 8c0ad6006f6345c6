//! The generation request as a client sends it (JSON), before validation.
//!
//! Every field but `prompt` is optional so that validation can tell "not given"
//! (take the default) from "given" (check the range). Numbers are signed and
//! wide on purpose: `-5` or `1e9` must reach validation and come back as an
//! error that names the field, not as a serde type error.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ValidationError;

/// A generation request as received (HTTP body, CLI flags, queue message).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub num_inference_steps: Option<i64>,
    #[serde(default)]
    pub width: Option<i64>,
    #[serde(default)]
    pub height: Option<i64>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub num_images: Option<i64>,
    #[serde(default)]
    pub preview_every: Option<i64>,
    #[serde(default)]
    pub output_format: Option<String>,
    #[serde(default)]
    pub priority: Option<i64>,
}

/// The encodings a result can be stored in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub const ALL: [OutputFormat; 3] = [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp];

    /// File extension of stored objects (`jobs/{id}/grid.{ext}`).
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    /// `Content-Type` of stored objects.
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }
}

impl std::fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.extension())
    }
}

impl std::str::FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "png" => Ok(OutputFormat::Png),
            "jpeg" => Ok(OutputFormat::Jpeg),
            "webp" => Ok(OutputFormat::Webp),
            other => Err(format!("unknown output format `{other}`")),
        }
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    field: &'static str,
    expected: &'static str,
    value: Value,
) -> Result<Option<T>, ValidationError> {
    if value.is_null() {
        return Ok(None);
    }
    let shown = value.to_string();
    serde_json::from_value(value)
        .map(Some)
        .map_err(|_| ValidationError::WrongType {
            field,
            expected,
            got: shown.chars().take(80).collect(),
        })
}

impl JobRequest {
    /// Decodes a JSON body field by field, so that a wrong type or an unknown
    /// field comes back as an error naming the field (serde's own messages
    /// name a line and a column).
    pub fn from_json(body: &[u8]) -> Result<Self, ValidationError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| ValidationError::Malformed(e.to_string()))?;
        Self::from_value(value)
    }

    /// As [`JobRequest::from_json`], from a JSON value already parsed (the
    /// `request` of a queue message), so that the dispatcher and the worker
    /// accept and refuse exactly the same requests with the same messages.
    pub fn from_value(value: Value) -> Result<Self, ValidationError> {
        let Value::Object(map) = value else {
            return Err(ValidationError::Malformed(format!("got {}", kind(&value))));
        };
        let mut req = JobRequest::default();
        const INT: &str = "an integer";
        for (key, value) in map {
            match key.as_str() {
                "prompt" => req.prompt = typed("prompt", "a string", value)?,
                "negative_prompt" => req.negative_prompt = typed("negative_prompt", "a string", value)?,
                "num_inference_steps" => req.num_inference_steps = typed("num_inference_steps", INT, value)?,
                "width" => req.width = typed("width", INT, value)?,
                "height" => req.height = typed("height", INT, value)?,
                "guidance_scale" => req.guidance_scale = typed("guidance_scale", "a number", value)?,
                "seed" => req.seed = typed("seed", "an integer from 0 to 2^64-1", value)?,
                "num_images" => req.num_images = typed("num_images", INT, value)?,
                "preview_every" => req.preview_every = typed("preview_every", INT, value)?,
                "output_format" => req.output_format = typed("output_format", "a string", value)?,
                "priority" => req.priority = typed("priority", INT, value)?,
                _ => return Err(ValidationError::UnknownField(key)),
            }
        }
        Ok(req)
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
