//! The rules of a request, as data: every field's range and default, taken
//! from the constants [`super::valid`] checks against, so that a client
//! (the web page's form, `GET /v1/limits`) shows the limits the dispatcher
//! really enforces and cannot drift from them.

use serde::Serialize;
use utoipa::ToSchema;

use super::{
    Caps, OutputFormat, Scheduler, DEFAULT_GUIDANCE_SCALE, DEFAULT_NEGATIVE_PROMPT, DEFAULT_PREVIEW_EVERY,
    DEFAULT_PRIORITY, DEFAULT_SCHEDULER, DEFAULT_SIZE, DEFAULT_STEPS, GUIDANCE_RANGE, NUM_IMAGES_RANGE,
    PREVIEW_EVERY_RANGE, PRIORITY_RANGE, PROMPT_MAX_CHARS, SIZE_MULTIPLE, SIZE_RANGE, STEPS_RANGE,
};
use super::{WebhookEvent, WEBHOOK_URL_MAX_CHARS};
use super::{
    DEFAULT_INPAINT_STRENGTH, DEFAULT_LORA_SCALE, DEFAULT_STRENGTH, LORA_NAME_MAX_CHARS, LORA_SCALE_RANGE,
    STRENGTH_RANGE,
};

/// A text field: its length in characters (not bytes).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TextLimit {
    pub min_chars: usize,
    pub max_chars: usize,
    /// `None`: required (no default).
    pub default: Option<&'static str>,
}

/// An integer field, both bounds included.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct IntegerLimit {
    pub min: u64,
    pub max: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiple_of: Option<u64>,
    /// `None`: decided elsewhere (the seed is drawn, the image count is one per rank).
    pub default: Option<u64>,
}

/// A number field, both bounds included.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct NumberLimit {
    pub min: f64,
    pub max: f64,
    pub default: f64,
}

/// A field that takes one of a few words.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChoiceLimit {
    pub one_of: Vec<&'static str>,
    pub default: &'static str,
}

/// Every field of a [`super::JobRequest`], in the order validation checks them.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RequestLimits {
    pub prompt: TextLimit,
    pub negative_prompt: TextLimit,
    pub num_inference_steps: IntegerLimit,
    pub width: IntegerLimit,
    pub height: IntegerLimit,
    pub guidance_scale: NumberLimit,
    pub scheduler: ChoiceLimit,
    pub num_images: IntegerLimit,
    pub preview_every: IntegerLimit,
    pub output_format: ChoiceLimit,
    pub priority: IntegerLimit,
    /// Any `u64`; drawn by the dispatcher when absent.
    pub seed: IntegerLimit,
    /// Width × height of one image may not exceed this (the deployment's cap).
    pub max_pixels: u64,
    /// img2img and inpainting.
    pub strength: StrengthLimit,
    pub loras: LorasLimit,
    /// An input image's encoded size (after base64 decoding).
    pub max_image_bytes: usize,
    pub webhook: WebhookLimit,
}

/// `webhook_url` and `webhook_events`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct WebhookLimit {
    pub url_max_chars: usize,
    /// The events `webhook_events` may name.
    pub events: Vec<&'static str>,
    /// The events of a job that names none.
    pub default_events: Vec<&'static str>,
}

/// `strength`: above `min` (exclusive), at most `max`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct StrengthLimit {
    /// Exclusive: at least one step must run (`int(steps × strength)` ≥ 1).
    pub min_exclusive: f64,
    pub max: f64,
    /// With an image and no mask.
    pub default_img2img: f64,
    /// With a mask.
    pub default_inpainting: f64,
}

/// `loras`: how many, and each one's scale.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LorasLimit {
    pub max_count: u32,
    pub scale: NumberLimit,
    pub name_max_chars: usize,
}

fn integer((lo, hi): (i64, i64), default: Option<i64>) -> IntegerLimit {
    // Every range starts at 0 or above, so the casts are exact.
    IntegerLimit {
        min: lo as u64,
        max: hi as u64,
        multiple_of: None,
        default: default.map(|d| d as u64),
    }
}

