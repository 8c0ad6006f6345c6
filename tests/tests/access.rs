//! Access and limits against the real stack: API keys (401 without one, 404
//! for another key's job, an admin sees all), `/metrics` on its own address,
//! secrets kept out of the logs, private results behind expiring presigned
//! URLs; the body limit, the caps, the per-key rate limit, the queue-depth
//! cap, and a job stopped at its deadline while the worker goes on.

use std::time::Duration;

use common::status::{JobState, JobStatus};
use e2e_tests::{JobParams, Stack};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(240);
const ALICE: &str = "alice-key-0123456789";
const BOB: &str = "bob-key-0123456789ab";
const OPS: &str = "ops-key-0123456789abc";

fn keys() -> String {
    format!("alice:{ALICE},bob:{BOB},ops:{OPS}:admin")
}

async fn submit(
    http: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    body: &Value,
) -> anyhow::Result<reqwest::Response> {
    let mut request = http.post(format!("{base}/v1/jobs")).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    Ok(request.send().await?)
}

async fn get(http: &reqwest::Client, url: &str, key: Option<&str>) -> anyhow::Result<reqwest::Response> {
    let mut request = http.get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    Ok(request.send().await?)
}

async fn id_of(response: reqwest::Response) -> anyhow::Result<Uuid> {
    let status = response.status();
    let body: Value = response.json().await?;
    anyhow::ensure!(status == StatusCode::ACCEPTED, "submit answered {status}: {body}");
    Ok(body["id"].as_str().unwrap_or_default().parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_own_their_jobs_and_results_stay_private() -> anyhow::Result<()> {
    let stack = Stack::with_env("access", &[("SDXL_API_KEYS", keys()), ("S3_PRESIGN_TTL", "4s".into())]).await?;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let (dispatcher, base) = stack
        .spawn_dispatcher_with(&["--metrics-listen", &metrics_addr])
        .await?;
    let worker = stack.spawn_worker("access-worker", &[]).await?;
    let http = reqwest::Client::new();
    let job = JobParams::new("a key of one's own", 2, 31).json();

    // Without a key, or with an unknown one: 401, and it says how to authenticate.
    for key in [None, Some("not-a-key-at-all-000")] {
        let r = submit(&http, &base, key, &job).await?;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await?;
        assert!(body["error"].as_str().unwrap_or_default().contains("Bearer"), "{body}");
    }
    // Open: health, the limits, the page, the OpenAPI document.
    for path in ["/healthz", "/v1/limits", "/", "/openapi.json"] {
        assert_eq!(
            get(&http, &format!("{base}{path}"), None).await?.status(),
            200,
            "{path}"
        );
    }

    let alices = id_of(submit(&http, &base, Some(ALICE), &job).await?).await?;
    let (done, _) = stack.wait_terminal(alices, TIMEOUT).await?;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.owner.as_deref(), Some("alice"));

    let url = |path: &str| format!("{base}/v1/jobs/{alices}{path}");
    // Alice and the admin see it; Bob gets exactly what a missing job gets.
    for key in [ALICE, OPS] {
        let r = get(&http, &url(""), Some(key)).await?;
        assert_eq!(r.status(), 200);
        let seen: JobStatus = r.json().await?;
        assert_eq!(seen.id, alices);
    }
    let missing = get(&http, &format!("{base}/v1/jobs/{}", Uuid::new_v4()), Some(BOB)).await?;
    assert_eq!(missing.status(), 404);
    for path in ["", "/events", "/result", "/images"] {
        let r = get(&http, &url(path), Some(BOB)).await?;
        assert_eq!(r.status(), 404, "GET {path} with another key");
    }
    let r = http.delete(url("")).bearer_auth(BOB).send().await?;
    assert_eq!(r.status(), 404, "DELETE with another key");
    for path in ["", "/events", "/result", "/images"] {
        assert_eq!(
            get(&http, &url(path), None).await?.status(),
            401,
            "GET {path} without a key"
        );
    }

    // An Idempotency-Key belongs to its key: the same one from Bob is a new job.
    let with_key = |key: &'static str| {
        http.post(format!("{base}/v1/jobs"))
            .bearer_auth(key)
            .header("idempotency-key", "nightly-1")
            .json(&job)
            .send()
    };
    let first = id_of(with_key(ALICE).await?).await?;
    let again = id_of(with_key(ALICE).await?).await?;
    let bobs = id_of(with_key(BOB).await?).await?;
    assert_eq!(first, again, "a replay within one key");
    assert_ne!(first, bobs, "no replay across keys");
    let r = get(&http, &format!("{base}/v1/jobs/{bobs}"), Some(ALICE)).await?;
    assert_eq!(r.status(), 404);

    // Results: the presigned URL works, the object without a signature does
    // not (the bucket is private), and the URL expires.
    let images: Value = get(&http, &url("/images"), Some(ALICE)).await?.json().await?;
    let signed = images["grid"]["url"].as_str().unwrap_or_default().to_string();
    assert!(signed.contains("X-Amz-Expires=4"), "{signed}");
    assert_eq!(http.get(&signed).send().await?.status(), 200);
    let unsigned = signed.split('?').next().unwrap_or_default();
    let r = http.get(unsigned).send().await?;
    assert!(
        r.status() == 403 || r.status() == 401,
        "unsigned GET answered {}",
        r.status()
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let r = http.get(&signed).send().await?;
    assert!(
        r.status() == 403 || r.status() == 401,
        "expired URL answered {}",
        r.status()
    );

    // /metrics is on its own address only.
    assert_eq!(get(&http, &format!("{base}/metrics"), None).await?.status(), 404);
    let metrics = get(&http, &format!("http://{metrics_addr}/metrics"), None)
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("sdxl_dispatcher_requests_refused_total{reason=\"unauthorized\"}"),
        "{metrics}"
    );

    // No secret in any log: API keys, the S3 secret, the RabbitMQ password.
    let secret = stack.env("AWS_SECRET_ACCESS_KEY").unwrap_or_default().to_string();
    for log in [dispatcher.log_text(), worker.log_text()] {
        for s in [ALICE, BOB, OPS, secret.as_str(), "guest:guest"] {
            assert!(!log.contains(s), "a log shows a secret ({s})");
        }
    }
    println!("access: 3 keys, 4 jobs; 401 ×10, 404 ×6 for another key, admin reads, presign expiry checked");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn body_caps_rate_and_queue_limits_refuse_with_clear_errors() -> anyhow::Result<()> {
    let stack = Stack::with_env(
        "limits",
        &[
            ("SDXL_API_KEYS", keys()),
            ("SDXL_MAX_STEPS", "10".into()),
            ("SDXL_MAX_PIXELS", (512 * 512).to_string()),
            ("SDXL_MAX_IMAGES", "2".into()),
            ("SDXL_RATE_LIMIT", "6".into()),
            ("SDXL_RATE_BURST", "3".into()),
            ("SDXL_MAX_QUEUE_DEPTH", "0".into()),
        ],
    )
    .await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let http = reqwest::Client::new();
    let job = |extra: Value| {
        let mut body = JobParams::new("within limits", 2, 7).json();
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        body
    };

    // A body over 64 KiB: 413 before anything is parsed.
    let huge = json!({ "prompt": "x".repeat(70 * 1024) });
    let r = submit(&http, &base, Some(OPS), &huge).await?;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = r.json().await?;
    assert!(
        body["error"].as_str().unwrap_or_default().contains("65536 bytes"),
        "{body}"
    );

    // The caps: 422 naming the field and the cap.
    for (extra, field, words) in [
        (json!({"num_inference_steps": 11}), "num_inference_steps", "at most 10"),
        (json!({"width": 1024, "height": 512}), "width", "262144 pixels"),
        (json!({"num_images": 3}), "num_images", "at most 2"),
    ] {
        let r = submit(&http, &base, Some(OPS), &job(extra)).await?;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body: Value = r.json().await?;
        assert_eq!(body["field"], field, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().contains(words), "{body}");
    }
    let limits: Value = get(&http, &format!("{base}/v1/limits"), None).await?.json().await?;
    assert_eq!(limits["num_inference_steps"]["max"], 10);
    assert_eq!(limits["num_images"]["max"], 2);
    assert_eq!(limits["max_pixels"], 512 * 512);
    assert_eq!(limits["width"]["max"], 1024, "the widest side beside a 256 one");

    // The rate limit is per key: Alice's burst of 3, then 429 with Retry-After;
    // Bob is not affected. (The admin's refused submits above counted for it.)
    for _ in 0..3 {
        id_of(submit(&http, &base, Some(ALICE), &job(json!({}))).await?).await?;
    }
    let r = submit(&http, &base, Some(ALICE), &job(json!({}))).await?;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = r.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=10).contains(&retry_after), "Retry-After: {retry_after}");
    let body: Value = r.json().await?;
    assert!(body["error"].as_str().unwrap_or_default().contains("alice"), "{body}");
    id_of(submit(&http, &base, Some(BOB), &job(json!({}))).await?).await?;
    // One token comes back every 10 s (6 a minute).
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    id_of(submit(&http, &base, Some(ALICE), &job(json!({}))).await?).await?;

    // The queue cap: a second dispatcher on the same queue, capped at the 5
    // jobs waiting there now (no worker runs), refuses with 503.
    let capped = Stack::with_env(
        "limits",
        &[
            ("SDXL_QUEUE", stack.queue.clone()),
            ("SDXL_MAX_QUEUE_DEPTH", "5".into()),
        ],
    )
    .await?;
    let (_capped_dispatcher, capped_base) = capped.spawn_dispatcher().await?;
    let start = std::time::Instant::now();
    let refused = loop {
        let r = submit(&http, &capped_base, None, &job(json!({}))).await?;
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            break r;
        }
        anyhow::ensure!(
            r.status() == StatusCode::ACCEPTED && start.elapsed() < Duration::from_secs(10),
            "the queue cap never refused (last answer {})",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(refused.headers()["retry-after"], "5");
    let body: Value = refused.json().await?;
    assert!(
        body["error"].as_str().unwrap_or_default().contains("queue is full"),
        "{body}"
    );
    println!("limits: 413 ×1, 422 ×3 over caps, 429 after a burst of 3, 503 at a queue depth of 5");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_past_its_deadline_fails_and_the_worker_goes_on() -> anyhow::Result<()> {
    let stack = Stack::new("deadline").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let worker = stack.spawn_worker("deadline-worker", &["--job-deadline", "2s"]).await?;
    let http = reqwest::Client::new();
    // 100 steps at 1024² take the tiny model on the CPU far longer than 2 s.
    let mut too_long = JobParams::new("too long", 100, 1);
    too_long.size = 1024;
    let long = id_of(submit(&http, &base, None, &too_long.json()).await?).await?;
    let (status, _) = stack.wait_terminal(long, TIMEOUT).await?;
    assert_eq!(status.state, JobState::Failed, "{status:?}");
    let error = status.error.clone().unwrap_or_default();
    assert!(error.contains("deadline"), "{error}");
    assert!(status.progress.step < 100, "{:?}", status.progress);
    assert!(stack.objects_of(long).await?.is_empty(), "nothing stored");
    let (_, dead) = stack.queue_depths().await?;
    assert_eq!(dead, 1, "its message is dead-lettered");

    let short = id_of(submit(&http, &base, None, &JobParams::new("quick", 1, 2).json()).await?).await?;
    let (status, _) = stack.wait_terminal(short, TIMEOUT).await?;
    assert_eq!(status.state, JobState::Succeeded, "{}", worker.log_text());
    println!(
        "deadline: a 100-step job stopped at step {} after 2 s; the next job succeeded",
        {
            let s = stack.status(long).await?;
            s.progress.step
        }
    );
    Ok(())
}
