//! One error variant per rule of a request, each naming the field, the value
//! received and the allowed range (as TGI's `validation.rs`);
//! [`ValidationError::field`] gives the field alone for API clients.

use super::{
    Scheduler, GUIDANCE_RANGE, LORA_NAME_MAX_CHARS, LORA_SCALE_RANGE, NUM_IMAGES_RANGE, PREVIEW_EVERY_RANGE,
    PRIORITY_RANGE, PROMPT_MAX_CHARS, SIZE_MULTIPLE, SIZE_RANGE, STEPS_RANGE,
};

/// One variant per rule; the message names the field, the value and the bound.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("the request body must be a JSON object: {0}")]
    Malformed(String),
    #[error("unknown field `{0}`")]
    UnknownField(String),
    #[error("`{field}` must be {expected}, got {got}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("`prompt` is required")]
    PromptMissing,
    #[error("`prompt` must be 1 to {PROMPT_MAX_CHARS} characters, got {0}")]
    PromptLength(usize),
    #[error("`negative_prompt` must be at most {PROMPT_MAX_CHARS} characters, got {0}")]
    NegativePromptLength(usize),
    #[error("`num_inference_steps` must be between {lo} and {hi}, got {0}", lo = STEPS_RANGE.0, hi = STEPS_RANGE.1)]
    Steps(i64),
    #[error("`{field}` must be between {lo} and {hi}, got {value}", lo = SIZE_RANGE.0, hi = SIZE_RANGE.1)]
    SizeRange { field: &'static str, value: i64 },
    #[error("`{field}` must be a multiple of {SIZE_MULTIPLE}, got {value}")]
    SizeMultiple { field: &'static str, value: i64 },
    #[error("`guidance_scale` must be a number between {lo} and {hi}, got {0}", lo = GUIDANCE_RANGE.0, hi = GUIDANCE_RANGE.1)]
    GuidanceScale(f64),
    #[error("`num_images` must be between {lo} and {hi}, got {0}", lo = NUM_IMAGES_RANGE.0, hi = NUM_IMAGES_RANGE.1)]
    NumImages(i64),
    #[error("`preview_every` must be between {lo} and {hi} (0 = no previews), got {0}", lo = PREVIEW_EVERY_RANGE.0, hi = PREVIEW_EVERY_RANGE.1)]
    PreviewEvery(i64),
    #[error("`scheduler` must be one of {allowed}, got `{0}`", allowed = Scheduler::names())]
    Scheduler(String),
    #[error("`output_format` must be one of png, jpeg, webp, got `{0}`")]
    OutputFormat(String),
    #[error("`priority` must be between {lo} and {hi}, got {0}", lo = PRIORITY_RANGE.0, hi = PRIORITY_RANGE.1)]
    Priority(i64),
    #[error("`num_inference_steps` must be at most {cap} on this server, got {value}")]
    StepsOverCap { value: i64, cap: u32 },
    #[error("`width` × `height` must be at most {cap} pixels on this server, got {width}×{height} = {}", width * height)]
    PixelsOverCap { width: u64, height: u64, cap: u64 },
    #[error("`num_images` must be at most {cap} on this server, got {value}")]
    NumImagesOverCap { value: i64, cap: u32 },
    #[error("`{field}` must be a PNG, JPEG or WebP image, base64 or a `data:` URL: {reason}")]
    ImageUndecodable { field: &'static str, reason: String },
    #[error("`{field}` must be at most {cap} bytes once decoded from base64, got {bytes}")]
    ImageTooLarge {
        field: &'static str,
        bytes: usize,
        cap: usize,
    },
    #[error("`{field}` must be sent as image data (base64 or a `data:` URL), not as a stored object")]
    ImageStoredByClient { field: &'static str },
    #[error("`{field}` reached validation as inline data: inputs are stored under the job's prefix first, and a queue message carries only their keys")]
    ImageNotStored { field: &'static str },
    #[error("`{field}` is the image's {value} pixels (its size rounded down to a multiple of {SIZE_MULTIPLE}), outside {lo}–{hi}: give `width` and `height` to resize it", lo = SIZE_RANGE.0, hi = SIZE_RANGE.1)]
    ImageSize { field: &'static str, value: i64 },
    #[error("`mask` needs an `image` to repaint")]
    MaskWithoutImage,
    #[error("`mask` must be the image's size, {}×{}, got {}×{}", image.0, image.1, mask.0, mask.1)]
    MaskSize { mask: (u32, u32), image: (u32, u32) },
    #[error("`strength` must be above 0 and at most 1, got {0}")]
    Strength(f64),
    #[error("`strength` {strength} of {steps} steps runs int({steps} × {strength}) = 0 steps: raise `strength` to at least 1/{steps} or raise `num_inference_steps`")]
    StrengthNoSteps { strength: f64, steps: i64 },
    #[error("`loras` may name at most {cap} LoRAs on this server, got {count}")]
    TooManyLoras { count: usize, cap: u32 },
    #[error("`loras[{index}]` {reason}")]
    LoraEntry { index: usize, reason: String },
    #[error("`loras[{index}].name` must be 1 to {LORA_NAME_MAX_CHARS} of A-Z a-z 0-9 . _ - (not starting with `.`), got `{name}`")]
    LoraName { index: usize, name: String },
    #[error("`loras[{index}].name` `{name}` is named twice: give it once, with one scale")]
    LoraTwice { index: usize, name: String },
    #[error("`loras[{index}].scale` must be between {lo} and {hi}, got {value}", lo = LORA_SCALE_RANGE.0, hi = LORA_SCALE_RANGE.1)]
    LoraScale { index: usize, value: f64 },
    #[error("`loras[{index}].sha256` must be 64 hexadecimal digits, got `{value}`")]
    LoraDigest { index: usize, value: String },
    #[error("`loras[{index}].name` `{name}` is not in the LoRA registry; it has: {known}")]
    UnknownLora { index: usize, name: String, known: String },
    #[error("`webhook_url` must be an absolute http or https URL: {reason}, got `{value}`")]
    WebhookUrl { value: String, reason: String },
    /// The dispatcher's check of where the URL points (public addresses,
    /// https), which needs DNS and the server's settings.
    #[error("`webhook_url` {reason}, got `{value}`")]
    WebhookTarget { value: String, reason: String },
    #[error("`webhook_events` must each be one of {allowed}, got `{0}`", allowed = super::WebhookEvent::names())]
    WebhookEvent(String),
    #[error("`webhook_events` must name at least one of {allowed} (leave it out for succeeded, failed, cancelled), got []", allowed = super::WebhookEvent::names())]
    WebhookEventsEmpty,
    #[error("`loras[{index}].sha256` does not match `{name}` in the registry (its sha256 is {current})")]
    LoraChanged {
        index: usize,
        name: String,
        current: String,
    },
}

impl ValidationError {
    /// The request field the rule is about.
    pub fn field(&self) -> &str {
        match self {
            ValidationError::Malformed(_) => "body",
            ValidationError::UnknownField(field) => field,
            ValidationError::WrongType { field, .. } => field,
            ValidationError::PromptMissing | ValidationError::PromptLength(_) => "prompt",
            ValidationError::NegativePromptLength(_) => "negative_prompt",
            ValidationError::Steps(_) | ValidationError::StepsOverCap { .. } => "num_inference_steps",
            ValidationError::PixelsOverCap { .. } => "width",
            ValidationError::NumImagesOverCap { .. } => "num_images",
            ValidationError::SizeRange { field, .. } | ValidationError::SizeMultiple { field, .. } => field,
            ValidationError::GuidanceScale(_) => "guidance_scale",
            ValidationError::NumImages(_) => "num_images",
            ValidationError::PreviewEvery(_) => "preview_every",
            ValidationError::Scheduler(_) => "scheduler",
            ValidationError::OutputFormat(_) => "output_format",
            ValidationError::Priority(_) => "priority",
            ValidationError::ImageUndecodable { field, .. }
            | ValidationError::ImageTooLarge { field, .. }
            | ValidationError::ImageStoredByClient { field }
            | ValidationError::ImageNotStored { field } => field,
            ValidationError::ImageSize { .. } => "image",
            ValidationError::MaskWithoutImage | ValidationError::MaskSize { .. } => "mask",
            ValidationError::Strength(_) | ValidationError::StrengthNoSteps { .. } => "strength",
            ValidationError::TooManyLoras { .. }
            | ValidationError::LoraEntry { .. }
            | ValidationError::LoraName { .. }
            | ValidationError::LoraTwice { .. }
            | ValidationError::LoraScale { .. }
            | ValidationError::LoraDigest { .. }
            | ValidationError::UnknownLora { .. }
            | ValidationError::LoraChanged { .. } => "loras",
            ValidationError::WebhookUrl { .. } | ValidationError::WebhookTarget { .. } => "webhook_url",
            ValidationError::WebhookEvent(_) | ValidationError::WebhookEventsEmpty => "webhook_events",
        }
    }
}
