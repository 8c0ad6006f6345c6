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
    Caps, ImageInput, JobRequest, LoraRequest, OutputFormat, Scheduler, StoredImage, ValidationError,
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
    let Some(image) = image else {
        if mask.is_some() {
            return Err(ValidationError::MaskWithoutImage);
        }
        if let Some(value) = strength {
            return Err(ValidationError::StrengthWithoutImage(value));
        }
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
    // `contains` is false for NaN; 0 itself is refused (no step would run).
    if !(strength > STRENGTH_RANGE.0 && strength <= STRENGTH_RANGE.1) {
        return Err(ValidationError::Strength(strength));
    }
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
mod tests {
    use super::*;

    fn ok() -> JobRequest {
        JobRequest {
            prompt: Some("a lighthouse at dusk".into()),
            ..Default::default()
        }
    }

    fn check(req: JobRequest) -> Result<ValidJob, ValidationError> {
        validate(&req, || 42)
    }

    #[test]
    fn defaults_are_filled() {
        let job = check(ok()).unwrap();
        assert_eq!(job.negative_prompt, "blurry, low quality");
        assert_eq!(job.num_inference_steps, 20);
        assert_eq!((job.width, job.height), (1024, 1024));
        assert_eq!(job.guidance_scale, 5.0);
        assert_eq!(job.seed, 42, "a missing seed is drawn");
        assert_eq!(job.num_images, None, "one image per rank");
        assert_eq!(job.preview_every, 5);
        assert_eq!(job.output_format, OutputFormat::Png);
        assert_eq!(job.priority, 5);
    }

    #[test]
    fn given_values_are_kept() {
        let req = JobRequest {
            negative_prompt: Some(String::new()),
            num_inference_steps: Some(1),
            width: Some(256),
            height: Some(2048),
            guidance_scale: Some(0.0),
            seed: Some(7),
            num_images: Some(16),
            preview_every: Some(0),
            output_format: Some("webp".into()),
            priority: Some(9),
            ..ok()
        };
        let job = check(req).unwrap();
        assert_eq!(job.negative_prompt, "");
        assert_eq!((job.num_inference_steps, job.width, job.height), (1, 256, 2048));
        assert_eq!((job.seed, job.num_images, job.preview_every), (7, Some(16), 0));
        assert_eq!((job.output_format, job.priority), (OutputFormat::Webp, 9));
    }

    #[test]
    fn round_trip_through_the_wire_form_is_identity() {
        let job = check(JobRequest {
            num_images: Some(3),
            ..ok()
        })
        .unwrap();
        assert_eq!(validate(&job.to_request(), || unreachable!()).unwrap(), job);
    }

    #[test]
    fn caps_tighten_the_ranges_and_name_the_field() {
        let caps = Caps {
            max_steps: 30,
            max_pixels: 512 * 512,
            max_images: 4,
            max_loras: 2,
            max_image_bytes: 1 << 20,
        }
        .checked()
        .unwrap();
        let within = |req: JobRequest| validate_within(&req, &caps, || 1);
        let base = JobRequest {
            width: Some(512),
            height: Some(512),
            ..ok()
        };
        assert!(within(JobRequest {
            num_inference_steps: Some(30),
            num_images: Some(4),
            ..base.clone()
        })
        .is_ok());
        let e = within(JobRequest {
            num_inference_steps: Some(31),
            ..base.clone()
        })
        .unwrap_err();
        assert_eq!(e.field(), "num_inference_steps");
        assert!(e.to_string().contains("at most 30"), "{e}");
        let e = within(JobRequest {
            width: Some(1024),
            ..base.clone()
        })
        .unwrap_err();
        assert_eq!(e.field(), "width");
        assert!(e.to_string().contains("262144 pixels"), "{e}");
        let e = within(JobRequest {
            num_images: Some(5),
            ..base.clone()
        })
        .unwrap_err();
        assert_eq!(e.field(), "num_images");
        // The ranges still come first: 101 steps is out of range, not over the cap.
        let e = within(JobRequest {
            num_inference_steps: Some(101),
            ..base
        })
        .unwrap_err();
        assert_eq!(e, ValidationError::Steps(101));
        assert!(Caps { max_steps: 101, ..caps }.checked().is_err());
        assert!(Caps { max_images: 0, ..caps }.checked().is_err());
        assert!(Caps {
            max_pixels: 1000,
            ..caps
        }
        .checked()
        .is_err());
    }

    fn err(req: JobRequest) -> ValidationError {
        check(req).unwrap_err()
    }

    fn stored(key: &str, width: u32, height: u32) -> Option<ImageInput> {
        Some(ImageInput::Stored(StoredImage {
            key: key.into(),
            width,
            height,
        }))
    }

    #[test]
    fn img2img_takes_the_image_size_and_diffusers_strengths() {
        let job = check(JobRequest {
            image: stored("jobs/x/input.png", 1023, 517),
            ..ok()
        })
        .unwrap();
        assert_eq!((job.width, job.height), (1016, 512), "rounded down to 8");
        assert_eq!((job.strength, job.mode()), (Some(DEFAULT_STRENGTH), "img2img"));
        let job = check(JobRequest {
            image: stored("jobs/x/input.png", 600, 600),
            mask: stored("jobs/x/mask.png", 600, 600),
            width: Some(1024),
            ..ok()
        })
        .unwrap();
        assert_eq!((job.width, job.height), (1024, 600), "a given side resizes");
        assert_eq!(
            (job.strength, job.mode()),
            (Some(DEFAULT_INPAINT_STRENGTH), "inpainting")
        );
        assert_eq!(validate(&job.to_request(), || unreachable!()).unwrap(), job);
    }

    #[test]
    fn image_mask_and_strength_rules() {
        let image = stored("jobs/x/input.png", 512, 512);
        let e = err(JobRequest {
            image: Some(ImageInput::Inline("aGVsbG8=".into())),
            ..ok()
        });
        assert_eq!(e.field(), "image");
        let e = err(JobRequest {
            image: stored("k", 100, 900),
            ..ok()
        });
        assert_eq!(
            e,
            ValidationError::ImageSize {
                field: "width",
                value: 96
            }
        );
        assert_eq!(e.field(), "image");
        assert!(check(JobRequest {
            image: stored("k", 100, 900),
            width: Some(512),
            ..ok()
        })
        .is_ok());
        let e = err(JobRequest {
            mask: stored("m", 512, 512),
            ..ok()
        });
        assert_eq!(e, ValidationError::MaskWithoutImage);
        let e = err(JobRequest {
            image: image.clone(),
            mask: stored("m", 512, 504),
            ..ok()
        });
        assert_eq!(e.field(), "mask");
        assert!(e.to_string().contains("512×512, got 512×504"), "{e}");
        let e = err(JobRequest {
            strength: Some(0.5),
            ..ok()
        });
        assert_eq!(e.field(), "strength");
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            let e = err(JobRequest {
                image: image.clone(),
                strength: Some(bad),
                ..ok()
            });
            assert_eq!(e.field(), "strength", "{bad}");
        }
        // 20 steps × 0.04 = 0.8: no step would run.
        let e = err(JobRequest {
            image: image.clone(),
            strength: Some(0.04),
            ..ok()
        });
        assert_eq!(
            e,
            ValidationError::StrengthNoSteps {
                strength: 0.04,
                steps: 20
            }
        );
        assert!(check(JobRequest {
            image,
            strength: Some(0.05),
            ..ok()
        })
        .is_ok());
    }

    #[test]
    fn lora_rules() {
        let lora = |name: &str, scale: Option<f64>| LoraRequest {
            name: name.into(),
            scale,
            sha256: None,
        };
        let job = check(JobRequest {
            loras: Some(vec![lora("pixel-art_v2.1", None), lora("b", Some(-0.5))]),
            ..ok()
        })
        .unwrap();
        assert_eq!(job.loras[0].scale, DEFAULT_LORA_SCALE);
        assert_eq!(job.loras[1].scale, -0.5);
        assert_eq!(validate(&job.to_request(), || unreachable!()).unwrap(), job);
        let cases = [
            (vec![lora("a", Some(4.5))], "loras[0].scale"),
            (vec![lora("a", Some(f64::NAN))], "loras[0].scale"),
            (vec![lora("a", None), lora("../x", None)], "loras[1].name"),
            (vec![lora(".hidden", None)], "loras[0].name"),
            (vec![lora("", None)], "loras[0].name"),
            (vec![lora("a", None), lora("a", Some(0.5))], "named twice"),
        ];
        for (loras, says) in cases {
            let e = err(JobRequest {
                loras: Some(loras),
                ..ok()
            });
            assert_eq!(e.field(), "loras");
            assert!(e.to_string().contains(says), "{e}");
        }
        let caps = Caps {
            max_loras: 1,
            ..Caps::default()
        };
        let e = validate_within(
            &JobRequest {
                loras: Some(vec![lora("a", None), lora("b", None)]),
                ..ok()
            },
            &caps,
            || 1,
        )
        .unwrap_err();
        assert_eq!(e, ValidationError::TooManyLoras { count: 2, cap: 1 });
        let e = err(JobRequest {
            loras: Some(vec![LoraRequest {
                sha256: Some("abc".into()),
                ..lora("a", None)
            }]),
            ..ok()
        });
        assert!(e.to_string().contains("64 hexadecimal"), "{e}");
    }

    #[test]
    fn lora_entries_are_parsed_by_name() {
        let parse = |body: &str| JobRequest::from_json(body.as_bytes());
        let req = parse(r#"{"prompt":"p","loras":[{"name":"a","scale":0.8},{"name":"b"}]}"#).unwrap();
        assert_eq!(req.loras.unwrap().len(), 2);
        for (body, says) in [
            (r#"{"prompt":"p","loras":"a"}"#, "`loras` must be an array"),
            (r#"{"prompt":"p","loras":[3]}"#, "`loras[0]` must be an object"),
            (r#"{"prompt":"p","loras":[{"scale":1}]}"#, "`name` is required"),
            (
                r#"{"prompt":"p","loras":[{"name":"a","weight":1}]}"#,
                "unknown key `weight`",
            ),
            (
                r#"{"prompt":"p","loras":[{"name":"a","scale":"x"}]}"#,
                "`scale` must be a number",
            ),
            (r#"{"prompt":"p","image":5}"#, "`image` must be a base64 string"),
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.to_string().contains(says), "{body}: {e}");
        }
        let req = parse(r#"{"prompt":"p","image":"data:image/png;base64,AAAA"}"#).unwrap();
        assert!(matches!(req.image, Some(ImageInput::Inline(_))));
    }

    #[test]
    fn prompt_rules() {
        let e = err(JobRequest::default());
        assert_eq!((e.field(), e.to_string().as_str()), ("prompt", "`prompt` is required"));
        let e = err(JobRequest {
            prompt: Some(String::new()),
            ..ok()
        });
        assert_eq!(e, ValidationError::PromptLength(0));
        assert!(e.to_string().contains("1 to 2000"), "{e}");
        // Characters, not bytes: 2000 multi-byte characters are fine.
        assert!(check(JobRequest {
            prompt: Some("é".repeat(2000)),
            ..ok()
        })
        .is_ok());
        let e = err(JobRequest {
            prompt: Some("x".repeat(2001)),
            ..ok()
        });
        assert_eq!(e, ValidationError::PromptLength(2001));
        let e = err(JobRequest {
            negative_prompt: Some("x".repeat(2001)),
            ..ok()
        });
        assert_eq!(e.field(), "negative_prompt");
    }

    #[test]
    fn steps_rule() {
        for bad in [0, 101, -1] {
            let e = err(JobRequest {
                num_inference_steps: Some(bad),
                ..ok()
            });
            assert_eq!(e.field(), "num_inference_steps");
            assert!(e.to_string().contains(&format!("between 1 and 100, got {bad}")), "{e}");
        }
        assert!(check(JobRequest {
            num_inference_steps: Some(100),
            ..ok()
        })
        .is_ok());
    }

    #[test]
    fn size_rules() {
        for (w, h, field) in [(248, 1024, "width"), (1024, 2056, "height"), (-8, 1024, "width")] {
            let e = err(JobRequest {
                width: Some(w),
                height: Some(h),
                ..ok()
            });
            assert!(matches!(e, ValidationError::SizeRange { .. }), "{e}");
            assert_eq!(e.field(), field);
            assert!(e.to_string().contains("between 256 and 2048"), "{e}");
        }
        let e = err(JobRequest {
            height: Some(1001),
            ..ok()
        });
        assert_eq!(
            e,
            ValidationError::SizeMultiple {
                field: "height",
                value: 1001
            }
        );
        assert_eq!(e.to_string(), "`height` must be a multiple of 8, got 1001");
    }

    #[test]
    fn guidance_rule() {
        for bad in [-0.1, 30.5, f64::NAN, f64::INFINITY] {
            let e = err(JobRequest {
                guidance_scale: Some(bad),
                ..ok()
            });
            assert_eq!(e.field(), "guidance_scale");
        }
        assert!(check(JobRequest {
            guidance_scale: Some(30.0),
            ..ok()
        })
        .is_ok());
    }

    #[test]
    fn num_images_rule() {
        for bad in [0, 17, -3] {
            let e = err(JobRequest {
                num_images: Some(bad),
                ..ok()
            });
            assert_eq!(e, ValidationError::NumImages(bad));
            assert!(e.to_string().contains("between 1 and 16"));
        }
    }

    #[test]
    fn preview_every_rule() {
        for bad in [-1, 101] {
            assert_eq!(
                err(JobRequest {
                    preview_every: Some(bad),
                    ..ok()
                })
                .field(),
                "preview_every"
            );
        }
    }

    #[test]
    fn output_format_rule() {
        let e = err(JobRequest {
            output_format: Some("gif".into()),
            ..ok()
        });
        assert_eq!(e.field(), "output_format");
        assert!(e.to_string().contains("`gif`"), "{e}");
        for ok_format in ["png", "jpeg", "webp"] {
            let req = JobRequest {
                output_format: Some(ok_format.into()),
                ..ok()
            };
            assert_eq!(check(req).unwrap().output_format.to_string(), ok_format);
        }
    }

    #[test]
    fn priority_rule() {
        for bad in [-1, 10] {
            let e = err(JobRequest {
                priority: Some(bad),
                ..ok()
            });
            assert_eq!(e, ValidationError::Priority(bad));
            assert!(e.to_string().contains("between 0 and 9"));
        }
    }

    #[test]
    fn decoding_errors_name_the_field() {
        let e = JobRequest::from_json(br#"{"prompt":"x","steps":3}"#).unwrap_err();
        assert_eq!(e, ValidationError::UnknownField("steps".into()));
        let e = JobRequest::from_json(br#"{"prompt":"x","width":"wide"}"#).unwrap_err();
        assert_eq!(e.field(), "width");
        assert_eq!(e.to_string(), r#"`width` must be an integer, got "wide""#);
        let e = JobRequest::from_json(br#"{"prompt":"x","seed":-1}"#).unwrap_err();
        assert_eq!(e.field(), "seed");
        assert_eq!(JobRequest::from_json(b"[1]").unwrap_err().field(), "body");
        assert_eq!(JobRequest::from_json(b"{").unwrap_err().field(), "body");
        let ok = JobRequest::from_json(br#"{"prompt":"x","width":512,"seed":18446744073709551615}"#).unwrap();
        assert_eq!((ok.width, ok.seed), (Some(512), Some(u64::MAX)));
        // null means "not given".
        assert_eq!(
            JobRequest::from_json(br#"{"prompt":"x","width":null}"#).unwrap().width,
            None
        );
    }

    #[test]
    fn unknown_fields_are_refused_when_decoding() {
        let e = serde_json::from_str::<JobRequest>(r#"{"prompt":"x","steps":3}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `steps`"), "{e}");
    }
}
