//! The job API's conveniences against the real stack: a synchronous submit
//! (`Prefer: wait`).

use std::time::{Duration, Instant};

use common::status::{JobState, JobStatus};
use e2e_tests::{JobParams, Stack};
use reqwest::StatusCode;
use serde_json::Value;

async fn submit_preferring(
    http: &reqwest::Client,
    base: &str,
    prefer: Option<&str>,
    body: &Value,
) -> anyhow::Result<reqwest::Response> {
    let mut request = http.post(format!("{base}/v1/jobs")).json(body);
    if let Some(prefer) = prefer {
        request = request.header("prefer", prefer);
    }
    Ok(request.send().await?)
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefer_wait_answers_200_with_the_final_record_or_202_after_the_wait() -> anyhow::Result<()> {
    let stack = Stack::new("prefer_wait").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let http = reqwest::Client::new();

    // No worker yet: the job cannot end within the wait.
    let start = Instant::now();
    let r = submit_preferring(&http, &base, Some("wait=1"), &JobParams::new("waits", 2, 1).json()).await?;
    let waited = start.elapsed();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "preference-applied"), Some("wait=1"));
    assert!(header(&r, "location").is_some());
    assert!(waited >= Duration::from_millis(950), "answered after {waited:?}");
    let body: Value = r.json().await?;
    assert_eq!(body["status"]["state"], "queued", "{body}");

    // Other preferences are ignored: an answer at once, nothing applied.
    let start = Instant::now();
    let r = submit_preferring(
        &http,
        &base,
        Some("respond-async"),
        &JobParams::new("async", 2, 2).json(),
    )
    .await?;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(header(&r, "preference-applied").is_none());
    assert!(start.elapsed() < Duration::from_millis(900));

    // With a worker a short job ends within the wait: 200, the final record.
    let _worker = stack.spawn_worker("prefer-worker", &[]).await?;
    let mut body = JobParams::new("in time", 2, 3).json();
    body["priority"] = 9.into(); // ahead of the two above
    let r = submit_preferring(&http, &base, Some("wait"), &body).await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "preference-applied"), Some("wait=60"));
    let location = header(&r, "location").unwrap_or_default().to_string();
    let status: JobStatus = r.json().await?;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert_eq!(location, format!("/v1/jobs/{}", status.id));
    assert!(status.result.is_some() && status.finished_at.is_some());
    assert_eq!(stack.status(status.id).await?, status, "the stored final record");

    // A job that runs longer than the wait: 202 with the record of now.
    let r = submit_preferring(&http, &base, Some("wait=1"), &JobParams::new("too long", 100, 4).json()).await?;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "preference-applied"), Some("wait=1"));
    let body: Value = r.json().await?;
    let state = body["status"]["state"].as_str().unwrap_or_default().to_string();
    assert!(state == "queued" || state == "running", "{body}");
    Ok(())
}
