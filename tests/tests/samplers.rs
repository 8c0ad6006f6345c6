//! The samplers through the whole system: a job submitted over HTTP with
//! `"scheduler": "dpmpp_2m_karras"` succeeds on a CPU worker, records its
//! sampler in the status and the manifest, and its grid equals, pixel for
//! pixel, what `worker generate --scheduler dpmpp_2m_karras` makes for the
//! same seed; a stochastic sampler (`euler_a`) gives the same images twice
//! from one seed, and a bad name is a 422 naming `scheduler`.

use std::time::Duration;

use common::rules::Scheduler;
use common::status::{JobResult, JobState};
use e2e_tests::{JobParams, Stack};
use serde_json::{json, Value};
use uuid::Uuid;

const JOB_TIMEOUT: Duration = Duration::from_secs(180);

async fn submit(http: &reqwest::Client, base: &str, body: &Value) -> anyhow::Result<Uuid> {
    let response = http.post(format!("{base}/v1/jobs")).json(body).send().await?;
    anyhow::ensure!(response.status() == 202, "submit: {}", response.text().await?);
    let body: Value = response.json().await?;
    Ok(body["id"].as_str().unwrap_or_default().parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dpmpp_2m_karras_job_equals_worker_generate() -> anyhow::Result<()> {
    let stack = Stack::new("sampler_dpm").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let _worker = stack.spawn_worker("sampler-worker", &[]).await?;
    let http = reqwest::Client::new();
    let params = JobParams::new("a harbour at night", 6, 31337).with("scheduler", json!("dpmpp_2m_karras"));
    let id = submit(&http, &base, &params.json()).await?;
    let (status, _) = stack.wait_terminal(id, JOB_TIMEOUT).await?;
    assert_eq!(status.state, JobState::Succeeded, "{:?}", status.error);
    assert_eq!(status.request.scheduler, Scheduler::DpmPp2mKarras);
    let result = status.result.as_ref().expect("a result");
    assert_eq!(
        result.scheduler,
        Scheduler::DpmPp2mKarras,
        "the status records the sampler"
    );
    let manifest = stack
        .result_store()?
        .get(&common::Names::manifest_object(id))
        .await?
        .expect("a manifest");
    let manifest: JobResult = serde_json::from_slice(&manifest)?;
    assert_eq!(
        manifest.scheduler,
        Scheduler::DpmPp2mKarras,
        "the manifest records the sampler"
    );

    let stored = stack.stored_grid(&status).await?;
    let reference = stack.reference_image(&params).await?;
    assert!(
        stored == reference,
        "the grid equals `worker generate --scheduler dpmpp_2m_karras`, pixel for pixel"
    );
    // …and the sampler made a difference: euler's image is another one.
    let euler = stack
        .reference_image(&JobParams::new("a harbour at night", 6, 31337))
        .await?;
    assert!(euler != reference, "dpmpp_2m_karras and euler give different images");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn euler_a_twice_from_one_seed_gives_the_same_images() -> anyhow::Result<()> {
    let stack = Stack::new("sampler_euler_a").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let _worker = stack.spawn_worker("euler-a-worker", &[]).await?;
    let http = reqwest::Client::new();
    let body = JobParams::new("a field of poppies", 4, 2024)
        .with("scheduler", json!("euler_a"))
        .with("num_images", json!(2))
        .json();
    let first = submit(&http, &base, &body).await?;
    let second = submit(&http, &base, &body).await?;
    let (a, _) = stack.wait_terminal(first, JOB_TIMEOUT).await?;
    let (b, _) = stack.wait_terminal(second, JOB_TIMEOUT).await?;
    assert_eq!((a.state, b.state), (JobState::Succeeded, JobState::Succeeded));
    assert!(
        stack.stored_grid(&a).await? == stack.stored_grid(&b).await?,
        "two runs of one seed with a stochastic sampler are identical"
    );
    // the two images of one job have their own seeds, so their own noise
    let (ra, rb) = (a.result.expect("result"), b.result.expect("result"));
    assert_eq!(ra.images.len(), 2);
    assert_eq!((ra.images[0].seed, ra.images[1].seed), (2024, 2025));
    assert_eq!(rb.images[1].seed, 2025);

    let bad = http
        .post(format!("{base}/v1/jobs"))
        .json(&json!({"prompt": "x", "scheduler": "heun"}))
        .send()
        .await?;
    assert_eq!(bad.status(), 422);
    let err: Value = bad.json().await?;
    assert_eq!(err["field"], "scheduler");
    let message = err["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("heun") && message.contains("dpmpp_2m_sde_karras"),
        "{message}"
    );
    Ok(())
}
