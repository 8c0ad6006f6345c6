//! Failure paths against the real services: a worker killed mid-job, a
//! malformed message, bad requests, cancels, S3 down during a job, and
//! SIGTERM during a job.

use std::time::Duration;

use common::event::EventKind;
use common::status::{JobState, JobStatus};
use e2e_tests::server::Server;
use e2e_tests::{JobParams, Stack};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(240);

async fn submit_http(http: &reqwest::Client, base: &str, params: &JobParams) -> anyhow::Result<Uuid> {
    let r = http.post(format!("{base}/v1/jobs")).json(&params.json()).send().await?;
    anyhow::ensure!(r.status() == 202, "submit answered {}", r.status());
    let body: serde_json::Value = r.json().await?;
    Ok(body["id"].as_str().unwrap_or_default().parse()?)
}

async fn submit_cli(stack: &Stack, params: &JobParams) -> anyhow::Result<Uuid> {
    let mut args = vec!["submit".to_string()];
    args.extend(params.flags());
    let out = stack.cli(&args).await?;
    anyhow::ensure!(
        out.status.success(),
        "submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

/// Waits until the job is running and past `step`.
async fn wait_running_past(stack: &Stack, id: Uuid, step: u32) -> anyhow::Result<JobStatus> {
    Ok(stack
        .wait_until(id, TIMEOUT, |s| {
            s.state.is_terminal() || (s.state == JobState::Running && s.progress.step >= step)
        })
        .await?
        .0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_mid_job_is_redelivered_to_a_second_worker_and_stored_once() -> anyhow::Result<()> {
    let stack = Stack::new("sigkill").await?;
    let mut victim = stack.spawn_worker("victim", &[]).await?;
    let params = JobParams::new("a stormy sea", 30, 31337);
    let id = submit_cli(&stack, &params).await?;
    let running = wait_running_past(&stack, id, 3).await?;
    assert_eq!(
        (running.state, running.attempt, running.worker.as_deref()),
        (JobState::Running, 1, Some("victim"))
    );
    victim.kill_9();

    let _rescuer = stack.spawn_worker("rescuer", &[]).await?;
    let (status, _) = stack.wait_terminal(id, TIMEOUT).await?;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert_eq!(status.attempt, 2, "redelivered once");
    assert_eq!(status.worker.as_deref(), Some("rescuer"));
    assert_eq!(
        stack.objects_of(id).await?,
        [
            format!("jobs/{id}/0.png"),
            format!("jobs/{id}/grid.png"),
            format!("jobs/{id}/result.json")
        ],
        "one result"
    );
    assert!(stack.stored_grid(&status).await? == stack.reference_image(&params).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_invalid_messages_are_dead_lettered_and_the_worker_keeps_serving() -> anyhow::Result<()> {
    let stack = Stack::new("poison").await?;
    let mut worker = stack.spawn_worker("poison-worker", &[]).await?;
    let amqp = stack.env("AMQP_URL").unwrap_or_default().to_string();
    let conn = common::queue::connect(&amqp, "e2e-poison").await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;

    // An invalid request under a job id that has a `queued` record.
    let valid = common::rules::validate(
        &common::JobRequest {
            prompt: Some("x".into()),
            ..Default::default()
        },
        || 1,
    )?;
    let invalid_id = Uuid::new_v4();
    stack
        .status_store()
        .create(&JobStatus::queued(invalid_id, valid, chrono::Utc::now()))
        .await?;
    let invalid = serde_json::json!({
        "id": invalid_id,
        "created_at": chrono::Utc::now(),
        "request": { "prompt": "x", "width": 100 },
    });
    for payload in [b"this is not a job".to_vec(), serde_json::to_vec(&invalid)?] {
        let confirm = channel
            .basic_publish(
                "".into(),
                stack.queue.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        assert!(confirm.is_ack());
    }

    let (failed, _) = stack.wait_terminal(invalid_id, TIMEOUT).await?;
    assert_eq!(failed.state, JobState::Failed);
    let error = failed.error.unwrap_or_default();
    assert!(error.contains("`width`"), "the error names the field: {error}");

    // Both are in the dead-letter queue.
    let dead = format!("{}.dead", stack.queue);
    let mut dead_letters = Vec::new();
    let start = std::time::Instant::now();
    while dead_letters.len() < 2 && start.elapsed() < TIMEOUT {
        match channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await?
        {
            Some(m) => dead_letters.push(m.delivery.data.clone()),
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(dead_letters.len(), 2);
    assert!(dead_letters.iter().any(|d| d.as_slice() == b"this is not a job"));

    // The worker keeps serving.
    assert!(worker.is_running());
    let id = submit_cli(&stack, &JobParams::new("after the poison", 3, 5)).await?;
    let (status, _) = stack.wait_terminal(id, TIMEOUT).await?;
    assert_eq!(status.state, JobState::Succeeded);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_are_422_over_http_and_exit_2_from_the_cli_naming_the_field() -> anyhow::Result<()> {
    let stack = Stack::new("bad_requests").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let http = reqwest::Client::new();
    let cases = [
        (serde_json::json!({}), "prompt", "required"),
        (serde_json::json!({"prompt": ""}), "prompt", "1 to 2000"),
        (
            serde_json::json!({"prompt": "x", "width": 100}),
            "width",
            "256 and 2048",
        ),
        (
            serde_json::json!({"prompt": "x", "height": 1001}),
            "height",
            "multiple of 8",
        ),
        (
            serde_json::json!({"prompt": "x", "num_inference_steps": 0}),
            "num_inference_steps",
            "1 and 100",
        ),
        (
            serde_json::json!({"prompt": "x", "guidance_scale": 31}),
            "guidance_scale",
            "0 and 30",
        ),
        (
            serde_json::json!({"prompt": "x", "num_images": 17}),
            "num_images",
            "1 and 16",
        ),
        (
            serde_json::json!({"prompt": "x", "preview_every": -1}),
            "preview_every",
            "got -1",
        ),
        (
            serde_json::json!({"prompt": "x", "output_format": "gif"}),
            "output_format",
            "png, jpeg, webp",
        ),
        (
            serde_json::json!({"prompt": "x", "priority": 10}),
            "priority",
            "0 and 9",
        ),
        (
            serde_json::json!({"prompt": "x", "width": "wide"}),
            "width",
            "an integer",
        ),
        (
            serde_json::json!({"prompt": "x", "colour": "red"}),
            "colour",
            "unknown field",
        ),
    ];
    for (body, field, words) in cases {
        let r = http.post(format!("{base}/v1/jobs")).json(&body).send().await?;
        assert_eq!(r.status(), 422, "{body}");
        let answer: serde_json::Value = r.json().await?;
        assert_eq!(answer["field"], field, "{body} → {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(field) && message.contains(words), "{body} → {message}");
    }
    let r = http.post(format!("{base}/v1/jobs")).body("{not json").send().await?;
    assert_eq!(r.status(), 422);

    for (flags, field) in [
        (vec!["--width", "100"], "width"),
        (vec!["--steps", "0"], "num_inference_steps"),
        (vec!["--output-format", "gif"], "output_format"),
        (vec!["--priority", "-1"], "priority"),
    ] {
        let mut args: Vec<String> = vec!["submit".into(), "--prompt".into(), "x".into()];
        args.extend(flags.iter().map(|s| s.to_string()));
        let out = stack.cli(&args).await?;
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("`{field}`")), "{flags:?}: {stderr}");
    }
    // Nothing reached the queue: the status store has no record in this namespace
    // beyond what the tests made, and no job was published.
    let metrics = http.get(format!("{base}/metrics")).send().await?.text().await?;
    assert!(
        metrics.contains("sdxl_dispatcher_validation_errors_total{field=\"width\"} 2"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_queued_and_a_running_job_and_the_worker_goes_on() -> anyhow::Result<()> {
    let stack = Stack::new("cancel").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let http = reqwest::Client::new();
    let events = stack.record_events().await?;

    // Queued (no worker yet), cancelled from the CLI.
    let queued = submit_http(&http, &base, &JobParams::new("never drawn", 5, 1)).await?;
    let out = stack.cli(&["cancel".into(), queued.to_string()]).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: JobStatus = serde_json::from_slice(&out.stdout)?;
    assert_eq!(printed.state, JobState::Cancelled);

    let worker = stack.spawn_worker("cancel-worker", &[]).await?;
    // Running, cancelled over HTTP.
    let running = submit_http(&http, &base, &JobParams::new("interrupted", 40, 2)).await?;
    wait_running_past(&stack, running, 2).await?;
    let r = http.delete(format!("{base}/v1/jobs/{running}")).send().await?;
    assert_eq!(r.status(), 202);
    let (status, _) = stack.wait_terminal(running, TIMEOUT).await?;
    assert_eq!(status.state, JobState::Cancelled, "{status:?}");
    assert!(
        status.progress.step < 40,
        "stopped between steps: {:?}",
        status.progress
    );
    assert!(stack.objects_of(running).await?.is_empty(), "nothing stored");
    assert_eq!(
        events
            .of_finished(running, Duration::from_secs(10))
            .await
            .last()
            .map(|(_, e)| e.kind),
        Some(EventKind::Cancelled)
    );
    let again = http.delete(format!("{base}/v1/jobs/{running}")).send().await?;
    assert_eq!(again.status(), 409, "a finished job cannot be cancelled");

    // The worker goes on.
    let next = submit_http(&http, &base, &JobParams::new("carry on", 3, 3)).await?;
    let (status, _) = stack.wait_terminal(next, TIMEOUT).await?;
    assert_eq!(status.state, JobState::Succeeded);
    // The queued job was skipped, never run.
    let skipped = stack.status(queued).await?;
    assert_eq!(
        (skipped.state, skipped.worker, skipped.attempt),
        (JobState::Cancelled, None, 0)
    );
    assert!(
        worker.log_text().contains("job already finished"),
        "{}",
        worker.log_text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_stopped_during_a_job_the_job_completes_once_s3_is_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s3 = Server::s3s_fs(dir.path()).await?;
    let stack = Stack::with_s3_endpoint("s3_down", Some(s3.http_endpoint())).await?;
    let worker = stack.spawn_worker("s3-worker", &[]).await?;
    let id = submit_cli(&stack, &JobParams::new("a patient job", 12, 8)).await?;
    wait_running_past(&stack, id, 1).await?;
    s3.stop();
    // Wait until the worker has tried to upload and is retrying.
    let start = std::time::Instant::now();
    while !worker.log_text().contains("uploading a result failed; retrying") {
        anyhow::ensure!(
            start.elapsed() < TIMEOUT,
            "the worker never retried:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stack.status(id).await?.state,
        JobState::Running,
        "not failed while S3 is down"
    );
    s3.restart().await?;

    let (status, _) = stack.wait_terminal(id, TIMEOUT).await?;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert_eq!(status.attempt, 1);
    assert_eq!(stack.objects_of(id).await?.len(), 3, "grid, image, manifest: once each");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_a_job_finishes_it_and_exits_zero() -> anyhow::Result<()> {
    let stack = Stack::new("sigterm").await?;
    let mut worker = stack.spawn_worker("term-worker", &[]).await?;
    let first = submit_cli(&stack, &JobParams::new("finish me", 20, 11)).await?;
    wait_running_past(&stack, first, 2).await?;
    let second = submit_cli(&stack, &JobParams::new("not me", 3, 12)).await?;
    worker.sigterm()?;
    let exit = worker.wait_exit(TIMEOUT).await?;
    assert_eq!(exit.code(), Some(0), "{}", worker.log_text());
    let status = stack.status(first).await?;
    assert_eq!(
        (status.state, status.worker.as_deref()),
        (JobState::Succeeded, Some("term-worker"))
    );
    assert_eq!(
        stack.status(second).await?.state,
        JobState::Queued,
        "no new job after SIGTERM"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_down_past_the_retry_window_requeues_the_job_which_completes_later_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s3 = Server::s3s_fs(dir.path()).await?;
    let stack = Stack::with_s3_endpoint("s3_requeue", Some(s3.http_endpoint())).await?;
    // Retry for one second only, so the job goes back to the queue.
    let worker = stack.spawn_worker("requeue-worker", &["--retry-for", "1s"]).await?;
    let id = submit_cli(&stack, &JobParams::new("handed back", 12, 21)).await?;
    wait_running_past(&stack, id, 1).await?;
    s3.stop();
    let start = std::time::Instant::now();
    while !worker.log_text().contains("requeueing the job") {
        anyhow::ensure!(
            start.elapsed() < TIMEOUT,
            "the job was never requeued:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!stack.status(id).await?.state.is_terminal(), "not lost, not failed");
    s3.restart().await?;

    let (status, _) = stack.wait_terminal(id, TIMEOUT).await?;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert!(
        status.attempt >= 2,
        "ran again after the requeue: attempt {}",
        status.attempt
    );
    assert_eq!(
        stack.objects_of(id).await?,
        [
            format!("jobs/{id}/0.png"),
            format!("jobs/{id}/grid.png"),
            format!("jobs/{id}/result.json")
        ],
        "stored once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_during_a_job_the_job_completes_and_its_record_is_rewritten() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut redis = Server::redis(dir.path()).await?;
    let stack = Stack::with_env("redis_down", &[("REDIS_URL", redis.redis_url())]).await?;
    let worker = stack.spawn_worker("redis-worker", &[]).await?;
    let id = submit_cli(&stack, &JobParams::new("through a redis restart", 16, 17)).await?;
    wait_running_past(&stack, id, 1).await?;
    redis.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A Redis that keeps nothing on disk comes back empty.
    redis.restart().await?;

    let (status, _) = stack.wait_terminal(id, TIMEOUT).await?;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}\n{}", worker.log_text());
    assert_eq!((status.attempt, status.worker.as_deref()), (1, Some("redis-worker")));
    assert!(status.result.is_some() && status.started_at.is_some());
    assert_eq!(stack.objects_of(id).await?.len(), 3, "stored once");
    Ok(())
}
