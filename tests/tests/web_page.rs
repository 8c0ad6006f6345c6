//! The web page at `/`, in Debian's headless Chromium (driven by
//! `tests/browser/web_page.mjs` through playwright-core) against the real
//! services, the dispatcher and a CPU worker on the tiny model:
//!
//! - a job submitted from the form shows live previews from the SSE stream,
//!   then the final grid and its images with their seeds (the screenshot is
//!   checked not to be blank, and the grid on screen is the stored grid); its
//!   seed reaches the server with every digit; "reuse seed", reopening from
//!   the recent jobs, and cancelling a running job work;
//! - an img2img job from an uploaded file, with a LoRA from the picker,
//!   shows its result, which equals `worker generate` on the same file;
//! - a bad width shows the API's own message, by the field.

use std::time::Duration;

use common::rules::ValidationError;
use common::status::JobState;
use e2e_tests::browser::{best_window_diff, kept_screenshots_dir, luma_spread, run_page};
use e2e_tests::{features_dir, JobParams, Stack};
use uuid::Uuid;

const PAGE_TIMEOUT: Duration = Duration::from_secs(300);
/// The seed `web_page.mjs` types: above 2^53, where JavaScript numbers round.
const SEED: u64 = 18_446_744_073_709_551_557;
const PROMPT: &str = "a lighthouse on a cliff at dawn";
const STEPS: u32 = 8;
const PREVIEW_EVERY: u32 = 2;
/// Luminance spread under which a screenshot counts as blank.
const BLANK_SPREAD: f64 = 8.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_submitted_from_the_page_shows_previews_then_the_final_grid() -> anyhow::Result<()> {
    let stack = Stack::new("web_submit").await?;
    let _worker = stack.spawn_worker("web-worker", &[]).await?;
    let (dispatcher, base) = stack.spawn_dispatcher().await?;
    let out = stack.dir.path().join("browser");
    let params = [
        ("WEB_PROMPT", PROMPT.to_string()),
        ("WEB_SEED", SEED.to_string()),
        ("WEB_STEPS", STEPS.to_string()),
        ("WEB_PREVIEW_EVERY", PREVIEW_EVERY.to_string()),
    ];
    let report = match run_page("submit", &base, &params, &out, PAGE_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => panic!("{e:#}\n--- dispatcher log:\n{}", dispatcher.log_text()),
    };
    println!("{report:#}");
    assert_eq!(
        report["page_errors"],
        serde_json::json!([]),
        "no uncaught error in the page"
    );

    // The job the page submitted is the one the form described.
    let id: Uuid = report["id"].as_str().unwrap_or_default().parse()?;
    let status = stack.status(id).await?;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert_eq!(status.request.prompt, PROMPT);
    assert_eq!((status.request.width, status.request.height), (256, 256));
    assert_eq!(status.request.num_inference_steps, STEPS);
    assert_eq!(status.request.preview_every, PREVIEW_EVERY);
    assert_eq!(status.request.seed, SEED, "the seed typed reaches the server unrounded");

    // Live previews while running, then the final grid in their place.
    let running = &report["preview_while_running"];
    assert_eq!(running["state"], "running", "{running}");
    let final_view = &report["final"];
    assert!(final_view["previews"].as_u64().unwrap_or(0) >= 1, "{final_view}");
    assert_eq!(final_view["state"], "succeeded");
    assert_eq!(final_view["step"], format!("step {STEPS} / {STEPS}"));
    assert_eq!(final_view["preview_box_hidden"], true);
    let result = status.result.as_ref().expect("a succeeded job has a result");
    assert_eq!(final_view["grid"]["width"], result.grid.width);
    assert_eq!(final_view["grid"]["height"], result.grid.height);
    assert!(
        final_view["grid"]["opens"]
            .as_str()
            .unwrap_or_default()
            .contains("X-Amz-Signature="),
        "the grid opens its presigned URL: {final_view}"
    );
    let images = final_view["images"].as_array().expect("images");
    assert_eq!(images.len(), result.images.len());
    for (shown, stored) in images.iter().zip(&result.images) {
        assert_eq!(shown["seed"], stored.seed.to_string(), "each image shows its seed");
        assert_eq!(shown["width"], stored.width);
    }
    assert_eq!(final_view["timings"].as_array().map(Vec::len), Some(8), "{final_view}");

    // Reuse seed, reopen from the recent jobs, cancel.
    assert_eq!(report["reused_seed"], SEED.to_string());
    assert_eq!(report["recent_state"], "succeeded");
    let reopened = &report["reopened"];
    assert_eq!(reopened["id"], id.to_string());
    assert_eq!(reopened["state"], "succeeded");
    assert_eq!(reopened["hash"], format!("#{id}"));
    let cancelled: Uuid = report["cancelled"]["id"].as_str().unwrap_or_default().parse()?;
    let (cancelled_status, _) = stack.wait_terminal(cancelled, Duration::from_secs(30)).await?;
    assert_eq!(cancelled_status.state, JobState::Cancelled);
    assert_eq!(report["cancelled"]["cancel_button_hidden"], true);

    // The screenshot is not blank, and the grid on screen is the stored grid.
    let screenshot = image::open(out.join("web-ui.png"))?.to_rgb8();
    let spread = luma_spread(&screenshot);
    assert!(
        spread > BLANK_SPREAD,
        "the screenshot looks blank (luminance spread {spread:.1})"
    );
    let shown_grid = image::open(out.join("grid.png"))?.to_rgb8();
    let stored_grid = stack.stored_grid(&status).await?;
    let spread = luma_spread(&shown_grid);
    assert!(
        spread > BLANK_SPREAD,
        "the grid on screen looks blank (spread {spread:.1})"
    );
    let (shown_size, stored_size) = (shown_grid.dimensions(), stored_grid.dimensions());
    assert!(
        shown_size.0 <= stored_size.0 + 1 && shown_size.1 <= stored_size.1 + 1,
        "the grid is shown at its own size: {shown_size:?} on screen, {stored_size:?} stored"
    );
    let diff = best_window_diff(&shown_grid, &stored_grid).unwrap_or_else(|| {
        panic!("the grid on screen ({shown_size:?}) is smaller than the stored one ({stored_size:?})")
    });
    assert!(
        diff < 3.0,
        "the grid on screen differs from the stored one by {diff:.2} per channel"
    );

    let kept = kept_screenshots_dir();
    std::fs::create_dir_all(&kept)?;
    for name in ["web-ui.png", "preview.png", "grid.png"] {
        std::fs::copy(out.join(name), kept.join(name))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_img2img_job_from_an_uploaded_file_shows_its_result() -> anyhow::Result<()> {
    let stack = Stack::new("web_img2img").await?;
    let _worker = stack.spawn_worker("web-img2img-worker", &[]).await?;
    let (dispatcher, base) = stack.spawn_dispatcher().await?;
    let features = features_dir();
    let lora = std::fs::read(features.join("lora_kohya.safetensors"))?;
    let put = reqwest::Client::new()
        .put(format!("{base}/v1/loras/watercolour"))
        .body(lora)
        .send()
        .await?;
    assert_eq!(put.status(), 201);
    let input = features.join("img2img_input.png");
    let out = stack.dir.path().join("browser-img2img");
    let params = [
        ("WEB_PROMPT", PROMPT.to_string()),
        ("WEB_SEED", "1234".to_string()),
        ("WEB_STEPS", "5".to_string()),
        ("WEB_IMAGE", input.display().to_string()),
        ("WEB_STRENGTH", "0.6".to_string()),
        ("WEB_LORA", "watercolour".to_string()),
        ("WEB_LORA_SCALE", "0.8".to_string()),
    ];
    let report = match run_page("img2img", &base, &params, &out, PAGE_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => panic!("{e:#}\n--- dispatcher log:\n{}", dispatcher.log_text()),
    };
    println!("{report:#}");
    assert_eq!(report["page_errors"], serde_json::json!([]));
    assert_eq!(
        report["image_caption"], "img2img_input.png, 128×128",
        "the upload is previewed"
    );
    assert_eq!(
        report["lora_options"],
        serde_json::json!(["watercolour"]),
        "the picker lists the registry"
    );
    let id: Uuid = report["id"].as_str().unwrap_or_default().parse()?;
    let status = stack.status(id).await?;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert_eq!(status.request.mode(), "img2img");
    assert_eq!(status.request.strength, Some(0.6));
    assert_eq!(status.request.loras[0].name, "watercolour");
    assert_eq!(status.request.loras[0].scale, 0.8);
    let settings = report["settings"].as_str().unwrap_or_default();
    assert!(
        settings.starts_with("img2img, 256×256")
            && settings.contains("strength 0.6")
            && settings.contains("watercolour:0.8"),
        "{settings}"
    );
    // The grid on screen is the job's stored result, which is what
    // `worker generate` makes from the same file.
    let shown = image::open(out.join("grid.png"))?.to_rgb8();
    let stored = stack.stored_grid(&status).await?;
    assert!(luma_spread(&shown) > BLANK_SPREAD);
    let diff = best_window_diff(&shown, &stored).expect("the grid is shown whole");
    assert!(
        diff < 3.0,
        "the grid on screen differs from the stored one by {diff:.2}"
    );
    let reference = stack
        .reference_image_with(
            &JobParams::new(PROMPT, 5, 1234).with("strength", serde_json::json!(0.6)),
            &[
                "--image".into(),
                input.display().to_string(),
                "--lora".into(),
                format!("{}:0.8", features.join("lora_kohya.safetensors").display()),
            ],
        )
        .await?;
    assert!(stored == reference, "the page's job equals worker generate");
    std::fs::create_dir_all(kept_screenshots_dir())?;
    std::fs::copy(
        out.join("web-img2img.png"),
        kept_screenshots_dir().join("web-img2img.png"),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_width_shows_the_api_error_by_the_field() -> anyhow::Result<()> {
    let stack = Stack::new("web_bad_width").await?;
    let (dispatcher, base) = stack.spawn_dispatcher().await?;
    let expected = ValidationError::SizeRange {
        field: "width",
        value: 100,
    }
    .to_string();
    // What the API says to the same request.
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/jobs"))
        .json(&serde_json::json!({ "prompt": "a red bicycle", "width": 100 }))
        .send()
        .await?;
    assert_eq!(response.status(), 422);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"], expected.as_str());

    let out = stack.dir.path().join("browser");
    let report = match run_page("bad-width", &base, &[], &out, PAGE_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => panic!("{e:#}\n--- dispatcher log:\n{}", dispatcher.log_text()),
    };
    println!("{report:#}");
    assert_eq!(report["error"], expected.as_str(), "the page shows the API's words");
    assert_eq!(report["field_error"], expected.as_str(), "and by the field");
    assert_eq!(report["width_invalid"], "true");
    assert_eq!(report["job_shown"], false, "no job was made");
    assert_eq!(report["page_errors"], serde_json::json!([]));
    // The form carries the limits of GET /v1/limits.
    let input = &report["width_input"];
    assert_eq!(input["min"], "256");
    assert_eq!(input["max"], "2048");
    assert_eq!(input["step"], "8");
    assert_eq!(input["value"], "1024", "the default");
    assert_eq!(report["width_hint"], "256–2048, a multiple of 8");
    Ok(())
}
