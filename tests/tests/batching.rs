//! Batching through the real services: a worker that holds three jobs at a
//! time (`--max-batch-jobs 3`) runs three compatible jobs queued before it
//! started as one batch (their records name the same batch), stores each
//! once, and each grid equals `worker generate`'s for its own request,
//! pixel for pixel; a fourth job of other steps runs after, alone. A job
//! cancelled in a batch ends `cancelled` while the others still run, and
//! they finish with their own images.

use std::time::Duration;

use common::event::EventKind;
use common::status::{JobState, JobStatus};
use e2e_tests::{JobParams, Stack};
use serde_json::json;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(300);

async fn submit(stack: &Stack, params: &JobParams) -> anyhow::Result<Uuid> {
    let mut args = vec!["submit".to_string()];
    args.extend(params.flags());
    let out = stack.cli(&args).await?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

/// Three jobs of other prompts, seeds and guidance, one size, steps and sampler.
fn compatible(steps: u32) -> Vec<JobParams> {
    vec![
        JobParams::new("a lighthouse on a cliff", steps, 11),
        JobParams::new("a red bicycle", steps, 12).with("guidance_scale", json!(7.5)),
        JobParams {
            preview_every: 1,
            ..JobParams::new("a bowl of fruit", steps, 13).with("negative_prompt", json!(""))
        },
    ]
}

async fn assert_stored_once_and_equal_to_generate(
    stack: &Stack,
    status: &JobStatus,
    params: &JobParams,
) -> anyhow::Result<()> {
    let id = status.id;
    assert_eq!(
        stack.objects_of(id).await?,
        vec![
            format!("jobs/{id}/0.png"),
            format!("jobs/{id}/grid.png"),
            format!("jobs/{id}/result.json")
        ],
        "stored once"
    );
    let stored = stack.stored_grid(status).await?;
    let reference = stack.reference_image(params).await?;
    assert!(
        stored == reference,
        "job {id} ({}): the grid equals `worker generate`'s, pixel for pixel",
        params.prompt
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_compatible_jobs_queued_before_the_worker_run_as_one_batch() -> anyhow::Result<()> {
    let stack = Stack::new("batch").await?;
    let events = stack.record_events().await?;
    let params = compatible(4);
    let odd = JobParams::new("fewer steps", 3, 14);
    let mut ids = Vec::new();
    for p in params.iter().chain([&odd]) {
        ids.push(submit(&stack, p).await?);
    }
    // A generous wait: the three deliveries come in one burst, but this
    // machine may be busy.
    let worker = stack
        .spawn_worker("batch-worker", &["--max-batch-jobs", "3", "--batch-wait", "1s"])
        .await?;
    let mut statuses = Vec::new();
    for &id in &ids {
        let (status, _) = stack.wait_terminal(id, TIMEOUT).await?;
        assert_eq!(status.state, JobState::Succeeded, "{status:?}");
        assert_eq!(status.attempt, 1);
        statuses.push(status);
    }
    let batches: Vec<_> = statuses
        .iter()
        .map(|s| s.result.as_ref().and_then(|r| r.batch))
        .collect();
    let first = batches[0].expect("the first three ran as a batch");
    assert_eq!((first.jobs, first.images), (3, 3), "{first:?}");
    assert_eq!(batches[1], Some(first), "one batch");
    assert_eq!(batches[2], Some(first), "one batch");
    assert_eq!(batches[3], None, "the job of other steps ran alone");
    assert!(
        worker.log_text().contains("running 3 jobs as one batch"),
        "{}",
        worker.log_text()
    );
    for (status, p) in statuses.iter().zip(params.iter().chain([&odd])) {
        assert_stored_once_and_equal_to_generate(&stack, status, p).await?;
        let seen = events.of_finished(status.id, Duration::from_secs(10)).await;
        let steps: Vec<u32> = seen
            .iter()
            .filter(|(_, e)| e.kind == EventKind::Progress)
            .map(|(_, e)| e.step)
            .collect();
        assert_eq!(
            steps,
            (1..=p.steps).collect::<Vec<_>>(),
            "job {}: its own progress",
            status.id
        );
        let previews: Vec<u32> = seen
            .iter()
            .filter(|(_, e)| e.kind == EventKind::Preview)
            .map(|(_, e)| e.step)
            .collect();
        let expected: Vec<u32> = (0..=p.steps).step_by(p.preview_every as usize).collect();
        assert_eq!(previews, expected, "job {}: its own previews", status.id);
        assert_eq!(seen.iter().filter(|(_, e)| e.kind.is_terminal()).count(), 1);
    }
    assert_eq!(stack.queue_depths().await?, (0, 0), "every delivery settled");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_cancelled_in_a_batch_ends_while_the_others_run_on() -> anyhow::Result<()> {
    let stack = Stack::new("batch_cancel").await?;
    let params = compatible(30);
    let mut ids = Vec::new();
    for p in &params {
        ids.push(submit(&stack, p).await?);
    }
    let _worker = stack
        .spawn_worker("batch-cancel-worker", &["--max-batch-jobs", "3", "--batch-wait", "1s"])
        .await?;
    let victim = ids[1];
    stack.wait_until(victim, TIMEOUT, |s| s.progress.step >= 3).await?;
    let out = stack.cli(&["cancel".into(), victim.to_string()]).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (cancelled, _) = stack.wait_terminal(victim, TIMEOUT).await?;
    assert_eq!(cancelled.state, JobState::Cancelled, "{cancelled:?}");
    assert!(cancelled.progress.step < 30, "{:?}", cancelled.progress);
    // it ended while the others were still denoising
    for &id in [ids[0], ids[2]].iter() {
        let other = stack.status(id).await?;
        assert_eq!(other.state, JobState::Running, "{other:?}");
        assert!(other.progress.step < 30, "{:?}", other.progress);
    }
    assert!(stack.objects_of(victim).await?.is_empty(), "nothing stored");
    for i in [0, 2] {
        let (status, _) = stack.wait_terminal(ids[i], TIMEOUT).await?;
        assert_eq!(status.state, JobState::Succeeded, "{status:?}");
        let batch = status.result.as_ref().and_then(|r| r.batch).expect("batched");
        assert_eq!(batch.jobs, 3);
        assert_stored_once_and_equal_to_generate(&stack, &status, &params[i]).await?;
    }
    assert_eq!(stack.queue_depths().await?, (0, 0));
    Ok(())
}
