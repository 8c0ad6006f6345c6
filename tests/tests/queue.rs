//! The queue's contract: priorities are honoured, and a publish RabbitMQ does
//! not confirm is an error to the caller with the job marked `failed`.

use std::time::Duration;

use common::status::JobState;
use e2e_tests::{JobParams, Stack};
use lapin::options::QueueDeleteOptions;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn higher_priority_jobs_run_first() -> anyhow::Result<()> {
    let stack = Stack::new("priority").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    // Queued with no worker: 1 (low) first, then 9 (high).
    for priority in [1, 9] {
        let mut body = JobParams::new("ordered", 2, priority).json();
        body["priority"] = priority.into();
        let r = http.post(format!("{base}/v1/jobs")).json(&body).send().await?;
        assert_eq!(r.status(), 202);
        let body: serde_json::Value = r.json().await?;
        ids.push(body["id"].as_str().unwrap_or_default().parse::<Uuid>()?);
    }
    let _worker = stack.spawn_worker("priority-worker", &[]).await?;
    let (low, _) = stack.wait_terminal(ids[0], TIMEOUT).await?;
    let (high, _) = stack.wait_terminal(ids[1], TIMEOUT).await?;
    assert_eq!((low.state, high.state), (JobState::Succeeded, JobState::Succeeded));
    assert!(
        high.started_at < low.started_at,
        "priority 9 started at {:?}, priority 1 at {:?}",
        high.started_at,
        low.started_at
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unconfirmed_publish_is_an_error_and_the_job_is_marked_failed() -> anyhow::Result<()> {
    let stack = Stack::new("unconfirmed").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    // Remove the queue under the dispatcher: the broker cannot route the job.
    let conn = common::queue::connect(stack.env("AMQP_URL").unwrap_or_default(), "e2e-unconfirmed").await?;
    let channel = conn.create_channel().await?;
    channel
        .queue_delete(stack.queue.as_str().into(), QueueDeleteOptions::default())
        .await?;

    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/jobs"))
        .json(&JobParams::new("lost?", 2, 1).json())
        .send()
        .await?;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await?;
    let id: Uuid = body["id"].as_str().unwrap_or_default().parse()?;
    let status = stack.status(id).await?;
    assert_eq!(
        status.state,
        JobState::Failed,
        "never a job that silently does not exist"
    );
    assert!(status.error.unwrap_or_default().contains("could not be queued"));

    Ok(())
}
