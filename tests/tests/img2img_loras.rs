//! img2img, inpainting and LoRAs through the whole system: a LoRA uploaded
//! to the registry (`PUT /v1/loras/{name}`), an img2img job naming it with a
//! base64 image submitted over HTTP, its input stored under the job's prefix
//! and never on the queue (the message body is read off RabbitMQ), and its
//! grid equal, pixel for pixel, to `worker generate --image … --lora …`;
//! an inpainting job likewise; a 422 naming the field for each bad input.

use std::time::Duration;

use base64::Engine as _;
use common::status::JobState;
use e2e_tests::{features_dir, JobParams, Stack};
use lapin::options::{BasicGetOptions, BasicNackOptions};
use serde_json::{json, Value};
use uuid::Uuid;

const JOB_TIMEOUT: Duration = Duration::from_secs(240);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn submit(http: &reqwest::Client, base: &str, body: &Value) -> anyhow::Result<Uuid> {
    let response = http.post(format!("{base}/v1/jobs")).json(body).send().await?;
    anyhow::ensure!(response.status() == 202, "submit: {}", response.text().await?);
    let body: Value = response.json().await?;
    Ok(body["id"].as_str().unwrap_or_default().parse()?)
}

/// The 422 a body gets, as (field, message).
async fn refused(http: &reqwest::Client, base: &str, body: &Value) -> anyhow::Result<(String, String)> {
    let response = http.post(format!("{base}/v1/jobs")).json(body).send().await?;
    let code = response.status();
    let body: Value = response.json().await?;
    anyhow::ensure!(code == 422, "expected 422, got {code}: {body}");
    Ok((
        body["field"].as_str().unwrap_or_default().to_string(),
        body["error"].as_str().unwrap_or_default().to_string(),
    ))
}

