//! Turns a [`JobRequest`] into a [`ValidJob`] that the rest of the code can
//! trust, with one error variant per rule (as TGI's `validation.rs`). Every
//! message names the field, the value received and the allowed range, and
//! [`ValidationError::field`] gives the field alone for API clients.
//!
//! The dispatcher validates at the edge; the worker validates again what it
//! takes off the queue, since anything can be published there.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    Caps, ImageInput, JobRequest, LoraRequest, OutputFormat, Scheduler, StoredImage, ValidationError, WebhookEvent,
    DEFAULT_GUIDANCE_SCALE, DEFAULT_INPAINT_STRENGTH, DEFAULT_LORA_SCALE, DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_PREVIEW_EVERY, DEFAULT_PRIORITY, DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_STRENGTH, GUIDANCE_RANGE,
    LORA_NAME_MAX_CHARS, LORA_SCALE_RANGE, NUM_IMAGES_RANGE, PREVIEW_EVERY_RANGE, PRIORITY_RANGE, PROMPT_MAX_CHARS,
    SIZE_MULTIPLE, SIZE_RANGE, STEPS_RANGE, STRENGTH_RANGE,
};

/// A request that passed every rule, with every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ValidJob {
    pub prompt: String,
    /// Empty: no negative prompt.
    pub negative_prompt: String,
    pub num_inference_steps: u32,
    pub width: u32,
    pub height: u32,
    pub guidance_scale: f64,
    /// The sampler (absent from records made before there was a choice: euler).
    #[serde(default)]
    pub scheduler: Scheduler,
    /// Drawn at validation when the request has none, so that a redelivered
    /// job makes the same images.
    pub seed: u64,
    /// `None`: one image per rank of the worker that runs the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_images: Option<u32>,
    pub preview_every: u32,
    pub output_format: OutputFormat,
    pub priority: u8,
    /// img2img / inpainting: the starting image, stored under the job's prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<StoredImage>,
    /// Inpainting: the mask, of the image's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<StoredImage>,
    /// Set exactly when `image` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<JobLora>,
    /// Where the status record is POSTed on `webhook_events` (the request's
    /// names, so that a job's wire form stays a request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// Sorted, each once; empty without `webhook_url`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhook_events: Vec<WebhookEvent>,
}

/// A LoRA of a valid job, its scale filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobLora {
    pub name: String,
    pub scale: f64,
    /// The registry file's digest (hex), once the dispatcher has looked it up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl ValidJob {
    /// The URL to POST `event` to, if the job's webhook wants it.
    pub fn webhook_for(&self, event: WebhookEvent) -> Option<&str> {
        self.webhook_url
            .as_deref()
            .filter(|_| self.webhook_events.contains(&event))
    }

    /// What kind of job this is, for logs and the page.
    pub fn mode(&self) -> &'static str {
        match (&self.image, &self.mask) {
            (None, _) => "text-to-image",
            (Some(_), None) => "img2img",
            (Some(_), Some(_)) => "inpainting",
        }
    }
}

impl ValidJob {
    /// Back to the wire form (what is published to the queue and re-validated there).
    pub fn to_request(&self) -> JobRequest {
        JobRequest {
            prompt: Some(self.prompt.clone()),
            negative_prompt: Some(self.negative_prompt.clone()),
            num_inference_steps: Some(self.num_inference_steps.into()),
            width: Some(self.width.into()),
            height: Some(self.height.into()),
            guidance_scale: Some(self.guidance_scale),
            scheduler: Some(self.scheduler.to_string()),
            seed: Some(self.seed),
            num_images: self.num_images.map(i64::from),
            preview_every: Some(self.preview_every.into()),
            output_format: Some(self.output_format.to_string()),
            priority: Some(self.priority.into()),
            image: self.image.clone().map(ImageInput::Stored),
            mask: self.mask.clone().map(ImageInput::Stored),
            strength: self.strength,
            loras: (!self.loras.is_empty()).then(|| {
                self.loras
                    .iter()
                    .map(|l| LoraRequest {
                        name: l.name.clone(),
                        scale: Some(l.scale),
                        sha256: l.sha256.clone(),
                    })
                    .collect()
            }),
            webhook_url: self.webhook_url.clone(),
            webhook_events: self
                .webhook_url
                .as_ref()
                .map(|_| self.webhook_events.iter().map(|e| e.to_string()).collect()),
        }
    }
}

fn in_range(value: i64, (lo, hi): (i64, i64)) -> bool {
    (lo..=hi).contains(&value)
}

