//! The generation request as a client sends it (JSON), before validation.
//!
//! Every field but `prompt` is optional so that validation can tell "not given"
//! (take the default) from "given" (check the range). Numbers are signed and
//! wide on purpose: `-5` or `1e9` must reach validation and come back as an
//! error that names the field, not as a serde type error.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::ValidationError;

/// A generation request as received (HTTP body, CLI flags, queue message).
///
/// Each field's doc comment is its OpenAPI description and its
/// `dispatcher submit --help` text; `null` means "not given" everywhere.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// What to draw, 1–2000 characters.
    #[serde(default)]
    #[schema(required = true, nullable = false)]
    #[arg(long)]
    pub prompt: Option<String>,
    /// What to steer away from, at most 2000 characters (default `blurry,
    /// low quality`; empty: none).
    #[serde(default)]
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Denoising steps, 1–100 (default 20).
    #[serde(default)]
    #[arg(long, visible_alias = "steps", allow_negative_numbers = true)]
    pub num_inference_steps: Option<i64>,
    /// Image width in pixels, 256–2048, a multiple of 8 (default 1024).
    #[serde(default)]
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<i64>,
    /// Image height in pixels, 256–2048, a multiple of 8 (default 1024).
    #[serde(default)]
    #[arg(long, allow_negative_numbers = true)]
    pub height: Option<i64>,
    /// Classifier-free guidance scale, 0–30; off at 1 or below (default 5).
    #[serde(default)]
    #[arg(long, allow_negative_numbers = true)]
    pub guidance_scale: Option<f64>,
    /// The sampler: euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras,
    /// dpmpp_2m_sde_karras, unipc or lcm (default euler).
    #[serde(default)]
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Seed of the first image; image `i` uses `seed + i` (default: drawn,
    /// and recorded in the status).
    #[serde(default)]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images in the grid, 1–16 (default: one per GPU of the worker).
    #[serde(default)]
    #[arg(long, allow_negative_numbers = true)]
    pub num_images: Option<i64>,
    /// A preview every this many steps, 0–100; 0: none (default 5).
    #[serde(default)]
    #[arg(long, allow_negative_numbers = true)]
    pub preview_every: Option<i64>,
    /// How results are stored: png, jpeg or webp (default png).
    #[serde(default)]
    #[arg(long)]
    pub output_format: Option<String>,
    /// Queue priority, 0–9, higher first (default 5).
    #[serde(default)]
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i64>,
}

/// The encodings a result can be stored in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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

/// JSON Schema counts `21.0` an integer: a number without a fractional part
/// is taken as the integer it equals, so that what the OpenAPI document calls
/// an integer is one here too (a fraction still fails as "not an integer").
fn integral(value: Value) -> Value {
    let Value::Number(n) = &value else {
        return value;
    };
    match n.as_f64() {
        Some(f) if !n.is_i64() && !n.is_u64() && f.fract() == 0.0 => {
            if (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f) {
                Value::from(f as i64)
            } else if (0.0..1.844_674_407_370_955_2e19).contains(&f) {
                Value::from(f as u64)
            } else {
                value
            }
        }
        _ => value,
    }
}

fn integer<T: serde::de::DeserializeOwned>(
    field: &'static str,
    expected: &'static str,
    value: Value,
) -> Result<Option<T>, ValidationError> {
    typed(field, expected, integral(value))
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
                "num_inference_steps" => req.num_inference_steps = integer("num_inference_steps", INT, value)?,
                "width" => req.width = integer("width", INT, value)?,
                "height" => req.height = integer("height", INT, value)?,
                "guidance_scale" => req.guidance_scale = typed("guidance_scale", "a number", value)?,
                "scheduler" => req.scheduler = typed("scheduler", "a string", value)?,
                "seed" => req.seed = integer("seed", "an integer from 0 to 2^64-1", value)?,
                "num_images" => req.num_images = integer("num_images", INT, value)?,
                "preview_every" => req.preview_every = integer("preview_every", INT, value)?,
                "output_format" => req.output_format = typed("output_format", "a string", value)?,
                "priority" => req.priority = integer("priority", INT, value)?,
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
