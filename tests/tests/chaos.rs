//! Faults while jobs flow, each against the real services and each closed by
//! the ledger (`e2e_tests::reconcile`): every job the system accepted
//! reached exactly one terminal state, every succeeded job has exactly one
//! stored result, nothing is left in the queue.
//!
//! - RabbitMQ crashes and comes back (its own node): dispatcher and worker reconnect;
//! - Redis restarts (its own server, with an append-only file);
//! - the S3 server is down during uploads, twice;
//! - a worker is killed with SIGKILL three times while jobs flow;
//! - poison messages among good ones;
//! - one message delivered twice, to two workers at once;
//! - two workers on one queue.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::queue::{JobMessage, JobPublisher};
use common::status::{JobState, JobStatus};
use e2e_tests::server::Server;
use e2e_tests::{reconcile, JobParams, Ledger, Stack};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use serde_json::Value;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(300);

fn job(prompt: &str, steps: u32, seed: u64) -> Value {
    JobParams::new(prompt, steps, seed).json()
}

/// Submits over HTTP: `Ok(Ok(id))` when accepted (202), `Ok(Err(id))` when
/// refused with a job id (503: the publish failed and the job is marked failed).
async fn submit(http: &reqwest::Client, base: &str, body: &Value) -> anyhow::Result<Result<Uuid, Uuid>> {
    let r = http.post(format!("{base}/v1/jobs")).json(body).send().await?;
    let status = r.status();
    let body: Value = r.json().await?;
    let id: Uuid = body["id"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|_| anyhow::anyhow!("submit answered {status} without a job id: {body}"))?;
    match status.as_u16() {
        202 => Ok(Ok(id)),
        503 => Ok(Err(id)),
        other => anyhow::bail!("submit answered {other}: {body}"),
    }
}

/// Submits `n` jobs that must all be accepted.
async fn submit_all(http: &reqwest::Client, base: &str, name: &str, n: u64, steps: u32) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::new();
    for i in 0..n {
        match submit(http, base, &job(name, steps, 1000 + i)).await? {
            Ok(id) => ids.push(id),
            Err(id) => anyhow::bail!("job {id} was refused"),
        }
    }
    Ok(ids)
}

