//! Two dispatchers on one stack (one queue, one Redis prefix), as replicas
//! behind a load balancer: a key's rate limit holds across them (its burst
//! is the key's, not each dispatcher's), and one `Idempotency-Key` sent to
//! both makes one job.

use e2e_tests::{JobParams, Stack};
use reqwest::StatusCode;
use serde_json::Value;

const ALICE: &str = "alice-key-0123456789";
const BOB: &str = "bob-key-0123456789ab";

async fn submit(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    idempotency_key: Option<&str>,
) -> anyhow::Result<reqwest::Response> {
    let mut request = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(key)
        .json(&JobParams::new("one of many replicas", 2, 5).json());
    if let Some(k) = idempotency_key {
        request = request.header("idempotency-key", k);
    }
    Ok(request.send().await?)
}

async fn accepted_id(r: reqwest::Response) -> anyhow::Result<(String, bool)> {
    let status = r.status();
    let replayed = r.headers().get("idempotent-replayed").is_some();
    let body: Value = r.json().await?;
    anyhow::ensure!(status == StatusCode::ACCEPTED, "submit answered {status}: {body}");
    Ok((body["id"].as_str().unwrap_or_default().to_string(), replayed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rate_limit_and_idempotency_keys_hold_across_two_dispatchers() -> anyhow::Result<()> {
    let stack = Stack::with_env(
        "replicas",
        &[
            ("SDXL_API_KEYS", format!("alice:{ALICE},bob:{BOB}")),
            ("SDXL_MAX_QUEUE_DEPTH", "0".into()),
        ],
    )
    .await?;
    // A burst of 4, then 2 a minute (one every 30 s).
    let flags = ["--rate-limit", "2", "--rate-burst", "4"];
    let (_a, base_a) = stack.spawn_dispatcher_with(&flags).await?;
    let (_b, base_b) = stack.spawn_dispatcher_with(&flags).await?;
    let http = reqwest::Client::new();
    let bases = [base_a.as_str(), base_b.as_str()];

    // Alice's burst of 4, alternating between the two: all accepted.
    for i in 0..4 {
        accepted_id(submit(&http, bases[i % 2], ALICE, None).await?).await?;
    }
    // The 5th is refused on either, as one dispatcher would refuse it.
    for base in bases {
        let r = submit(&http, base, ALICE, None).await?;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "{base}");
        let retry_after: u64 = r.headers()["retry-after"].to_str()?.parse()?;
        assert!((1..=30).contains(&retry_after), "Retry-After: {retry_after}");
        let body: Value = r.json().await?;
        assert!(body["error"].as_str().unwrap_or_default().contains("alice"), "{body}");
    }
    // Bob's allowance is his own.
    accepted_id(submit(&http, &base_b, BOB, None).await?).await?;

    // One Idempotency-Key sent to both: one job, the second a replay.
    let (first, replayed) = accepted_id(submit(&http, &base_a, BOB, Some("retry-1")).await?).await?;
    assert!(!replayed);
    let (second, replayed) = accepted_id(submit(&http, &base_b, BOB, Some("retry-1")).await?).await?;
    assert_eq!(second, first);
    assert!(replayed, "the second answer says it is a replay");
    // Bob's jobs, as either dispatcher lists them: the first one and this one.
    for base in bases {
        let page: Value = http
            .get(format!("{base}/v1/jobs"))
            .bearer_auth(BOB)
            .send()
            .await?
            .json()
            .await?;
        let jobs = page["jobs"].as_array().cloned().unwrap_or_default();
        assert_eq!(jobs.len(), 2, "{page}");
        assert_eq!(jobs[0]["id"], first.as_str());
    }
    let (ready, _) = stack.queue_depths().await?;
    assert_eq!(ready, 4 + 1 + 1, "Alice's 4, Bob's 1, one idempotent job");
    println!("replicas: burst 4 across 2 dispatchers, 5th refused on both; one job for one Idempotency-Key");
    Ok(())
}
