//! One test's view of the system: the services' addresses, a namespace of
//! its own (queue, Redis prefix, bucket), and ways to start workers and a
//! dispatcher, run CLI commands, read statuses, record events and read
//! results, all through the real services.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine as _;
use common::config::{S3Args, Secret};
use common::event::{JobEvent, PREVIEW_DATA_URI_PREFIX};
use common::result_store::ResultStore;
use common::status::{JobState, JobStatus};
use common::status_store::StatusStore;
use futures_util::StreamExt;
use image::RgbImage;
use uuid::Uuid;

pub use crate::process::services_env;
use crate::process::{binaries, workspace_root, Proc};
use crate::watchdog::Watchdog;

pub fn tiny_model() -> PathBuf {
    workspace_root().join("tests/fixtures/sdxl-reference/tiny-sdxl")
}

/// The shared feature goldens (img2img input, mask, LoRAs) of the tiny model.
pub fn features_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/sdxl-features")
}

pub fn tiny_taesd() -> PathBuf {
    workspace_root().join("tests/fixtures/sdxl-reference/tiny-taesdxl")
}

/// The request fields the tests use, turned into CLI flags or JSON.
#[derive(Debug, Clone)]
pub struct JobParams {
    pub prompt: String,
    pub size: u32,
    pub steps: u32,
    pub seed: u64,
    pub preview_every: u32,
    /// More request fields (`scheduler`, …), sent as JSON and as the
    /// matching `worker generate` flags (`--scheduler`, …).
    pub extra: Vec<(String, serde_json::Value)>,
}

impl JobParams {
    pub fn new(prompt: &str, steps: u32, seed: u64) -> Self {
        JobParams {
            prompt: prompt.into(),
            size: 256,
            steps,
            seed,
            preview_every: 2,
            extra: Vec::new(),
        }
    }

    /// `self` with one more request field.
    pub fn with(mut self, field: &str, value: serde_json::Value) -> Self {
        self.extra.push((field.to_string(), value));
        self
    }

    /// The extra fields as flags (`scheduler` → `--scheduler`).
    fn extra_flags(&self) -> Vec<String> {
        self.extra
            .iter()
            .flat_map(|(k, v)| {
                let value = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                [format!("--{}", k.replace('_', "-")), value]
            })
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "prompt": self.prompt,
            "width": self.size,
            "height": self.size,
            "num_inference_steps": self.steps,
            "seed": self.seed,
            "preview_every": self.preview_every,
        });
        for (k, x) in &self.extra {
            v[k.as_str()] = x.clone();
        }
        v
    }

    pub fn flags(&self) -> Vec<String> {
        vec![
            "--prompt".into(),
            self.prompt.clone(),
            "--width".into(),
            self.size.to_string(),
            "--height".into(),
            self.size.to_string(),
            "--steps".into(),
            self.steps.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--preview-every".into(),
            self.preview_every.to_string(),
        ]
        .into_iter()
        .chain(self.extra_flags())
        .collect()
    }
}

pub struct Stack {
    pub queue: String,
    pub prefix: String,
    pub bucket: String,
    pub dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    status: StatusStore,
    watchdog: Watchdog,
}

impl Stack {
    /// A fresh namespace for test `name`.
    pub async fn new(name: &str) -> anyhow::Result<Stack> {
        Self::with_s3_endpoint(name, None).await
    }

    /// As [`Stack::new`], with results on another S3 server.
    pub async fn with_s3_endpoint(name: &str, s3_endpoint: Option<String>) -> anyhow::Result<Stack> {
        let overrides: Vec<(&str, String)> = s3_endpoint.into_iter().map(|e| ("S3_ENDPOINT", e)).collect();
        Self::with_env(name, &overrides).await
    }