/// Waits until one of `ids` runs past `step`.
async fn one_running(stack: &Stack, ids: &[Uuid], step: u32) -> anyhow::Result<Uuid> {
    let start = Instant::now();
    loop {
        for &id in ids {
            if let Ok(Some(s)) = stack.status_store().get(id).await {
                if s.state == JobState::Running && s.progress.step >= step {
                    return Ok(id);
                }
            }
        }
        anyhow::ensure!(start.elapsed() < TIMEOUT, "no job ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report(test: &str, faults: &str, ledger: &Ledger) {
    println!("{test}: {faults}; ledger: {ledger}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_crash_and_restart_mid_run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rabbit = Server::rabbitmq(dir.path()).await?;
    let stack = Stack::with_env("rabbit_restart", &[("AMQP_URL", rabbit.amqp_url())]).await?;
    let events = stack.record_events().await?;
    let (dispatcher, base) = stack.spawn_dispatcher().await?;
    let worker = stack.spawn_worker("rabbit-worker", &[]).await?;
    let http = reqwest::Client::new();
    let mut accepted = submit_all(&http, &base, "before the crash", 4, 6).await?;
    one_running(&stack, &accepted, 1).await?;

    rabbit.stop();
    // While RabbitMQ is down a submit is refused with 503, and its job is
    // marked failed: the client knows, nothing is silently lost.
    let mut refused = Vec::new();
    for i in 0..2 {
        match submit(&http, &base, &job("during the crash", 2, 2000 + i)).await? {
            Err(id) => refused.push(id),
            Ok(id) => anyhow::bail!("job {id} was accepted while RabbitMQ was down"),
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbit.restart().await?;

    // The dispatcher reconnects on the next publish; the worker on its own.
    let start = Instant::now();
    while accepted.len() < 8 {
        match submit(&http, &base, &job("after the restart", 3, 3000 + accepted.len() as u64)).await? {
            Ok(id) => accepted.push(id),
            Err(id) => {
                refused.push(id);
                anyhow::ensure!(
                    start.elapsed() < Duration::from_secs(60),
                    "the dispatcher never reconnected"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let ledger = reconcile(&stack, &accepted, TIMEOUT, Some(&events)).await?;
    assert_eq!(ledger.count(JobState::Succeeded), accepted.len(), "{ledger}");
    let failed = reconcile(&stack, &refused, TIMEOUT, Some(&events)).await?;
    assert_eq!(failed.count(JobState::Failed), refused.len(), "{failed}");
    assert!(
        worker.log_text().contains("reconnecting"),
        "the worker reconnected:\n{}",
        worker.log_text()
    );
    assert!(dispatcher.log_text().contains("job queued"));
    report(
        "rabbitmq",
        &format!(
            "1 broker crash (SIGKILL) and restart; {} submits refused with 503 during it",
            refused.len()
        ),
        &ledger,
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_mid_run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut redis = Server::redis_persistent(dir.path()).await?;
    let stack = Stack::with_env("redis_restart", &[("REDIS_URL", redis.redis_url())]).await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let worker = stack.spawn_worker("redis-worker", &[]).await?;
    let http = reqwest::Client::new();
    let mut ids = submit_all(&http, &base, "through a redis restart", 6, 6).await?;
    one_running(&stack, &ids[1..], 1).await?;
    redis.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart().await?;
    ids.extend(submit_all(&http, &base, "after redis came back", 3, 3).await?);

    // Events published while Redis was down are lost (pub/sub keeps nothing),
    // so the ledger counts states and results only.
    let ledger = reconcile(&stack, &ids, TIMEOUT, None).await?;
    assert_eq!(
        ledger.count(JobState::Succeeded),
        ids.len(),
        "{ledger}\n{}",
        worker.log_text()
    );
    report(
        "redis",
        "1 Redis crash (SIGKILL) for 3 s, then restart from its append-only file",
        &ledger,
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_down_during_uploads() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s3 = Server::s3s_fs(dir.path()).await?;
    let stack = Stack::with_s3_endpoint("s3_outage", Some(s3.http_endpoint())).await?;
    let events = stack.record_events().await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let worker = stack.spawn_worker("s3-outage-worker", &[]).await?;
    let http = reqwest::Client::new();
    let ids = submit_all(&http, &base, "stored despite S3", 6, 4).await?;
    let retries = || worker.log_text().matches("failed; retrying").count();
    for outage in 0..2 {
        one_running(&stack, &ids[outage * 3..], 1).await?;
        let before = retries();
        s3.stop();
        // Down 4 s, and on until an upload has failed on it: a job that was
        // still denoising after 4 s on a loaded machine would otherwise
        // upload only once S3 was back, and the outage would test nothing.
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(4)).await;
        while retries() == before {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(90),
                "no upload met outage {outage} in 90 s:\n{}",
                worker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s3.restart().await?;
    }
    let ledger = reconcile(&stack, &ids, TIMEOUT, Some(&events)).await?;
    assert_eq!(ledger.count(JobState::Succeeded), ids.len(), "{ledger}");
    assert!(
        worker.log_text().contains("failed; retrying"),
        "the worker met the outage"
    );
    report("s3", "2 S3 outages of at least 4 s, each met by an upload", &ledger);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_with_sigkill_repeatedly() -> anyhow::Result<()> {
    let stack = Stack::new("sigkill").await?;
    let events = stack.record_events().await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let http = reqwest::Client::new();
    let ids = submit_all(&http, &base, "killed and redelivered", 8, 8).await?;
    // A short lease, so that a redelivered job does not wait long for the
    // lease of the worker that died holding it.
    let flags = ["--lease-ttl", "2s"];
    let mut worker = stack.spawn_worker("sigkill-worker-0", &flags).await?;
    let mut killed_running = Vec::new();
    for round in 1..=3 {
        let running = one_running(&stack, &ids, 2).await?;
        worker.kill_9();
        killed_running.push(running);
        worker = stack.spawn_worker(&format!("sigkill-worker-{round}"), &flags).await?;
    }
    let ledger = reconcile(&stack, &ids, TIMEOUT, Some(&events)).await?;
    assert_eq!(ledger.count(JobState::Succeeded), ids.len(), "{ledger}");
    assert!(ledger.reruns >= 1, "a killed job ran again: {ledger}");
    for id in &killed_running {
        assert!(
            stack.status(*id).await?.attempt >= 2,
            "job {id} was running when killed"
        );
    }
    drop(worker);
    report("sigkill", "3 SIGKILLs of the worker, each while a job ran", &ledger);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_among_good_ones() -> anyhow::Result<()> {
    let stack = Stack::new("chaos_poison").await?;
    let events = stack.record_events().await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let worker = stack.spawn_worker("poison-chaos-worker", &[]).await?;
    let http = reqwest::Client::new();
    let conn = common::queue::connect(stack.env("AMQP_URL").unwrap_or_default(), "e2e-chaos-poison").await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let publish = |payload: Vec<u8>| {
        let channel = channel.clone();
        let queue = stack.queue.clone();
        async move {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await?;
            anyhow::ensure!(confirm.is_ack());
            anyhow::Ok(())
        }
    };

    // A submitted job (it has its record) whose message was tampered with.
    let tampered = Uuid::new_v4();
    let valid = common::rules::validate(
        &common::JobRequest {
            prompt: Some("tampered".into()),
            ..Default::default()
        },
        || 1,
    )?;
    stack
        .status_store()
        .create(&JobStatus::queued(tampered, valid, chrono::Utc::now()))
        .await?;
    let poisons: Vec<Vec<u8>> = vec![
        b"\x00\xffnot json at all".to_vec(),
        br#"{"id": "not-a-uuid", "request": {}}"#.to_vec(),
        serde_json::to_vec(&serde_json::json!({
            "id": tampered,
            "created_at": chrono::Utc::now(),
            "request": { "prompt": "tampered", "num_inference_steps": 100000 },
        }))?,
    ];
    let mut ids = Vec::new();
    for poison in poisons {
        ids.extend(submit_all(&http, &base, "good", 1, 2).await?);
        publish(poison).await?;
    }
    ids.extend(submit_all(&http, &base, "good after", 2, 2).await?);

    let ledger = reconcile(&stack, &ids, TIMEOUT, Some(&events)).await?;
    assert_eq!(ledger.count(JobState::Succeeded), ids.len(), "{ledger}");
    let poisoned = reconcile(&stack, &[tampered], TIMEOUT, Some(&events)).await?;
    assert_eq!(poisoned.count(JobState::Failed), 1);
    let error = stack.status(tampered).await?.error.unwrap_or_default();
    assert!(error.contains("num_inference_steps"), "{error}");
    let start = Instant::now();
    let dead = loop {
        let (_, dead) = stack.queue_depths().await?;
        if dead >= 3 || start.elapsed() > Duration::from_secs(30) {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead, 3, "every poison message is dead-lettered");
    assert!(worker.log_text().contains("dead-letter"));
    report(
        "poison",
        "3 poison messages (not JSON, no valid id, an out-of-range request of a submitted job), all dead-lettered",
        &ledger,
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_message_delivered_twice_to_two_workers_runs_once() -> anyhow::Result<()> {
    let stack = Stack::new("duplicate").await?;
    let events = stack.record_events().await?;
    let first = stack.spawn_worker("dup-worker-a", &[]).await?;
    let second = stack.spawn_worker("dup-worker-b", &[]).await?;
    let conn = common::queue::connect(stack.env("AMQP_URL").unwrap_or_default(), "e2e-duplicate").await?;
    let publisher = JobPublisher::new(&conn, stack.status_store().names().clone()).await?;
    let mut ids = Vec::new();
    for seed in 0..3u64 {
        let request = JobParams::new("delivered twice", 8, 500 + seed);
        let valid = common::rules::validate(&serde_json::from_value(request.json())?, || 1)?;
        let id = Uuid::new_v4();
        let created = chrono::Utc::now();
        stack
            .status_store()
            .create(&JobStatus::queued(id, valid.clone(), created))
            .await?;
        let message = JobMessage {
            id,
            created_at: created,
            request: valid,
            owner: None,
        };
        // The same message twice, back to back: each idle worker takes one.
        publisher.publish(&message, 5).await?;
        publisher.publish(&message, 5).await?;
        ids.push(id);
    }
    let ledger = reconcile(&stack, &ids, TIMEOUT, Some(&events)).await?;
    assert_eq!(ledger.count(JobState::Succeeded), ids.len(), "{ledger}");
    assert_eq!(ledger.reruns, 0, "no job ran twice: {ledger}");
    let waited = [first.log_text(), second.log_text()]
        .iter()
        .any(|log| log.contains("another worker holds this job") || log.contains("job already finished"));
    assert!(waited, "a duplicate was held back by the lease or the finished record");
    report("duplicate", "3 messages each published twice, 2 workers", &ledger);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_on_one_queue_share_the_jobs() -> anyhow::Result<()> {
    let stack = Stack::new("two_workers").await?;
    let events = stack.record_events().await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let _a = stack.spawn_worker("pair-worker-a", &[]).await?;
    let _b = stack.spawn_worker("pair-worker-b", &[]).await?;
    let http = reqwest::Client::new();
    let ids = submit_all(&http, &base, "shared", 10, 4).await?;
    let ledger = reconcile(&stack, &ids, TIMEOUT, Some(&events)).await?;
    assert_eq!(ledger.count(JobState::Succeeded), ids.len(), "{ledger}");
    assert_eq!(ledger.reruns, 0, "{ledger}");
    let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        let worker = stack.status(*id).await?.worker.unwrap_or_default();
        *by_worker.entry(worker).or_default() += 1;
    }
    assert_eq!(by_worker.len(), 2, "both workers ran jobs: {by_worker:?}");
    report("two workers", &format!("jobs per worker {by_worker:?}"), &ledger);
    Ok(())
}