fn size(field: &'static str, value: Option<i64>, image_side: Option<u32>) -> Result<u32, ValidationError> {
    let value = match (value, image_side) {
        (Some(v), _) => v,
        // diffusers' image processor: the image's size rounded down to the VAE's factor.
        (None, Some(side)) => {
            let side = i64::from(side) / SIZE_MULTIPLE * SIZE_MULTIPLE;
            if !in_range(side, SIZE_RANGE) {
                return Err(ValidationError::ImageSize { field, value: side });
            }
            side
        }
        (None, None) => DEFAULT_SIZE,
    };
    if !in_range(value, SIZE_RANGE) {
        return Err(ValidationError::SizeRange { field, value });
    }
    if value % SIZE_MULTIPLE != 0 {
        return Err(ValidationError::SizeMultiple { field, value });
    }
    Ok(value as u32)
}

/// Checks every rule in field order and fills the defaults. `draw_seed` is
/// called only when the request has no seed.
pub fn validate(req: &JobRequest, draw_seed: impl FnOnce() -> u64) -> Result<ValidJob, ValidationError> {
    validate_within(req, &Caps::default(), draw_seed)
}

/// As [`validate`], and within this deployment's `caps` too.
pub fn validate_within(
    req: &JobRequest,
    caps: &Caps,
    draw_seed: impl FnOnce() -> u64,
) -> Result<ValidJob, ValidationError> {
    let prompt = req.prompt.as_deref().ok_or(ValidationError::PromptMissing)?;
    let chars = prompt.chars().count();
    if chars == 0 || chars > PROMPT_MAX_CHARS {
        return Err(ValidationError::PromptLength(chars));
    }
    let negative_prompt = req
        .negative_prompt
        .clone()
        .unwrap_or_else(|| DEFAULT_NEGATIVE_PROMPT.to_string());
    let negative_chars = negative_prompt.chars().count();
    if negative_chars > PROMPT_MAX_CHARS {
        return Err(ValidationError::NegativePromptLength(negative_chars));
    }
    let steps = req.num_inference_steps.unwrap_or(DEFAULT_STEPS);
    if !in_range(steps, STEPS_RANGE) {
        return Err(ValidationError::Steps(steps));
    }
    if steps > i64::from(caps.max_steps) {
        return Err(ValidationError::StepsOverCap {
            value: steps,
            cap: caps.max_steps,
        });
    }
    let image = stored("image", req.image.as_ref())?;
    let mask = stored("mask", req.mask.as_ref())?;
    let width = size("width", req.width, image.map(|i| i.width))?;
    let height = size("height", req.height, image.map(|i| i.height))?;
    if u64::from(width) * u64::from(height) > caps.max_pixels {
        return Err(ValidationError::PixelsOverCap {
            width: width.into(),
            height: height.into(),
            cap: caps.max_pixels,
        });
    }
    let guidance_scale = req.guidance_scale.unwrap_or(DEFAULT_GUIDANCE_SCALE);
    // `contains` is false for NaN, so NaN is refused too.
    if !(GUIDANCE_RANGE.0..=GUIDANCE_RANGE.1).contains(&guidance_scale) {
        return Err(ValidationError::GuidanceScale(guidance_scale));
    }
    let scheduler = match req.scheduler.as_deref() {
        None => Scheduler::default(),
        Some(s) => s.parse().map_err(|_| ValidationError::Scheduler(s.to_string()))?,
    };
    let num_images = match req.num_images {
        None => None,
        Some(n) if !in_range(n, NUM_IMAGES_RANGE) => return Err(ValidationError::NumImages(n)),
        Some(n) if n > i64::from(caps.max_images) => {
            return Err(ValidationError::NumImagesOverCap {
                value: n,
                cap: caps.max_images,
            })
        }
        Some(n) => Some(n as u32),
    };
    let preview_every = req.preview_every.unwrap_or(DEFAULT_PREVIEW_EVERY);
    if !in_range(preview_every, PREVIEW_EVERY_RANGE) {
        return Err(ValidationError::PreviewEvery(preview_every));
    }
    let output_format = match req.output_format.as_deref() {
        None => OutputFormat::default(),
        Some(s) => s.parse().map_err(|_| ValidationError::OutputFormat(s.to_string()))?,
    };
    let priority = req.priority.unwrap_or(DEFAULT_PRIORITY);
    if !in_range(priority, PRIORITY_RANGE) {
        return Err(ValidationError::Priority(priority));
    }
    let strength = inputs(image, mask, req.strength, steps)?;
    let loras = loras(req.loras.as_deref().unwrap_or_default(), caps)?;
    let webhook = super::webhook::webhook(req.webhook_url.as_deref(), req.webhook_events.as_deref())?;
    let seed = match req.seed {
        Some(seed) => seed,
        None => draw_seed(),
    };
    Ok(ValidJob {
        prompt: prompt.to_string(),
        negative_prompt,
        num_inference_steps: steps as u32,
        width,
        height,
        guidance_scale,
        scheduler,
        seed,
        num_images,
        preview_every: preview_every as u32,
        output_format,
        priority: priority as u8,
        image: image.cloned(),
        mask: mask.cloned(),
        strength,
        loras,
        webhook_events: webhook.as_ref().map(|w| w.events.clone()).unwrap_or_default(),
        webhook_url: webhook.map(|w| w.url),
    })
}

