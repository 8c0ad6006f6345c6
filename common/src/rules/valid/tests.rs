//! The rules of `validate`, one test per rule.

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
    // Without an image a strength is ignored: text to image.
    let job = check(JobRequest {
        strength: Some(0.5),
        ..ok()
    })
    .unwrap();
    assert_eq!((job.strength, job.mode()), (None, "text-to-image"));
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
