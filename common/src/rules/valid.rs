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
    Caps, JobRequest, OutputFormat, Scheduler, ValidationError, DEFAULT_GUIDANCE_SCALE, DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_PREVIEW_EVERY, DEFAULT_PRIORITY, DEFAULT_SIZE, DEFAULT_STEPS, GUIDANCE_RANGE, NUM_IMAGES_RANGE,
    PREVIEW_EVERY_RANGE, PRIORITY_RANGE, PROMPT_MAX_CHARS, SIZE_MULTIPLE, SIZE_RANGE, STEPS_RANGE,
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
        }
    }
}

fn in_range(value: i64, (lo, hi): (i64, i64)) -> bool {
    (lo..=hi).contains(&value)
}

fn size(field: &'static str, value: Option<i64>) -> Result<u32, ValidationError> {
    let value = value.unwrap_or(DEFAULT_SIZE);
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
    let width = size("width", req.width)?;
    let height = size("height", req.height)?;
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
    })
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