impl RequestLimits {
    /// The rules with no deployment caps (the ranges themselves).
    pub fn current() -> Self {
        Self::within(&Caps::default())
    }

    /// The rules a dispatcher with `caps` enforces.
    pub fn within(caps: &Caps) -> Self {
        // A side is at most what fits beside the smallest other side.
        let widest = (caps.max_pixels / SIZE_RANGE.0 as u64) as i64 / SIZE_MULTIPLE * SIZE_MULTIPLE;
        let size = IntegerLimit {
            multiple_of: Some(SIZE_MULTIPLE as u64),
            ..integer((SIZE_RANGE.0, SIZE_RANGE.1.min(widest)), Some(DEFAULT_SIZE))
        };
        RequestLimits {
            prompt: TextLimit {
                min_chars: 1,
                max_chars: PROMPT_MAX_CHARS,
                default: None,
            },
            negative_prompt: TextLimit {
                min_chars: 0,
                max_chars: PROMPT_MAX_CHARS,
                default: Some(DEFAULT_NEGATIVE_PROMPT),
            },
            num_inference_steps: integer(
                (STEPS_RANGE.0, STEPS_RANGE.1.min(caps.max_steps.into())),
                Some(DEFAULT_STEPS),
            ),
            width: size.clone(),
            height: size,
            guidance_scale: NumberLimit {
                min: GUIDANCE_RANGE.0,
                max: GUIDANCE_RANGE.1,
                default: DEFAULT_GUIDANCE_SCALE,
            },
            scheduler: ChoiceLimit {
                one_of: Scheduler::ALL.map(Scheduler::name).to_vec(),
                default: DEFAULT_SCHEDULER,
            },
            num_images: integer(
                (NUM_IMAGES_RANGE.0, NUM_IMAGES_RANGE.1.min(caps.max_images.into())),
                None,
            ),
            preview_every: integer(PREVIEW_EVERY_RANGE, Some(DEFAULT_PREVIEW_EVERY)),
            output_format: ChoiceLimit {
                one_of: OutputFormat::ALL.iter().map(|f| f.extension()).collect(),
                default: OutputFormat::default().extension(),
            },
            priority: integer(PRIORITY_RANGE, Some(DEFAULT_PRIORITY)),
            seed: IntegerLimit {
                min: 0,
                max: u64::MAX,
                multiple_of: None,
                default: None,
            },
            max_pixels: caps.max_pixels,
            strength: StrengthLimit {
                min_exclusive: STRENGTH_RANGE.0,
                max: STRENGTH_RANGE.1,
                default_img2img: DEFAULT_STRENGTH,
                default_inpainting: DEFAULT_INPAINT_STRENGTH,
            },
            loras: LorasLimit {
                max_count: caps.max_loras,
                scale: NumberLimit {
                    min: LORA_SCALE_RANGE.0,
                    max: LORA_SCALE_RANGE.1,
                    default: DEFAULT_LORA_SCALE,
                },
                name_max_chars: LORA_NAME_MAX_CHARS,
            },
            max_image_bytes: caps.max_image_bytes,
            webhook: WebhookLimit {
                url_max_chars: WEBHOOK_URL_MAX_CHARS,
                events: WebhookEvent::ALL.map(WebhookEvent::as_str).to_vec(),
                default_events: WebhookEvent::TERMINAL.map(WebhookEvent::as_str).to_vec(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{validate, JobRequest};

    fn base() -> JobRequest {
        JobRequest {
            prompt: Some("a lighthouse".into()),
            ..Default::default()
        }
    }

    fn passes(req: JobRequest) -> bool {
        validate(&req, || 1).is_ok()
    }

    /// Each integer field at its bounds passes, one past them fails: the
    /// published limits are the enforced ones.
    #[test]
    fn integer_bounds_are_the_validated_ones() {
        let limits = RequestLimits::current();
        type Set = fn(&mut JobRequest, i64);
        let fields: [(&IntegerLimit, Set); 6] = [
            (&limits.num_inference_steps, |r, v| r.num_inference_steps = Some(v)),
            (&limits.width, |r, v| r.width = Some(v)),
            (&limits.height, |r, v| r.height = Some(v)),
            (&limits.num_images, |r, v| r.num_images = Some(v)),
            (&limits.preview_every, |r, v| r.preview_every = Some(v)),
            (&limits.priority, |r, v| r.priority = Some(v)),
        ];
        for (limit, set) in fields {
            let step = limit.multiple_of.unwrap_or(1) as i64;
            let with = |v: i64| {
                let mut r = base();
                set(&mut r, v);
                passes(r)
            };
            assert!(with(limit.min as i64) && with(limit.max as i64), "{limit:?}");
            assert!(
                !with(limit.min as i64 - step) && !with(limit.max as i64 + step),
                "{limit:?}"
            );
            if let Some(d) = limit.default {
                assert!(with(d as i64), "{limit:?}");
            }
        }
        assert!(!passes(JobRequest {
            width: Some(limits.width.min as i64 + 1),
            ..base()
        }));
    }

    #[test]
    fn text_number_and_choice_limits_are_the_validated_ones() {
        let limits = RequestLimits::current();
        let long = |n: usize| Some("x".repeat(n));
        assert!(passes(JobRequest {
            prompt: long(limits.prompt.max_chars),
            ..base()
        }));
        assert!(!passes(JobRequest {
            prompt: long(limits.prompt.max_chars + 1),
            ..base()
        }));
        assert!(!passes(JobRequest {
            prompt: long(limits.prompt.min_chars - 1),
            ..base()
        }));
        assert!(passes(JobRequest {
            negative_prompt: long(limits.negative_prompt.min_chars),
            ..base()
        }));
        assert!(!passes(JobRequest {
            negative_prompt: long(limits.negative_prompt.max_chars + 1),
            ..base()
        }));
        let g = &limits.guidance_scale;
        for (value, ok) in [
            (g.min, true),
            (g.max, true),
            (g.min - 0.01, false),
            (g.max + 0.01, false),
        ] {
            let req = JobRequest {
                guidance_scale: Some(value),
                ..base()
            };
            assert_eq!(passes(req), ok, "{value}");
        }
        for format in &limits.output_format.one_of {
            assert!(passes(JobRequest {
                output_format: Some(format.to_string()),
                ..base()
            }));
        }
        let job = validate(&base(), || 1).unwrap();
        assert_eq!(job.output_format.extension(), limits.output_format.default);
        assert_eq!(job.negative_prompt, limits.negative_prompt.default.unwrap());
        assert_eq!(job.guidance_scale, g.default);
    }

    /// Under caps, the published bounds still pass and one past them fails.
    #[test]
    fn capped_limits_are_the_enforced_ones() {
        let caps = Caps {
            max_steps: 25,
            max_pixels: 768 * 768,
            max_images: 3,
            max_loras: 2,
            max_image_bytes: 1 << 20,
        };
        let limits = RequestLimits::within(&caps);
        let with = |req: JobRequest| crate::rules::validate_within(&req, &caps, || 1).is_ok();
        assert_eq!(limits.num_inference_steps.max, 25);
        assert_eq!(limits.num_images.max, 3);
        assert_eq!(limits.max_pixels, 768 * 768);
        let widest = limits.width.max as i64;
        assert!(with(JobRequest {
            width: Some(widest),
            height: Some(256),
            ..base()
        }));
        assert!(!with(JobRequest {
            width: Some(widest + 8),
            height: Some(256),
            ..base()
        }));
        assert!(!with(JobRequest {
            num_inference_steps: Some(26),
            ..base()
        }));
        // The default size (1024²) is over this cap: a client must ask for less.
        assert!(!with(base()));
    }

    #[test]
    fn wire_form() {
        let v = serde_json::to_value(RequestLimits::current()).unwrap();
        assert_eq!(v["width"]["min"], 256);
        assert_eq!(v["width"]["multiple_of"], 8);
        assert_eq!(v["num_images"]["default"], serde_json::Value::Null);
        assert!(v["num_inference_steps"].get("multiple_of").is_none());
        assert_eq!(v["output_format"]["one_of"], serde_json::json!(["png", "jpeg", "webp"]));
        assert_eq!(v["seed"]["max"], u64::MAX);
    }
}