    /// As [`Stack::new`], with some service addresses replaced.
    pub async fn with_env(name: &str, overrides: &[(&str, String)]) -> anyhow::Result<Stack> {
        let tag = Uuid::new_v4().simple().to_string()[..10].to_string();
        // A second stack may share a first one's queue (another dispatcher on it).
        let queue = overrides
            .iter()
            .find(|(k, _)| *k == "SDXL_QUEUE")
            .map_or_else(|| format!("e2e.{name}.{tag}"), |(_, q)| q.clone());
        let prefix = format!("e2e:{tag}");
        let bucket = format!("e2e-{}-{tag}", name.replace('_', "-"));
        let mut env: Vec<(String, String)> = services_env()
            .iter()
            .filter(|(k, _)| k.as_str() != "S3S_FS_BIN")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // One compute thread per worker process: the tests run several workers
        // (and several tests) at once on CI's two cores, and candle's thread
        // pool sized to every core in each of them oversubscribes the machine
        // (two workers making 256² images side by side: 4.2–4.6 s a job with
        // two threads each, 2.8–3.1 s with one). A test may set its own.
        env.push(("RAYON_NUM_THREADS".to_string(), "1".to_string()));
        for (key, value) in overrides {
            env.retain(|(k, _)| k != key);
            env.push((key.to_string(), value.clone()));
        }
        env.retain(|(k, _)| k != "S3_BUCKET" && k != "SDXL_QUEUE");
        env.extend([
            ("S3_BUCKET".to_string(), bucket.clone()),
            ("SDXL_QUEUE".to_string(), queue.clone()),
            ("SDXL_REDIS_PREFIX".to_string(), prefix.clone()),
            ("RUST_LOG".to_string(), "info".to_string()),
            ("SDXL_WARMUP_SIZE".to_string(), "256".to_string()),
            ("SDXL_CANCEL_POLL".to_string(), "100ms".to_string()),
        ]);
        let redis_url = env
            .iter()
            .find(|(k, _)| k == "REDIS_URL")
            .map(|(_, v)| v.clone())
            .context("services.sh printed no REDIS_URL")?;
        let status = StatusStore::connect(
            &redis_url,
            common::Names::new(queue.clone(), prefix.clone()),
            Duration::from_secs(3600),
        )
        .await?;
        let dir = tempfile::Builder::new().prefix(&format!("e2e-{name}-")).tempdir()?;
        let watchdog = Watchdog::arm(name, dir.path().to_path_buf());
        Ok(Stack {
            queue,
            prefix,
            bucket,
            dir,
            env,
            status,
            watchdog,
        })
    }

    /// Lets this stack's test run `limit` in all before the watchdog calls
    /// it hung (for a test meant to run longer than the default 20 min).
    pub fn expect_to_run_for(&self, limit: Duration) {
        self.watchdog.extend_to(limit);
    }

