//! The queue's contract: priorities are honoured, and a publish RabbitMQ does
//! not confirm (refused, or not answered at all) is an error to the caller
//! with the job marked `failed`.

use std::time::{Duration, Instant};

use common::status::JobState;
use e2e_tests::{JobParams, Server, Stack};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_broker_is_a_503_within_the_publish_timeout_and_the_dispatcher_recovers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let rabbit = Server::rabbitmq(dir.path()).await?;
    let stack = Stack::with_env("frozen_rabbit", &[("AMQP_URL", rabbit.amqp_url())]).await?;
    let (_dispatcher, base) = stack.spawn_dispatcher_with(&["--publish-timeout", "2s"]).await?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let submit = |seed: u64| {
        http.post(format!("{base}/v1/jobs"))
            .json(&JobParams::new("frozen?", 2, seed).json())
            .send()
    };
    assert_eq!(submit(1).await?.status(), 202, "accepted while the broker answers");

    // SIGSTOP: the connection stays open and nothing answers, so no confirm
    // and no close ever comes; the submit must not wait for either.
    rabbit.freeze()?;
    let start = Instant::now();
    let refused = submit(2).await;
    let waited = start.elapsed();
    rabbit.thaw()?;
    let refused = refused?;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert!(waited < Duration::from_secs(20), "the submit took {waited:?}");
    let body: serde_json::Value = refused.json().await?;
    assert!(
        body["error"].as_str().unwrap_or_default().contains("did not confirm"),
        "{body}"
    );
    let id: Uuid = body["id"].as_str().unwrap_or_default().parse()?;
    let status = stack.status(id).await?;
    assert_eq!(status.state, JobState::Failed);
    let error = status.error.unwrap_or_default();
    assert!(error.contains("did not confirm") && error.contains("2s"), "{error}");

    // Thawed, the next submit is accepted (on a fresh connection).
    let start = Instant::now();
    loop {
        let r = submit(3).await?;
        if r.status() == 202 {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "no submit accepted after the thaw: {}",
            r.text().await?
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
