//! Load: 1,000 jobs through the HTTP API, consumed by two CPU workers on the
//! tiny model. Every submit is answered 202 with a distinct id, and the
//! ledger closes the run: each job succeeded exactly once, with exactly one
//! stored result and one terminal event, and nothing is left in the queue.
//!
//! The jobs are the cheapest the API takes (256×256, one step, no guidance,
//! no previews, JPEG), so that the run measures the job system rather than
//! the model; it prints its figures (submit rate, wall time, jobs per worker,
//! reruns).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use common::status::JobState;
use e2e_tests::Stack;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use uuid::Uuid;

const JOBS: usize = 1000;
/// Submits in flight at once.
const CONCURRENCY: usize = 16;
/// For the whole run to drain (a run on two cores takes a few minutes).
const TIMEOUT: Duration = Duration::from_secs(40 * 60);

fn request(seed: u64) -> serde_json::Value {
    serde_json::json!({
        "prompt": format!("load test job {seed}"),
        "negative_prompt": "",
        "width": 256,
        "height": 256,
        "num_inference_steps": 1,
        // At most 1: no classifier-free guidance, half the UNet batch.
        "guidance_scale": 1.0,
        "seed": seed,
        "preview_every": 0,
        "output_format": "jpeg",
    })
}

async fn submit(http: &reqwest::Client, base: &str, seed: u64) -> anyhow::Result<Uuid> {
    let r = http.post(format!("{base}/v1/jobs")).json(&request(seed)).send().await?;
    let code = r.status();
    let body: serde_json::Value = r.json().await?;
    ensure!(code == 202, "submit of seed {seed} answered {code}: {body}");
    body["id"]
        .as_str()
        .context("no id in the answer")?
        .parse()
        .context("the id is not a UUID")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_jobs_through_the_api_with_two_workers_all_succeed_once() -> anyhow::Result<()> {
    let start = Instant::now();
    // 0 lifts the dispatcher's per-key rate limit and queue-depth cap; no
    // warm-up generation, the first job warms the worker as well.
    let stack = Stack::with_env(
        "load",
        &[
            ("SDXL_RATE_LIMIT", "0".into()),
            ("SDXL_MAX_QUEUE_DEPTH", "0".into()),
            ("SDXL_WARMUP_STEPS", "0".into()),
        ],
    )
    .await?;
    // Longer than the watchdog's default: the ledger alone may wait TIMEOUT.
    stack.expect_to_run_for(TIMEOUT + Duration::from_secs(5 * 60));
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let (_a, _b) = tokio::try_join!(stack.spawn_worker("load-a", &[]), stack.spawn_worker("load-b", &[]))?;
    let events = stack.record_events().await?;
    let ready = start.elapsed();

    let http = reqwest::Client::new();
    let submitting = Instant::now();
    let ids: Vec<Uuid> = stream::iter(0..JOBS as u64)
        .map(|seed| submit(&http, &base, 1000 + seed))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let submit_time = submitting.elapsed();
    let distinct: BTreeSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(ids.len(), JOBS, "every submit answered");
    assert_eq!(distinct.len(), JOBS, "every id distinct");
    eprintln!(
        "load: {JOBS} submits answered 202 in {:.1} s ({:.0}/s, {CONCURRENCY} in flight, workers consuming meanwhile)",
        submit_time.as_secs_f64(),
        JOBS as f64 / submit_time.as_secs_f64()
    );

    let ledger = e2e_tests::reconcile(&stack, &ids, TIMEOUT, Some(&events)).await?;
    let drained = submitting.elapsed();
    eprintln!("load: {ledger}");
    assert_eq!(ledger.jobs, JOBS);
    assert_eq!(ledger.count(JobState::Succeeded), JOBS, "{ledger}");
    assert_eq!(ledger.results, JOBS, "one stored result per job");
    assert_eq!(ledger.terminal_events, Some(JOBS), "one terminal event per job");

    let mut per_worker: BTreeMap<String, usize> = BTreeMap::new();
    for &id in &ids {
        let worker = stack.status(id).await?.worker.unwrap_or_else(|| "none".into());
        *per_worker.entry(worker).or_default() += 1;
    }
    eprintln!(
        "load: {JOBS} jobs done {:.1} s after the first submit ({:.1} jobs/s); jobs per worker {per_worker:?}; \
         {} reruns; {:.1} s to start the stack; {:.1} s in all",
        drained.as_secs_f64(),
        JOBS as f64 / drained.as_secs_f64(),
        ledger.reruns,
        ready.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(per_worker.values().sum::<usize>(), JOBS);
    assert!(
        per_worker.len() == 2 && per_worker.values().all(|&n| n > 0),
        "both workers took jobs: {per_worker:?}"
    );
    Ok(())
}
