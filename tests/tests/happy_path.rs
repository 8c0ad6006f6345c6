//! A job through the CLI and one through the HTTP API both go `queued` →
//! `running` → `succeeded` on a CPU worker with the tiny model; their events
//! include a preview that decodes as a JPEG; the grid in the bucket equals,
//! pixel for pixel, what `worker generate` makes for the same seed; every
//! status field is filled.

use std::time::Duration;

use common::event::EventKind;
use common::status::{JobState, JobStatus};
use e2e_tests::stack::{assert_fully_filled, decode_preview};
use e2e_tests::{JobParams, Stack};
use futures_util::StreamExt;
use uuid::Uuid;

const JOB_TIMEOUT: Duration = Duration::from_secs(180);

fn assert_events(events: &[(String, common::JobEvent)], status: &JobStatus, prefix: &str) {
    let id = status.id;
    assert!(
        events
            .iter()
            .all(|(channel, _)| channel == &format!("{prefix}:job:{id}:events")),
        "events come on the job's channel"
    );
    let previews: Vec<_> = events.iter().filter(|(_, e)| e.kind == EventKind::Preview).collect();
    assert!(!previews.is_empty(), "at least one preview: {events:?}");
    for (_, p) in &previews {
        let image = decode_preview(p).expect("preview decodes as JPEG");
        // A preview is a grid of every image, as the final grid is.
        let grid = &status.result.as_ref().expect("result").grid;
        assert_eq!(image.dimensions(), (grid.width, grid.height));
    }
    let steps: Vec<u32> = events
        .iter()
        .filter(|(_, e)| e.kind == EventKind::Progress)
        .map(|(_, e)| e.step)
        .collect();
    assert_eq!(
        steps,
        (1..=status.request.num_inference_steps).collect::<Vec<_>>(),
        "one progress event per step"
    );
    let last = &events.last().expect("events").1;
    assert_eq!(last.kind, EventKind::Succeeded, "the terminal event comes last");
    assert_eq!(events.iter().filter(|(_, e)| e.kind.is_terminal()).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_job_goes_queued_running_succeeded_and_matches_worker_generate() -> anyhow::Result<()> {
    let stack = Stack::new("cli_happy").await?;
    let events = stack.record_events().await?;
    let params = JobParams::new("a lighthouse on a cliff", 10, 4242);

    // No worker yet: the job must wait in the queue.
    let mut submit = vec!["submit".to_string()];
    submit.extend(params.flags());
    let out = stack.cli(&submit).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id: Uuid = String::from_utf8(out.stdout)?.trim().parse()?;
    let out = stack.cli(&["status".into(), id.to_string()]).await?;
    assert!(out.status.success());
    let queued: JobStatus = serde_json::from_slice(&out.stdout)?;
    assert_eq!((queued.id, queued.state), (id, JobState::Queued));
    assert_eq!(queued.request.seed, 4242);

    let _worker = stack.spawn_worker("cli-worker", &[]).await?;
    let previews = stack.dir.path().join("previews");
    let watch_args = [
        "watch".to_string(),
        id.to_string(),
        "--save-previews".into(),
        previews.display().to_string(),
    ];
    let watch = stack.cli(&watch_args);
    let poll = stack.wait_terminal(id, JOB_TIMEOUT);
    let (watched, polled) = tokio::join!(watch, poll);
    let (status, seen) = polled?;
    let watched = watched?;
    assert!(
        watched.status.success(),
        "watch exits 0 on success: {}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let mut states = vec![queued.state];
    states.extend(seen);
    states.dedup();
    assert_eq!(states, [JobState::Queued, JobState::Running, JobState::Succeeded]);
    assert_fully_filled(&status, "cli-worker");

    // `watch`: one JSON line per event, the terminal one last.
    let lines: Vec<common::JobEvent> = String::from_utf8(watched.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.last().map(|e| e.kind), Some(EventKind::Succeeded));
    assert!(std::fs::read_dir(&previews)?.count() >= 1, "previews saved");

    let recorded = events.of_finished(id, Duration::from_secs(10)).await;
    assert_events(&recorded, &status, &stack.prefix);

    let stored = stack.stored_grid(&status).await?;
    let reference = stack.reference_image(&params).await?;
    assert_eq!(stored.dimensions(), reference.dimensions());
    assert!(
        stored == reference,
        "the grid in the bucket equals `worker generate`'s image, pixel for pixel"
    );

    // `status` agrees with the record.
    let out = stack.cli(&["status".into(), id.to_string()]).await?;
    let printed: JobStatus = serde_json::from_slice(&out.stdout)?;
    assert_eq!(printed, status);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_submit_wait_prints_the_final_status_and_saves_the_grid() -> anyhow::Result<()> {
    let stack = Stack::new("cli_wait").await?;
    let _worker = stack.spawn_worker("wait-worker", &[]).await?;
    let params = JobParams::new("a bowl of fruit", 4, 99);
    let grid = stack.dir.path().join("grid.png");
    let mut args = vec!["submit".to_string()];
    args.extend(params.flags());
    args.extend(["--wait".into(), "--output".into(), grid.display().to_string()]);
    let out = stack.cli(&args).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: JobStatus = serde_json::from_slice(&out.stdout)?;
    assert_fully_filled(&status, "wait-worker");
    let saved = image::open(&grid)?.to_rgb8();
    assert!(saved == stack.stored_grid(&status).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_job_goes_queued_running_succeeded_with_sse_events() -> anyhow::Result<()> {
    let stack = Stack::new("http_happy").await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let _worker = stack.spawn_worker("http-worker", &[]).await?;
    let events = stack.record_events().await?;
    let http = reqwest::Client::new();
    let params = JobParams::new("a red bicycle", 10, 777);

    let response = http.post(format!("{base}/v1/jobs")).json(&params.json()).send().await?;
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await?;
    let id: Uuid = body["id"].as_str().unwrap_or_default().parse()?;
    assert_eq!(body["status_url"], format!("/v1/jobs/{id}"));
    assert_eq!(body["events_url"], format!("/v1/jobs/{id}/events"));
    assert_eq!(body["status"]["state"], "queued");

    // SSE: the status first, then progress and previews, one terminal event, end.
    let sse = async {
        let response = http.get(format!("{base}/v1/jobs/{id}/events")).send().await?;
        assert_eq!(response.status(), 200);
        let mut text = String::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk?));
        }
        anyhow::Ok(text)
    };
    let poll = stack.wait_terminal(id, JOB_TIMEOUT);
    let (sse, polled) = tokio::join!(sse, poll);
    let (status, seen) = polled?;
    assert_eq!(seen.last(), Some(&JobState::Succeeded));
    assert!(seen.contains(&JobState::Running), "running was observed: {seen:?}");
    assert_fully_filled(&status, "http-worker");

    let sse = sse?;
    let names: Vec<&str> = sse.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names.first(), Some(&"status"), "{names:?}");
    assert_eq!(names.last(), Some(&"succeeded"), "{names:?}");
    assert_eq!(
        names
            .iter()
            .filter(|n| ["succeeded", "failed", "cancelled"].contains(n))
            .count(),
        1
    );
    assert!(names.contains(&"progress"), "{names:?}");

    assert_events(
        &events.of_finished(id, Duration::from_secs(10)).await,
        &status,
        &stack.prefix,
    );

    // GET status, and the result redirect to a fresh presigned URL.
    let got: JobStatus = http.get(format!("{base}/v1/jobs/{id}")).send().await?.json().await?;
    assert_eq!(got, status);
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let redirect = no_redirects.get(format!("{base}/v1/jobs/{id}/result")).send().await?;
    assert_eq!(redirect.status(), 307);
    let location = redirect.headers()["location"].to_str()?.to_string();
    assert!(location.contains("X-Amz-Signature="), "{location}");
    let bytes = http.get(&location).send().await?.error_for_status()?.bytes().await?;
    let stored = image::load_from_memory(&bytes)?.to_rgb8();
    let reference = stack.reference_image(&params).await?;
    assert!(
        stored == reference,
        "the grid equals `worker generate`'s image, pixel for pixel"
    );

    // The record expires after the default TTL of 7 days.
    let mut redis = redis::Client::open(stack.env("REDIS_URL").unwrap_or_default())?
        .get_multiplexed_async_connection()
        .await?;
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}:job:{id}", stack.prefix))
        .query_async(&mut redis)
        .await?;
    assert!((7 * 86400 - 600..=7 * 86400).contains(&ttl), "TTL {ttl}");

    // The stored objects: the grid, the image and the manifest, with the right types.
    let store = stack.result_store()?;
    assert_eq!(
        store.head(&status.result.as_ref().unwrap().grid.key).await?.as_deref(),
        Some("image/png")
    );
    assert_eq!(
        stack.objects_of(id).await?,
        [
            format!("jobs/{id}/0.png"),
            format!("jobs/{id}/grid.png"),
            format!("jobs/{id}/result.json")
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_returns_the_same_job_and_api_extras_answer() -> anyhow::Result<()> {
    let stack = Stack::new("http_extras").await?;
    let (mut dispatcher, base) = stack.spawn_dispatcher().await?;
    let http = reqwest::Client::new();
    let params = JobParams::new("a quiet harbour", 2, 1);
    let key = Uuid::new_v4().to_string();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = http
            .post(format!("{base}/v1/jobs"))
            .header("Idempotency-Key", &key)
            .json(&params.json())
            .send()
            .await?;
        assert_eq!(r.status(), 202);
        let body: serde_json::Value = r.json().await?;
        ids.push(body["id"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(ids[0], ids[1], "a retried submit returns the same job");
    let other = http.post(format!("{base}/v1/jobs")).json(&params.json()).send().await?;
    let other: serde_json::Value = other.json().await?;
    assert_ne!(other["id"].as_str(), Some(ids[0].as_str()));

    // A seed is drawn and reported when absent.
    let r = http
        .post(format!("{base}/v1/jobs"))
        .json(&serde_json::json!({"prompt": "x"}))
        .send()
        .await?;
    let body: serde_json::Value = r.json().await?;
    assert!(body["status"]["request"]["seed"].is_u64());
    assert_eq!(body["status"]["request"]["num_inference_steps"], 20);

    let health: serde_json::Value = http.get(format!("{base}/healthz")).send().await?.json().await?;
    assert_eq!(
        (&health["rabbitmq"], &health["redis"]),
        (&"ok".into(), &"ok".into()),
        "{health}"
    );
    assert!(
        health["queue_depth"].is_u64(),
        "the depth the queue cap reads: {health}"
    );
    let metrics = http.get(format!("{base}/metrics")).send().await?.text().await?;
    assert!(metrics.contains("sdxl_dispatcher_jobs_submitted_total 3"), "{metrics}");
    assert!(metrics.contains("sdxl_dispatcher_jobs_replayed_total 1"), "{metrics}");
    let openapi: serde_json::Value = http.get(format!("{base}/openapi.json")).send().await?.json().await?;
    assert!(openapi["paths"]["/v1/jobs/{id}/events"]["get"].is_object());
    let missing = http.get(format!("{base}/v1/jobs/{}", Uuid::new_v4())).send().await?;
    assert_eq!(missing.status(), 404);

    // SIGTERM with an event stream open on a job that will never run: the
    // stream ends and the dispatcher exits 0 without waiting for the job.
    let events = http.get(format!("{base}/v1/jobs/{}/events", ids[0])).send().await?;
    assert_eq!(events.status(), 200);
    let reading = tokio::spawn(async move { events.text().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    dispatcher.sigterm()?;
    let exit = dispatcher.wait_exit(Duration::from_secs(20)).await?;
    assert_eq!(exit.code(), Some(0), "{}", dispatcher.log_text());
    let text = tokio::time::timeout(Duration::from_secs(10), reading).await???;
    assert!(text.starts_with("event: status"), "{text}");
    Ok(())
}