/// Takes the next message off the stack's job queue and puts it back.
async fn peek_message(stack: &Stack) -> anyhow::Result<Vec<u8>> {
    let conn = common::queue::connect(stack.env("AMQP_URL").unwrap_or_default(), "e2e-peek").await?;
    let channel = conn.create_channel().await?;
    let start = std::time::Instant::now();
    loop {
        if let Some(m) = channel
            .basic_get(stack.queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        {
            let body = m.delivery.data.clone();
            m.delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await?;
            let _ = conn.close(200, "done".into()).await;
            return Ok(body);
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "no message on the queue");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn img2img_with_a_registry_lora_equals_worker_generate() -> anyhow::Result<()> {
    let stack = Stack::new("img2img_lora").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let http = reqwest::Client::new();
    let features = features_dir();
    let lora_file = features.join("lora_kohya.safetensors");
    let lora_bytes = std::fs::read(&lora_file)?;

    // The registry: upload, list, and a refusal of a file that is no LoRA.
    let put = http
        .put(format!("{base}/v1/loras/style-kohya"))
        .body(lora_bytes.clone())
        .send()
        .await?;
    assert_eq!(put.status(), 201, "{}", put.text().await?);
    let record: Value = put.json().await?;
    assert_eq!(record["format"], "kohya");
    assert_eq!(record["bytes"], json!(lora_bytes.len()));
    let listed: Value = http.get(format!("{base}/v1/loras")).send().await?.json().await?;
    assert_eq!(listed["loras"][0]["name"], "style-kohya");
    assert_eq!(listed["loras"][0]["sha256"], record["sha256"]);
    let not_lora = http
        .put(format!("{base}/v1/loras/broken"))
        .body(std::fs::read(features.join("tiny-sdxl-single.safetensors"))?)
        .send()
        .await?;
    assert_eq!(not_lora.status(), 422);
    let err: Value = not_lora.json().await?;
    assert!(err["error"].as_str().unwrap_or_default().contains("key `"), "{err}");

    // An img2img job with the LoRA, submitted while no worker runs, so that
    // its message can be read off the queue.
    let input_png = std::fs::read(features.join("img2img_input.png"))?;
    let params = JobParams::new("a cat wearing a hat", 8, 4242)
        .with("scheduler", json!("dpmpp_2m_karras"))
        .with("strength", json!(0.75));
    let mut body = params.json();
    body["image"] = json!(format!("data:image/png;base64,{}", b64(&input_png)));
    body["loras"] = json!([{"name": "style-kohya", "scale": 0.8}]);
    let id = submit(&http, &base, &body).await?;

    let message = peek_message(&stack).await?;
    let text = String::from_utf8_lossy(&message);
    assert!(
        !text.contains(&b64(&input_png)[..64]) && !text.contains("base64"),
        "no image data on the queue: {} bytes",
        message.len()
    );
    let message: Value = serde_json::from_slice(&message)?;
    assert_eq!(message["request"]["image"]["key"], format!("jobs/{id}/input.png"));
    assert_eq!(message["request"]["loras"][0]["sha256"], record["sha256"]);
    let objects = stack.objects_of(id).await?;
    assert_eq!(
        objects,
        vec![format!("jobs/{id}/input.png")],
        "the input waits under the job's prefix"
    );

    let worker = stack.spawn_worker("img2img-worker", &[]).await?;
    let (status, _) = stack.wait_terminal(id, JOB_TIMEOUT).await?;
    assert_eq!(status.state, JobState::Succeeded, "{:?}", status.error);
    assert_eq!(status.request.strength, Some(0.75));
    let stored = stack.stored_grid(&status).await?;
    let flags = [
        "--image".to_string(),
        features.join("img2img_input.png").display().to_string(),
        "--lora".to_string(),
        format!("{}:0.8", lora_file.display()),
    ];
    let reference = stack.reference_image_with(&params, &flags).await?;
    assert!(
        stored == reference,
        "the grid equals `worker generate --image … --strength 0.75 --lora …:0.8`, pixel for pixel"
    );
    let without_lora = stack.reference_image_with(&params, &flags[..2]).await?;
    assert!(without_lora != reference, "the LoRA changes the image");
    assert!(stack.objects_of(id).await?.contains(&format!("jobs/{id}/input.png")));

    // Inpainting with the same LoRA: the cached file is used again.
    let mask_png = std::fs::read(features.join("inpaint_mask.png"))?;
    let inpaint = JobParams::new("a cat wearing a hat", 6, 77).with("strength", json!(0.85));
    let mut body = inpaint.json();
    body["image"] = json!(b64(&input_png));
    body["mask"] = json!(b64(&mask_png));
    body["loras"] = json!([{"name": "style-kohya", "scale": 0.8}]);
    let id = submit(&http, &base, &body).await?;
    let (status, _) = stack.wait_terminal(id, JOB_TIMEOUT).await?;
    assert_eq!(status.state, JobState::Succeeded, "{:?}", status.error);
    let flags = [
        "--image".to_string(),
        features.join("img2img_input.png").display().to_string(),
        "--mask".to_string(),
        features.join("inpaint_mask.png").display().to_string(),
        "--lora".to_string(),
        format!("{}:0.8", lora_file.display()),
    ];
    let reference = stack.reference_image_with(&inpaint, &flags).await?;
    assert!(
        stack.stored_grid(&status).await? == reference,
        "inpainting equals worker generate"
    );
    let mut objects = stack.objects_of(id).await?;
    objects.retain(|k| k.ends_with("input.png") || k.ends_with("mask.png"));
    assert_eq!(objects.len(), 2, "{objects:?}");
    let downloads = worker.log_text().matches("LoRA downloaded into the cache").count();
    assert_eq!(downloads, 1, "the second job reuses the cached LoRA");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_inputs_are_422s_naming_the_field() -> anyhow::Result<()> {
    let stack = Stack::new("img2img_refusals").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let http = reqwest::Client::new();
    let features = features_dir();
    let put = http
        .put(format!("{base}/v1/loras/known"))
        .body(std::fs::read(features.join("lora_peft.safetensors"))?)
        .send()
        .await?;
    assert_eq!(put.status(), 201);
    let image = b64(&std::fs::read(features.join("img2img_input.png"))?);
    // A mask of another size: the image at 256×256.
    let big = image::RgbImage::from_pixel(256, 256, image::Rgb([200, 10, 10]));
    let mut big_png = Vec::new();
    big.write_to(&mut std::io::Cursor::new(&mut big_png), image::ImageFormat::Png)?;
    let base_body = JobParams::new("x", 4, 1).json();
    let with = |field: &str, value: Value| {
        let mut b = base_body.clone();
        b[field] = value;
        b
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            with("image", json!(b64(b"hello, not an image"))),
            "image",
            "`image` must be a PNG, JPEG or WebP",
        ),
        (
            {
                let mut b = with("image", json!(b64(&big_png)));
                b["mask"] = json!(image);
                b
            },
            "mask",
            "256×256, got 128×128",
        ),
        (with("loras", json!([{"name": "nope"}])), "loras", "known"),
        (
            with("loras", json!([{"name": "known", "scale": 5}])),
            "loras",
            "between -4 and 4",
        ),
        (
            {
                let mut b = with("image", json!(image));
                b["strength"] = json!(0);
                b
            },
            "strength",
            "above 0",
        ),
    ];
    for (body, field, says) in cases {
        let (got_field, message) = refused(&http, &base, &body).await?;
        assert_eq!(got_field, field, "{message}");
        assert!(message.contains(says), "{field}: {message}");
    }
    // Only a request with images may be large.
    let huge = with("negative_prompt", json!(format!("x{}", " ".repeat(70_000))));
    let response = http.post(format!("{base}/v1/jobs")).json(&huge).send().await?;
    assert_eq!(response.status(), 413);
    Ok(())
}
