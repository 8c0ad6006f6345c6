//! The job API's conveniences against the real stack: a synchronous submit
//! (`Prefer: wait`), and the listing of a key's jobs (`GET /v1/jobs`).

use std::time::{Duration, Instant};

use common::status::{JobState, JobStatus};
use e2e_tests::{JobParams, Stack};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

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

const ALICE: &str = "alice-key-0123456789";
const BOB: &str = "bob-key-0123456789ab";
const OPS: &str = "ops-key-0123456789abc";

async fn list(http: &reqwest::Client, base: &str, key: &str, query: &str) -> anyhow::Result<(StatusCode, Value)> {
    let r = http
        .get(format!("{base}/v1/jobs{query}"))
        .bearer_auth(key)
        .send()
        .await?;
    Ok((r.status(), r.json().await?))
}

fn ids(page: &Value) -> Vec<Uuid> {
    page["jobs"]
        .as_array()
        .map(|jobs| jobs.iter().filter_map(|j| j["id"].as_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_jobs_lists_the_keys_own_jobs_newest_first_a_page_at_a_time() -> anyhow::Result<()> {
    let keys = format!("alice:{ALICE},bob:{BOB},ops:{OPS}:admin");
    let stack = Stack::with_env("list_jobs", &[("SDXL_API_KEYS", keys)]).await?;
    let (_dispatcher, base) = stack.spawn_dispatcher().await?;
    let http = reqwest::Client::new();

    // No worker: they stay queued. Alice's and Bob's interleaved.
    let mut submitted: Vec<(&str, JobStatus)> = Vec::new();
    for (i, key) in [ALICE, BOB, ALICE, ALICE, BOB, ALICE, ALICE].into_iter().enumerate() {
        let r = http
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(key)
            .json(&JobParams::new(&format!("listed {i}"), 2, i as u64).json())
            .send()
            .await?;
        anyhow::ensure!(r.status() == StatusCode::ACCEPTED, "submit {i}: {}", r.status());
        let body: Value = r.json().await?;
        submitted.push((key, serde_json::from_value(body["status"].clone())?));
    }
    // Newest first: by creation time (ms), then by id, as the index sorts.
    let newest_first = |key: Option<&str>| -> Vec<Uuid> {
        let mut mine: Vec<&JobStatus> = submitted
            .iter()
            .filter(|(k, _)| key.is_none_or(|key| key == *k))
            .map(|(_, s)| s)
            .collect();
        mine.sort_by_key(|s| std::cmp::Reverse((s.created_at.timestamp_millis(), s.id.to_string())));
        mine.iter().map(|s| s.id).collect()
    };
    let alices = newest_first(Some(ALICE));
    assert_eq!(alices.len(), 5);

    // Alice sees only hers, newest first, as full records.
    let (code, page) = list(&http, &base, ALICE, "").await?;
    assert_eq!(code, StatusCode::OK, "{page}");
    assert_eq!(ids(&page), alices);
    assert!(page["next_cursor"].is_null(), "{page}");
    assert_eq!(page["jobs"][0]["owner"], "alice");
    assert_eq!(page["jobs"][0]["state"], "queued");

    // Pages of 2: 2, 2, 1, no job twice and none skipped, the last cursor null.
    let (mut paged, mut sizes, mut query) = (Vec::new(), Vec::new(), "?limit=2".to_string());
    loop {
        let (code, page) = list(&http, &base, ALICE, &query).await?;
        assert_eq!(code, StatusCode::OK, "{page}");
        sizes.push(ids(&page).len());
        paged.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("?limit=2&cursor={cursor}"),
            None => break,
        }
        anyhow::ensure!(sizes.len() < 10, "the pages never end");
    }
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(paged, alices);

    // Bob sees his 2; the admin sees all 7.
    assert_eq!(ids(&list(&http, &base, BOB, "").await?.1), newest_first(Some(BOB)));
    assert_eq!(ids(&list(&http, &base, OPS, "").await?.1), newest_first(None));

    // The state filter: one of Alice's cancelled, the rest queued, none succeeded.
    let cancelled = alices[2];
    let r = http
        .delete(format!("{base}/v1/jobs/{cancelled}"))
        .bearer_auth(ALICE)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let queued: Vec<Uuid> = alices.iter().copied().filter(|id| *id != cancelled).collect();
    assert_eq!(ids(&list(&http, &base, ALICE, "?state=queued").await?.1), queued);
    let (_, page) = list(&http, &base, ALICE, "?state=queued&limit=3").await?;
    assert_eq!(ids(&page), queued[..3]);
    let cursor = page["next_cursor"].as_str().unwrap_or_default().to_string();
    let (_, page) = list(&http, &base, ALICE, &format!("?state=queued&limit=3&cursor={cursor}")).await?;
    assert_eq!(
        (ids(&page), page["next_cursor"].is_null()),
        (queued[3..].to_vec(), true)
    );
    assert_eq!(
        ids(&list(&http, &base, ALICE, "?state=cancelled").await?.1),
        [cancelled]
    );
    let (code, page) = list(&http, &base, ALICE, "?state=succeeded").await?;
    assert_eq!(
        (code, ids(&page).len(), page["next_cursor"].is_null()),
        (StatusCode::OK, 0, true)
    );

    // Bad parameters: 422 naming the parameter, the value and what is allowed.
    for (query, field, words) in [
        ("?limit=0", "limit", "between 1 and 100, got `0`"),
        ("?limit=500", "limit", "got `500`"),
        ("?limit=ten", "limit", "got `ten`"),
        (
            "?state=done",
            "state",
            "one of queued, running, succeeded, failed, cancelled",
        ),
        ("?cursor=not-ours", "cursor", "`next_cursor` of an earlier page"),
    ] {
        let (code, body) = list(&http, &base, ALICE, query).await?;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
        assert!(
            body["error"].as_str().unwrap_or_default().contains(words),
            "{query}: {body}"
        );
    }
    // A key is needed, as for every /v1/jobs route.
    let r = http.get(format!("{base}/v1/jobs")).send().await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    println!("list: 7 jobs of 2 keys; pages 2/2/1; admin 7; filters queued 4, cancelled 1, succeeded 0");
    Ok(())
}
