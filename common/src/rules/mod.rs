//! The rules of a generation request, in one place: every field's default
//! and range ([`DEFAULT_STEPS`], [`STEPS_RANGE`], …), the wire form
//! ([`JobRequest`]), the one error variant per rule ([`ValidationError`]),
//! the checked form ([`ValidJob`], from [`validate`]) and the rules as data
//! for clients ([`RequestLimits`]: `GET /v1/limits`, the web page's form).
//!
//! The dispatcher validates at the edge; the worker validates again what it
//! takes off the queue, and its `generate` command takes its defaults and
//! checks from here.
//!
//! Adding a request field touches: [`JobRequest`] (the field, its doc comment
//! — it becomes the OpenAPI description and the CLI flag's help — and its
//! line in `from_value`), [`ValidJob`] and `valid.rs` (the rule, the default,
//! `to_request`), `error.rs` (the rule's variant and its `field`), `limits.rs`
//! (what clients are told), then the worker's engine job
//! (`worker/src/service/job.rs`) and the docs.

mod error;
mod limits;
mod request;
mod scheduler;
mod valid;
mod webhook;

pub use error::ValidationError;
pub use limits::{
    ChoiceLimit, IntegerLimit, LorasLimit, NumberLimit, RequestLimits, StrengthLimit, TextLimit, WebhookLimit,
};
pub use request::{ImageInput, JobRequest, LoraRequest, OutputFormat, StoredImage};
pub use scheduler::Scheduler;
pub use valid::{random_seed, valid_lora_name, validate, validate_within, JobLora, ValidJob};
pub use webhook::{Webhook, WebhookEvent, WEBHOOK_URL_MAX_CHARS};

/// Default negative prompt; an empty string means none.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "blurry, low quality";
pub const DEFAULT_STEPS: i64 = 20;
pub const DEFAULT_SIZE: i64 = 1024;
pub const DEFAULT_GUIDANCE_SCALE: f64 = 5.0;
/// The sampler of a job that names none: SDXL base's own (`EulerDiscreteScheduler`).
pub const DEFAULT_SCHEDULER: &str = "euler";
pub const DEFAULT_PREVIEW_EVERY: i64 = 5;
pub const DEFAULT_PRIORITY: i64 = 5;
pub const PROMPT_MAX_CHARS: usize = 2000;
pub const STEPS_RANGE: (i64, i64) = (1, 100);
pub const SIZE_RANGE: (i64, i64) = (256, 2048);
pub const SIZE_MULTIPLE: i64 = 8;
pub const GUIDANCE_RANGE: (f64, f64) = (0.0, 30.0);
pub const NUM_IMAGES_RANGE: (i64, i64) = (1, 16);
/// Previews every N steps: 0 (none) up to the largest step count.
pub const PREVIEW_EVERY_RANGE: (i64, i64) = (0, STEPS_RANGE.1);
pub const PRIORITY_RANGE: (i64, i64) = (0, 9);
/// img2img's strength when a job has an image and no strength (diffusers'
/// `StableDiffusionXLImg2ImgPipeline` default).
pub const DEFAULT_STRENGTH: f64 = 0.3;
/// Inpainting's strength when a job has a mask and no strength (diffusers'
/// `StableDiffusionXLInpaintPipeline` default: nearly all of the masked
/// region repainted).
pub const DEFAULT_INPAINT_STRENGTH: f64 = 0.9999;
/// `strength`: above 0 (at least one step must run), at most 1.
pub const STRENGTH_RANGE: (f64, f64) = (0.0, 1.0);
/// A LoRA's scale (its weight in `set_adapters`, A1111's `<lora:name:scale>`).
pub const LORA_SCALE_RANGE: (f64, f64) = (-4.0, 4.0);
/// The scale of a LoRA named without one.
pub const DEFAULT_LORA_SCALE: f64 = 1.0;
/// LoRAs per job unless the operator says otherwise (`SDXL_MAX_LORAS`).
pub const DEFAULT_MAX_LORAS: u32 = 4;
/// The most LoRAs `SDXL_MAX_LORAS` may allow.
pub const MAX_LORAS_LIMIT: u32 = 16;
/// A LoRA's registry name: 1 to this many of `A-Z a-z 0-9 . _ -`.
pub const LORA_NAME_MAX_CHARS: usize = 64;
/// An input image's encoded size unless the operator says otherwise
/// (`SDXL_MAX_IMAGE_BYTES`), decoded from base64.
pub const DEFAULT_MAX_IMAGE_BYTES: usize = 10 * 1024 * 1024;

/// What one job may ask of the GPUs on this deployment: the operator's caps
/// (`SDXL_MAX_STEPS`, `SDXL_MAX_PIXELS`, `SDXL_MAX_IMAGES`), at most the
/// ranges above, which are what the model and the engine accept at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub max_steps: u32,
    /// Width × height of one image.
    pub max_pixels: u64,
    pub max_images: u32,
    /// LoRAs per job (`SDXL_MAX_LORAS`).
    pub max_loras: u32,
    /// An input image's encoded bytes (`SDXL_MAX_IMAGE_BYTES`).
    pub max_image_bytes: usize,
}

impl Default for Caps {
    /// No tighter than the ranges themselves.
    fn default() -> Self {
        Caps {
            max_steps: STEPS_RANGE.1 as u32,
            max_pixels: (SIZE_RANGE.1 * SIZE_RANGE.1) as u64,
            max_images: NUM_IMAGES_RANGE.1 as u32,
            max_loras: MAX_LORAS_LIMIT,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
        }
    }
}

impl Caps {
    /// Checks that each cap lies within what the ranges allow, naming the
    /// setting that does not.
    pub fn checked(self) -> Result<Self, String> {
        let hard = Caps::default();
        let min_pixels = (SIZE_RANGE.0 * SIZE_RANGE.0) as u64;
        if !(STEPS_RANGE.0 as u32..=hard.max_steps).contains(&self.max_steps) {
            return Err(format!(
                "max steps must be between {} and {}, got {}",
                STEPS_RANGE.0, hard.max_steps, self.max_steps
            ));
        }
        if !(min_pixels..=hard.max_pixels).contains(&self.max_pixels) {
            return Err(format!(
                "max pixels must be between {min_pixels} and {}, got {}",
                hard.max_pixels, self.max_pixels
            ));
        }
        if !(NUM_IMAGES_RANGE.0 as u32..=hard.max_images).contains(&self.max_images) {
            return Err(format!(
                "max images must be between {} and {}, got {}",
                NUM_IMAGES_RANGE.0, hard.max_images, self.max_images
            ));
        }
        if self.max_image_bytes == 0 {
            return Err("max image bytes must be above 0".into());
        }
        if self.max_loras > MAX_LORAS_LIMIT {
            return Err(format!(
                "max LoRAs must be at most {MAX_LORAS_LIMIT}, got {}",
                self.max_loras
            ));
        }
        Ok(self)
    }
}
