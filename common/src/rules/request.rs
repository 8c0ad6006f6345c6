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
    /// img2img: the image to start from, base64 or a `data:` URL (PNG, JPEG
    /// or WebP, at most 10 MiB unless the server says otherwise; an alpha
    /// channel is dropped). `width` and `height` default to its size rounded
    /// down to a multiple of 8; given, the image is resized to them. CLI: a file.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    #[arg(long, value_name = "FILE", value_parser = inline_image_file)]
    pub image: Option<ImageInput>,
    /// Inpainting: white where the image is repainted, black where it is
    /// kept (grey levels in between are thresholded at half), the image's
    /// size; needs `image`. Base64 or a `data:` URL; CLI: a file.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    #[arg(long, value_name = "FILE", value_parser = inline_image_file)]
    pub mask: Option<ImageInput>,
    /// How much of the image is repainted, above 0 up to 1: the last
    /// `int(num_inference_steps × strength)` steps run (default 0.3 for
    /// img2img, 0.9999 for inpainting); ignored without `image`.
    #[serde(default)]
    #[arg(long)]
    pub strength: Option<f64>,
    /// LoRAs from the server's registry (`GET /v1/loras`), each with its
    /// scale (-4 to 4, default 1), at most 4 unless the server says
    /// otherwise. CLI: `--lora NAME[:SCALE]`, repeatable.
    #[serde(default)]
    #[arg(long = "lora", value_name = "NAME[:SCALE]", value_parser = lora_arg)]
    pub loras: Option<Vec<LoraRequest>>,
    /// Where to POST the job's status record on each of `webhook_events`,
    /// signed as Standard Webhooks say (`GET /v1/webhook-secret` gives the
    /// key's secret): an https URL of a public address (http and private
    /// addresses only where the server allows them), at most 2048 characters.
    #[serde(default)]
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// The events that are POSTed: any of running, succeeded, failed,
    /// cancelled (default: succeeded, failed, cancelled); ignored without
    /// `webhook_url`. CLI: comma-separated.
    #[serde(default)]
    #[arg(long, value_delimiter = ',')]
    pub webhook_events: Option<Vec<String>>,
}

/// An input image (`image`, `mask`) as a request carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ImageInput {
    /// The encoded file, base64 or a `data:` URL: what clients send. The
    /// dispatcher decodes it, stores it under the job's prefix and replaces
    /// it with [`ImageInput::Stored`] before validation.
    Inline(String),
    /// An object the dispatcher stored: what the queue carries (images never
    /// ride on it). Refused from clients.
    Stored(StoredImage),
}

/// An input image in the object store, under its job's prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StoredImage {
    /// `jobs/{id}/input.png` or `jobs/{id}/mask.png`.
    pub key: String,
    pub width: u32,
    pub height: u32,
}

/// A LoRA a job asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraRequest {
    /// Its name in the registry.
    pub name: String,
    /// -4 to 4 (default 1); negative scales push away from the LoRA's style.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Pins the file: the job is refused if the registry holds another
    /// (filled in by the dispatcher when absent, so that a worker runs the
    /// file the job was accepted with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `--image FILE`: the file's bytes, base64-encoded as the HTTP API takes them.
fn inline_image_file(path: &str) -> Result<ImageInput, String> {
    use base64::Engine as _;
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    Ok(ImageInput::Inline(
        base64::engine::general_purpose::STANDARD.encode(bytes),
    ))
}

/// `--lora NAME[:SCALE]`.
fn lora_arg(arg: &str) -> Result<LoraRequest, String> {
    let (name, scale) = match arg.rsplit_once(':') {
        Some((name, scale)) => {
            let scale = scale
                .parse::<f64>()
                .map_err(|_| format!("`{arg}`: the scale after `:` must be a number, got `{scale}`"))?;
            (name, Some(scale))
        }
        None => (arg, None),
    };
    Ok(LoraRequest {
        name: name.to_string(),
        scale,
        sha256: None,
    })
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
                "image" => req.image = image_input("image", value)?,
                "mask" => req.mask = image_input("mask", value)?,
                "strength" => req.strength = typed("strength", "a number", value)?,
                "loras" => req.loras = loras(value)?,
                "webhook_url" => req.webhook_url = typed("webhook_url", "a string", value)?,
                "webhook_events" => req.webhook_events = typed("webhook_events", "an array of event names", value)?,
                _ => return Err(ValidationError::UnknownField(key)),
            }
        }
        Ok(req)
    }
}

/// `image` / `mask`: a string (inline data) or a stored object's reference.
fn image_input(field: &'static str, value: Value) -> Result<Option<ImageInput>, ValidationError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(ImageInput::Inline(s))),
        Value::Object(_) => typed(field, "a base64 string or a `data:` URL", value).map(|s| s.map(ImageInput::Stored)),
        other => Err(ValidationError::WrongType {
            field,
            expected: "a base64 string or a `data:` URL",
            got: kind(&other).to_string(),
        }),
    }
}

/// `loras`: an array of `{"name": …, "scale": …}`, each member checked by
/// name so that an error says which entry and which key.
fn loras(value: Value) -> Result<Option<Vec<LoraRequest>>, ValidationError> {
    const EXPECTED: &str = "an array of {\"name\": string, \"scale\": number}";
    let items = match value {
        Value::Null => return Ok(None),
        Value::Array(items) => items,
        other => {
            return Err(ValidationError::WrongType {
                field: "loras",
                expected: EXPECTED,
                got: kind(&other).to_string(),
            })
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let Value::Object(map) = item else {
            return Err(ValidationError::LoraEntry {
                index,
                reason: format!("must be an object, got {}", kind(&item)),
            });
        };
        let mut lora = LoraRequest {
            name: String::new(),
            scale: None,
            sha256: None,
        };
        let mut named = false;
        for (key, value) in map {
            let wrong = |expected: &str| ValidationError::LoraEntry {
                index,
                reason: format!("`{key}` must be {expected}, got {}", kind(&value)),
            };
            match key.as_str() {
                "name" => {
                    lora.name = value.as_str().ok_or_else(|| wrong("a string"))?.to_string();
                    named = true;
                }
                "scale" if value.is_null() => {}
                "scale" => lora.scale = Some(value.as_f64().ok_or_else(|| wrong("a number"))?),
                "sha256" if value.is_null() => {}
                "sha256" => lora.sha256 = Some(value.as_str().ok_or_else(|| wrong("a string"))?.to_string()),
                _ => {
                    return Err(ValidationError::LoraEntry {
                        index,
                        reason: format!("unknown key `{key}` (name, scale and sha256 are)"),
                    })
                }
            }
        }
        if !named {
            return Err(ValidationError::LoraEntry {
                index,
                reason: "`name` is required".into(),
            });
        }
        out.push(lora);
    }
    Ok(Some(out))
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