    pub fn env(&self, key: &str) -> Option<&str> {
        self.env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// A worker on the tiny model on CPU, ready to consume when this returns.
    pub async fn spawn_worker(&self, name: &str, extra: &[&str]) -> anyhow::Result<Proc> {
        let mut cmd = self.command(&binaries().worker);
        cmd.arg("run")
            .arg("--model")
            .arg(tiny_model())
            .arg("--taesd")
            .arg(tiny_taesd())
            .args([
                "--device",
                "cpu",
                "--dtype",
                "f32",
                "--ranks",
                "1",
                "--worker-name",
                name,
            ])
            .arg("--lora-cache")
            .arg(self.dir.path().join(format!("lora-cache-{name}")))
            .args(extra);
        let mut proc = Proc::spawn(name, cmd, self.dir.path().join(format!("{name}.log")))?;
        proc.wait_for_log("consuming", Duration::from_secs(120)).await?;
        Ok(proc)
    }

    /// `dispatcher serve` on a free port; returns it with its base URL once healthy.
    pub async fn spawn_dispatcher(&self) -> anyhow::Result<(Proc, String)> {
        self.spawn_dispatcher_with(&[]).await
    }

    /// As [`Stack::spawn_dispatcher`], with more `serve` flags.
    pub async fn spawn_dispatcher_with(&self, extra: &[&str]) -> anyhow::Result<(Proc, String)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = self.command(&binaries().dispatcher);
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(extra);
        // A log per port: a test may run two dispatchers on one stack.
        let log = self.dir.path().join(format!("dispatcher-{port}.log"));
        let mut proc = Proc::spawn("dispatcher", cmd, log)?;
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        loop {
            if let Ok(r) = reqwest::get(format!("{base}/healthz")).await {
                if r.status().is_success() {
                    return Ok((proc, base));
                }
            }
            if !proc.is_running() || start.elapsed() > Duration::from_secs(60) {
                bail!("dispatcher did not become healthy:\n{}", proc.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a `dispatcher` CLI command to completion.
    pub async fn cli(&self, args: &[String]) -> anyhow::Result<Output> {
        let mut cmd = self.command(&binaries().dispatcher);
        cmd.args(args).env("RUST_LOG", "warn");
        let cmd = tokio::process::Command::from(cmd);
        let mut cmd = cmd;
        Ok(cmd.output().await?)
    }

    pub fn status_store(&self) -> &StatusStore {
        &self.status
    }

    pub async fn status(&self, id: Uuid) -> anyhow::Result<JobStatus> {
        self.status
            .get(id)
            .await?
            .with_context(|| format!("no status record for {id}"))
    }

    /// Messages ready in this stack's job queue and in its dead-letter queue.
    pub async fn queue_depths(&self) -> anyhow::Result<(u32, u32)> {
        let url = self.env("AMQP_URL").context("AMQP_URL")?;
        let conn = common::queue::connect(url, "e2e-test").await?;
        let channel = conn.create_channel().await?;
        let depths = common::queue::queue_depths(&channel, &self.status.names().clone()).await?;
        let _ = conn.close(200, "done".into()).await;
        Ok(depths)
    }

    /// Polls the status until `done` holds; returns it and every state seen.
    pub async fn wait_until(
        &self,
        id: Uuid,
        timeout: Duration,
        done: impl Fn(&JobStatus) -> bool,
    ) -> anyhow::Result<(JobStatus, Vec<JobState>)> {
        let start = Instant::now();
        let mut seen: Vec<JobState> = Vec::new();
        loop {
            // Redis may be down on purpose: an error is "no answer yet".
            if let Ok(Some(s)) = self.status.get(id).await {
                if seen.last() != Some(&s.state) {
                    seen.push(s.state);
                }
                if done(&s) {
                    return Ok((s, seen));
                }
                if start.elapsed() > timeout {
                    bail!("job {id} still {:?} after {timeout:?} (states seen {seen:?})", s);
                }
            } else if start.elapsed() > timeout {
                bail!("job {id} has no readable status after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn wait_terminal(&self, id: Uuid, timeout: Duration) -> anyhow::Result<(JobStatus, Vec<JobState>)> {
        self.wait_until(id, timeout, |s| s.state.is_terminal()).await
    }

    pub fn result_store(&self) -> anyhow::Result<ResultStore> {
        let get = |key: &str| -> anyhow::Result<String> {
            Ok(self.env(key).with_context(|| format!("{key} not set"))?.to_string())
        };
        let args = S3Args {
            s3_endpoint: get("S3_ENDPOINT")?,
            s3_public_endpoint: None,
            s3_bucket: get("S3_BUCKET")?,
            aws_region: get("AWS_REGION")?,
            aws_access_key_id: Some(Secret(get("AWS_ACCESS_KEY_ID")?)),
            aws_secret_access_key: Some(Secret(get("AWS_SECRET_ACCESS_KEY")?)),
            aws_session_token: None,
            s3_virtual_host_style: false,
            s3_multipart_threshold: 8 * 1024 * 1024,
            s3_presign_ttl: Duration::from_secs(3600),
        };
        Ok(ResultStore::new(&args)?)
    }

    /// Every object stored for job `id`.
    pub async fn objects_of(&self, id: Uuid) -> anyhow::Result<Vec<String>> {
        let objects = self.result_store()?.list(&format!("jobs/{id}/")).await?;
        let mut keys: Vec<String> = objects.into_iter().map(|o| o.key).collect();
        keys.sort();
        Ok(keys)
    }

    /// The stored grid of a finished job, decoded.
    pub async fn stored_grid(&self, status: &JobStatus) -> anyhow::Result<RgbImage> {
        let result = status.result.as_ref().context("no result")?;
        let bytes = reqwest::get(&result.grid.url)
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        Ok(image::load_from_memory(&bytes)?.to_rgb8())
    }

    /// What `worker generate` makes for these parameters.
    pub async fn reference_image(&self, params: &JobParams) -> anyhow::Result<RgbImage> {
        self.reference_image_with(params, &[]).await
    }

    /// As [`Stack::reference_image`], with more `worker generate` flags
    /// (`--image FILE`, `--lora PATH:SCALE`, …).
    pub async fn reference_image_with(&self, params: &JobParams, more: &[String]) -> anyhow::Result<RgbImage> {
        let out = self
            .dir
            .path()
            .join(format!("reference-{}-{}.png", params.seed, Uuid::new_v4()));
        let mut cmd = self.command(&binaries().worker);
        cmd.arg("generate")
            .arg("--model")
            .arg(tiny_model())
            .args(["--device", "cpu", "--dtype", "f32"])
            .args(["--prompt", &params.prompt])
            .args([
                "--width",
                &params.size.to_string(),
                "--height",
                &params.size.to_string(),
            ])
            .args(["--steps", &params.steps.to_string(), "--seed", &params.seed.to_string()])
            .args(params.extra_flags())
            .args(more)
            .arg("--output")
            .arg(&out);
        let status = tokio::process::Command::from(cmd).status().await?;
        if !status.success() {
            bail!("worker generate failed: {status}");
        }
        Ok(image::open(&out)?.to_rgb8())
    }

    /// Starts recording every event published in this stack's namespace.
    pub async fn record_events(&self) -> anyhow::Result<EventRecorder> {
        let url = self.env("REDIS_URL").context("REDIS_URL")?;
        let client = redis::Client::open(url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(format!("{}:job:*:events", self.prefix)).await?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                let channel = msg.get_channel_name().to_string();
                if let Ok(event) = serde_json::from_str::<JobEvent>(&payload) {
                    if let Ok(mut events) = sink.lock() {
                        events.push((channel, event));
                    }
                }
            }
        });
        Ok(EventRecorder { events, task })
    }
}

/// Events seen on the Redis channels, with the channel each came on.
pub struct EventRecorder {
    events: Arc<Mutex<Vec<(String, JobEvent)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventRecorder {
    /// The events of job `id` seen so far, in arrival order.
    pub fn of(&self, id: Uuid) -> Vec<(String, JobEvent)> {
        self.events
            .lock()
            .map(|e| e.iter().filter(|(_, ev)| ev.job_id == id).cloned().collect())
            .unwrap_or_default()
    }

    /// The events of job `id` once its terminal event has arrived. The worker
    /// writes the terminal status before it publishes the terminal event, so
    /// a test that saw the status may read the recorder a moment before the
    /// event reaches it; this waits for it (at most `timeout`, then returns
    /// what has arrived, for the caller's assertion to show).
    pub async fn of_finished(&self, id: Uuid, timeout: Duration) -> Vec<(String, JobEvent)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let events = self.of(id);
            if events.iter().any(|(_, e)| e.kind.is_terminal()) || tokio::time::Instant::now() >= deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EventRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decodes a preview's `data:image/jpeg;base64,` URI as a JPEG.
pub fn decode_preview(event: &JobEvent) -> anyhow::Result<RgbImage> {
    let data = event
        .image
        .as_deref()
        .and_then(|i| i.strip_prefix(PREVIEW_DATA_URI_PREFIX))
        .context("the preview has no JPEG data URI")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(data)?;
    Ok(image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)?.to_rgb8())
}

/// Asserts every field of a succeeded status record is filled.
pub fn assert_fully_filled(s: &JobStatus, expected_worker: &str) {
    assert_eq!(s.state, JobState::Succeeded);
    let started = s.started_at.expect("started_at");
    let finished = s.finished_at.expect("finished_at");
    assert!(s.created_at <= started && started <= finished, "{s:?}");
    assert_eq!(s.worker.as_deref(), Some(expected_worker));
    assert!(s.attempt >= 1);
    assert_eq!(s.progress.step, s.progress.total_steps);
    assert_eq!(s.progress.total_steps, s.request.num_inference_steps);
    assert!(s.error.is_none());
    let r = s.result.as_ref().expect("result");
    assert_eq!(r.images.len(), 1, "one image per rank, one rank");
    for image in std::iter::once(&r.grid).chain(r.images.iter()) {
        assert!(!image.bucket.is_empty() && !image.key.is_empty());
        assert!(image.url.contains("X-Amz-Signature="), "presigned: {}", image.url);
        assert_eq!(image.seed, s.request.seed);
    }
    assert_eq!(
        (r.images[0].width, r.images[0].height),
        (s.request.width, s.request.height)
    );
    // The grid is laid out as torchvision's make_grid: the image plus its padding.
    assert!(
        r.grid.width >= s.request.width && r.grid.height >= s.request.height,
        "{:?}",
        r.grid
    );
    assert_eq!(r.grid.key, format!("jobs/{}/grid.png", s.id));
    assert_eq!(r.images[0].key, format!("jobs/{}/0.png", s.id));
    let t = r.timings;
    assert!(t.model_ms > 0 && t.denoise_ms > 0, "{t:?}");
    assert!(t.model_ms >= t.text_encode_ms + t.denoise_ms + t.decode_ms, "{t:?}");
}