/// An input image as validation sees it: stored by the dispatcher (inline
/// data never gets this far: the dispatcher decodes and stores it first, and
/// the queue must not carry it).
fn stored<'a>(field: &'static str, input: Option<&'a ImageInput>) -> Result<Option<&'a StoredImage>, ValidationError> {
    match input {
        None => Ok(None),
        Some(ImageInput::Stored(image)) => Ok(Some(image)),
        Some(ImageInput::Inline(_)) => Err(ValidationError::ImageNotStored { field }),
    }
}

/// The image, mask and strength rules; the strength a job runs with
/// (`None`: text-to-image).
fn inputs(
    image: Option<&StoredImage>,
    mask: Option<&StoredImage>,
    strength: Option<f64>,
    steps: i64,
) -> Result<Option<f64>, ValidationError> {
    // `contains` is false for NaN; 0 itself is refused (no step would run).
    let in_range = |s: f64| s > STRENGTH_RANGE.0 && s <= STRENGTH_RANGE.1;
    if let Some(s) = strength.filter(|s| !in_range(*s)) {
        return Err(ValidationError::Strength(s));
    }
    let Some(image) = image else {
        if mask.is_some() {
            return Err(ValidationError::MaskWithoutImage);
        }
        // Text to image: a strength in range is ignored (A1111's txt2img ignores its
        // denoising strength), so a client may send one form for both modes.
        return Ok(None);
    };
    if let Some(mask) = mask {
        if (mask.width, mask.height) != (image.width, image.height) {
            return Err(ValidationError::MaskSize {
                mask: (mask.width, mask.height),
                image: (image.width, image.height),
            });
        }
    }
    let default = if mask.is_some() {
        DEFAULT_INPAINT_STRENGTH
    } else {
        DEFAULT_STRENGTH
    };
    let strength = strength.unwrap_or(default);
    // diffusers: `int(num_inference_steps * strength)` steps run.
    if (steps as f64 * strength) as i64 == 0 {
        return Err(ValidationError::StrengthNoSteps { strength, steps });
    }
    Ok(Some(strength))
}

/// A registry name: 1–64 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn valid_lora_name(name: &str) -> bool {
    (1..=LORA_NAME_MAX_CHARS).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn loras(requested: &[LoraRequest], caps: &Caps) -> Result<Vec<JobLora>, ValidationError> {
    if requested.len() > caps.max_loras as usize {
        return Err(ValidationError::TooManyLoras {
            count: requested.len(),
            cap: caps.max_loras,
        });
    }
    let mut out: Vec<JobLora> = Vec::with_capacity(requested.len());
    for (index, lora) in requested.iter().enumerate() {
        if !valid_lora_name(&lora.name) {
            return Err(ValidationError::LoraName {
                index,
                name: lora.name.chars().take(80).collect(),
            });
        }
        if out.iter().any(|l| l.name == lora.name) {
            return Err(ValidationError::LoraTwice {
                index,
                name: lora.name.clone(),
            });
        }
        let scale = lora.scale.unwrap_or(DEFAULT_LORA_SCALE);
        if !(LORA_SCALE_RANGE.0..=LORA_SCALE_RANGE.1).contains(&scale) {
            return Err(ValidationError::LoraScale { index, value: scale });
        }
        if let Some(sha) = &lora.sha256 {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ValidationError::LoraDigest {
                    index,
                    value: sha.chars().take(80).collect(),
                });
            }
        }
        out.push(JobLora {
            name: lora.name.clone(),
            scale,
            sha256: lora.sha256.as_ref().map(|s| s.to_ascii_lowercase()),
        });
    }
    Ok(out)
}

/// A seed from the operating system's generator, for requests without one.
pub fn random_seed() -> u64 {
    rand::random()
}

#[cfg(test)]
mod tests;
