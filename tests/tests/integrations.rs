//! What integrators build on, against the real stack: signed webhooks
//! (delivered once per subscribed event, retried, surviving a dispatcher
//! restart, refused for internal targets) and queue positions.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::status::JobState;
use e2e_tests::{JobParams, Stack};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

const ALICE: &str = "alice-key-0123456789";

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
}

impl Hit {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Clone, Default)]
struct Script {
    hits: Arc<Mutex<Vec<Hit>>>,
    /// The status of each answer in turn; 200 once it runs out.
    answers: Arc<Mutex<VecDeque<u16>>>,
}

/// A webhook receiver on loopback.
struct Receiver {
    url: String,
    script: Script,
}

impl Receiver {
    async fn start(answers: &[u16]) -> anyhow::Result<Receiver> {
        let script = Script {
            hits: Arc::default(),
            answers: Arc::new(Mutex::new(answers.iter().copied().collect())),
        };
        async fn hook(State(s): State<Script>, headers: HeaderMap, body: Bytes) -> StatusCode {
            s.hits.lock().unwrap().push(Hit { headers, body });
            let code = s.answers.lock().unwrap().pop_front().unwrap_or(200);
            StatusCode::from_u16(code).unwrap_or(StatusCode::OK)
        }
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Receiver { url, script })
    }

    fn hits(&self) -> Vec<Hit> {
        self.script.hits.lock().unwrap().clone()
    }

    /// Waits until at least `n` POSTs came, then `settle` more for any that should not.
    async fn wait_for(&self, n: usize, timeout: Duration, settle: Duration) -> anyhow::Result<Vec<Hit>> {
        let start = Instant::now();
        while self.hits().len() < n {
            anyhow::ensure!(
                start.elapsed() < timeout,
                "{} webhook POSTs after {timeout:?}, expected {n}",
                self.hits().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(settle).await;
        Ok(self.hits())
    }
}

/// Standard Webhooks' check, written from the specification (not the
/// dispatcher's code): HMAC-SHA256 of `id.timestamp.body` with the secret's
/// bytes, one of the space-separated `v1,` signatures.
fn verifies(secret: &str, hit: &Hit) -> bool {
    let key = STANDARD.decode(secret.trim_start_matches("whsec_")).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", hit.header("webhook-id"), hit.header("webhook-timestamp")).as_bytes());
    mac.update(&hit.body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    let fresh = hit
        .header("webhook-timestamp")
        .parse::<i64>()
        .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() < 300);
    fresh && hit.header("webhook-signature").split(' ').any(|s| s == expected)
}

async fn submit(http: &reqwest::Client, base: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
    let r = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(ALICE)
        .json(body)
        .send()
        .await?;
    let code = StatusCode::from_u16(r.status().as_u16())?;
    Ok((code, r.json().await?))
}

async fn submitted_id(http: &reqwest::Client, base: &str, body: &Value) -> anyhow::Result<Uuid> {
    let (code, answer) = submit(http, base, body).await?;
    anyhow::ensure!(code == StatusCode::ACCEPTED, "{code}: {answer}");
    Ok(answer["id"].as_str().unwrap_or_default().parse()?)
}

/// The JSON of alice's `method` on `url` (a 2xx answer).
async fn call(http: &reqwest::Client, method: reqwest::Method, url: String) -> anyhow::Result<Value> {
    let r = http.request(method, url).bearer_auth(ALICE).send().await?;
    Ok(r.error_for_status()?.json().await?)
}

async fn get(http: &reqwest::Client, url: String) -> anyhow::Result<Value> {
    call(http, reqwest::Method::GET, url).await
}

async fn secret(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let v = get(http, format!("{base}/v1/webhook-secret")).await?;
    Ok(v["secret"].as_str().unwrap_or_default().to_string())
}

async fn stack(name: &str, delays: &str) -> anyhow::Result<Stack> {
    Stack::with_env(
        name,
        &[
            ("SDXL_API_KEYS", format!("alice:{ALICE}")),
            ("SDXL_WEBHOOK_RETRY_DELAYS", delays.to_string()),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_signed_post_per_subscribed_event_and_retries_until_a_2xx() -> anyhow::Result<()> {
    let stack = stack("webhooks", "1s,1s,1s").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher_with(&["--webhook-allow-private"]).await?;
    let _worker = stack.spawn_worker("webhook-worker", &[]).await?;
    let http = reqwest::Client::new();
    let secret = secret(&http, &base).await?;
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(secret, self::secret(&http, &base).await?, "the key keeps its secret");

    // Subscribed to running and succeeded: exactly those two, signed.
    let receiver = Receiver::start(&[]).await?;
    let body = JobParams::new("hooked", 2, 1)
        .with("webhook_url", json!(receiver.url))
        .with("webhook_events", json!(["running", "succeeded"]))
        .json();
    let id = submitted_id(&http, &base, &body).await?;
    let (status, _) = stack.wait_terminal(id, Duration::from_secs(120)).await?;
    assert_eq!(status.state, JobState::Succeeded);
    let hits = receiver
        .wait_for(2, Duration::from_secs(30), Duration::from_secs(3))
        .await?;
    assert_eq!(hits.len(), 2, "one POST per subscribed event: {hits:?}");
    let types: Vec<Value> = hits.iter().map(|h| h.json()["type"].clone()).collect();
    assert_eq!(types, [json!("job.running"), json!("job.succeeded")]);
    for hit in &hits {
        assert!(verifies(&secret, hit), "signature of {hit:?}");
        assert!(!verifies("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", hit));
        assert_eq!(hit.json()["data"]["id"], json!(id.to_string()));
        assert_eq!(hit.header("content-type"), "application/json");
    }
    assert_ne!(hits[0].header("webhook-id"), hits[1].header("webhook-id"));
    assert_eq!(hits[0].json()["data"]["state"], "running");
    let done = hits[1].json()["data"].clone();
    assert_eq!(done["state"], "succeeded");
    let grid = done["result"]["grid"]["url"].as_str().unwrap_or_default().to_string();
    let fetched = http.get(&grid).send().await?;
    assert!(
        fetched.status().is_success(),
        "the grid URL in the webhook works: {}",
        fetched.status()
    );
    let record = stack.status(id).await?;
    let delivered = &record.webhooks[&common::rules::WebhookEvent::Succeeded];
    assert_eq!((delivered.attempts, delivered.last_status), (1, Some(200)));

    // Answered 500 twice, then 200: three attempts of one event, none after.
    let flaky = Receiver::start(&[500, 500]).await?;
    let body = JobParams::new("flaky", 2, 2)
        .with("webhook_url", json!(flaky.url))
        .json();
    let id = submitted_id(&http, &base, &body).await?;
    stack.wait_terminal(id, Duration::from_secs(120)).await?;
    let hits = flaky
        .wait_for(3, Duration::from_secs(40), Duration::from_secs(4))
        .await?;
    assert_eq!(hits.len(), 3, "two retries, then nothing: {hits:?}");
    assert!(hits.iter().all(|h| verifies(&secret, h)));
    assert!(hits
        .iter()
        .all(|h| h.header("webhook-id") == hits[0].header("webhook-id")));
    assert!(hits.iter().all(|h| h.json()["type"] == "job.succeeded"));
    let record = stack.status(id).await?;
    let delivery = serde_json::to_value(&record.webhooks)?;
    assert_eq!(delivery["succeeded"]["state"], "delivered", "{delivery}");
    assert_eq!(delivery["succeeded"]["attempts"], 3, "{delivery}");
    assert_eq!(delivery["succeeded"]["last_status"], 200, "{delivery}");

    // A rotated secret: new deliveries verify with the new one and, for a day, the old.
    let rotated = call(&http, reqwest::Method::POST, format!("{base}/v1/webhook-secret/rotate")).await?;
    let new_secret = rotated["secret"].as_str().unwrap_or_default().to_string();
    assert_ne!(new_secret, secret);
    let after = Receiver::start(&[]).await?;
    let body = JobParams::new("rotated", 1, 3)
        .with("webhook_url", json!(after.url))
        .json();
    let id = submitted_id(&http, &base, &body).await?;
    stack.wait_terminal(id, Duration::from_secs(120)).await?;
    let hits = after
        .wait_for(1, Duration::from_secs(30), Duration::from_millis(500))
        .await?;
    assert!(verifies(&new_secret, &hits[0]) && verifies(&secret, &hits[0]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pending_webhook_survives_a_dispatcher_restart_and_internal_targets_are_refused() -> anyhow::Result<()> {
    let stack = stack("webhook_restart", "3s").await?;
    let (mut first, base) = stack.spawn_dispatcher_with(&["--webhook-allow-private"]).await?;
    let _worker = stack.spawn_worker("restart-worker", &[]).await?;
    let http = reqwest::Client::new();
    let secret = secret(&http, &base).await?;
    let receiver = Receiver::start(&[500]).await?;
    let body = JobParams::new("restart", 2, 4)
        .with("webhook_url", json!(receiver.url))
        .json();
    let id = submitted_id(&http, &base, &body).await?;
    receiver
        .wait_for(1, Duration::from_secs(120), Duration::from_millis(300))
        .await?;
    // The first attempt failed; its retry waits on RabbitMQ while no dispatcher runs.
    first.sigterm()?;
    first.wait_exit(Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        receiver.hits().len(),
        1,
        "nothing is delivered while no dispatcher runs"
    );
    let (_second, _) = stack.spawn_dispatcher_with(&["--webhook-allow-private"]).await?;
    let hits = receiver
        .wait_for(2, Duration::from_secs(30), Duration::from_secs(2))
        .await?;
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert_eq!(hits[0].header("webhook-id"), hits[1].header("webhook-id"));
    assert!(hits.iter().all(|h| verifies(&secret, h)));
    assert_eq!(stack.status(id).await?.webhooks.len(), 1);

    // A dispatcher that does not allow private targets refuses them, by field.
    let (_strict, strict) = stack.spawn_dispatcher().await?;
    let job = |url: &str| JobParams::new("ssrf", 1, 5).with("webhook_url", json!(url)).json();
    for url in [
        receiver.url.as_str(),
        "https://127.0.0.1:9/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.7/hook",
        "https://[::1]/hook",
        "https://localhost/hook",
        "http://93.184.216.34/hook",
        "ftp://93.184.216.34/hook",
    ] {
        let (code, answer) = submit(&http, &strict, &job(url)).await?;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {answer}");
        assert_eq!(answer["field"], "webhook_url", "{url}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap_or_default()
                .contains(url.trim_end_matches('/')),
            "{answer}"
        );
    }
    let bad_events = JobParams::new("ssrf", 1, 5)
        .with("webhook_url", json!("https://93.184.216.34/hook"))
        .with("webhook_events", json!(["done"]))
        .json();
    let (code, answer) = submit(&http, &strict, &bad_events).await?;
    assert_eq!(
        (code, answer["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("webhook_events"))
    );
    Ok(())
}

/// The `queued` events of a job's SSE stream, until its stream ends.
async fn queued_positions(http: reqwest::Client, url: String) -> anyhow::Result<(Vec<u64>, Vec<String>)> {
    let response = http.get(url).bearer_auth(ALICE).send().await?.error_for_status()?;
    let mut stream = response.bytes_stream();
    let (mut text, mut positions, mut names) = (String::new(), Vec::new(), Vec::new());
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let name = frame
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or_default();
            let data = frame.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or_default();
            names.push(name.to_string());
            if name == "queued" {
                let v: Value = serde_json::from_str(data)?;
                positions.push(v["queue_position"].as_u64().unwrap_or(u64::MAX));
            }
        }
    }
    Ok((positions, names))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_positions_count_down_as_a_worker_takes_jobs() -> anyhow::Result<()> {
    let stack = stack("queue_position", "1s").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let http = reqwest::Client::new();
    // No worker yet: three jobs of priority 5, then one of 9, which goes first.
    let mut ids = Vec::new();
    for seed in 0..3 {
        ids.push(submitted_id(&http, &base, &JobParams::new("line", 2, seed).json()).await?);
    }
    let urgent = submitted_id(
        &http,
        &base,
        &JobParams::new("urgent", 2, 9).with("priority", json!(9)).json(),
    )
    .await?;
    let position = |id: Uuid| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let v = get(&http, format!("{base}/v1/jobs/{id}")).await?;
            anyhow::Ok(v["queue_position"].as_u64())
        }
    };
    assert_eq!(position(urgent).await?, Some(0));
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(position(*id).await?, Some(i as u64 + 1), "job {i}");
    }
    let depth = get(&http, format!("{base}/v1/queue")).await?;
    assert_eq!(depth["queued"], 4, "{depth}");
    assert_eq!(
        depth["by_priority"][0],
        json!({ "priority": 9, "queued": 1 }),
        "{depth}"
    );
    assert_eq!(
        depth["by_priority"][4],
        json!({ "priority": 5, "queued": 3 }),
        "{depth}"
    );

    // The last job's stream, then a worker: its place counts down to 0, then it runs.
    let last = *ids.last().unwrap();
    let events = tokio::spawn(queued_positions(http.clone(), format!("{base}/v1/jobs/{last}/events")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _worker = stack.spawn_worker("queue-worker", &[]).await?;
    let (status, _) = stack.wait_terminal(last, Duration::from_secs(180)).await?;
    assert_eq!(status.state, JobState::Succeeded);
    let (positions, names) = events.await??;
    assert_eq!(positions.first(), Some(&3), "{positions:?}");
    assert!(positions.windows(2).all(|w| w[1] < w[0]), "counts down: {positions:?}");
    assert_eq!(names.first().map(String::as_str), Some("status"));
    assert_eq!(names.last().map(String::as_str), Some("succeeded"), "{names:?}");
    assert_eq!(position(last).await?, None, "a finished job has no place in line");
    let depth = get(&http, format!("{base}/v1/queue")).await?;
    assert_eq!(depth["queued"], 0, "{depth}");
    Ok(())
}
