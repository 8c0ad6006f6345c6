//! The end-of-test account that every fault and load test closes with: each
//! job the system accepted reached exactly one terminal state, each
//! succeeded job has exactly one stored result (its images, its grid and its
//! manifest, and the manifest is the result its status reports), a job that
//! did not succeed stored nothing, and nothing is left in the queue.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use common::status::{JobResult, JobState, JobStatus};
use common::Names;
use uuid::Uuid;

use crate::stack::{EventRecorder, Stack};

/// What the ledger counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub jobs: usize,
    pub states: BTreeMap<String, usize>,
    /// Succeeded jobs whose full result (images, grid, manifest) is stored once.
    pub results: usize,
    /// Objects stored in all (images, grids, manifests).
    pub objects: usize,
    /// Jobs that ran more than once (a redelivery after a crash or a requeue).
    pub reruns: usize,
    /// Terminal events seen, when a recorder was given.
    pub terminal_events: Option<usize>,
}

impl Ledger {
    pub fn count(&self, state: JobState) -> usize {
        self.states.get(&state.to_string()).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} jobs:", self.jobs)?;
        for (state, n) in &self.states {
            write!(f, " {n} {state},")?;
        }
        write!(
            f,
            " {} results stored once ({} objects), {} ran more than once",
            self.results, self.objects, self.reruns
        )?;
        if let Some(n) = self.terminal_events {
            write!(f, ", {n} terminal events")?;
        }
        Ok(())
    }
}

/// Waits (up to `timeout` in all) until every job in `jobs` is terminal,
/// then checks the account; `events`, when given, must hold exactly one
/// terminal event per job. Fails naming the first job that breaks a rule.
pub async fn reconcile(
    stack: &Stack,
    jobs: &[Uuid],
    timeout: Duration,
    events: Option<&EventRecorder>,
) -> anyhow::Result<Ledger> {
    let start = Instant::now();
    let mut finished: BTreeMap<Uuid, JobStatus> = BTreeMap::new();
    while finished.len() < jobs.len() {
        for &id in jobs {
            if finished.contains_key(&id) {
                continue;
            }
            if let Ok(Some(s)) = stack.status_store().get(id).await {
                if s.state.is_terminal() {
                    finished.insert(id, s);
                }
            }
        }
        if finished.len() < jobs.len() {
            if start.elapsed() > timeout {
                let missing: Vec<_> = jobs.iter().filter(|id| !finished.contains_key(id)).take(5).collect();
                bail!(
                    "{} of {} jobs not terminal after {timeout:?}, e.g. {missing:?}",
                    jobs.len() - finished.len(),
                    jobs.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let store = stack.result_store()?;
    let mut ledger = Ledger {
        jobs: jobs.len(),
        ..Default::default()
    };
    for status in finished.values() {
        let id = status.id;
        *ledger.states.entry(status.state.to_string()).or_default() += 1;
        if status.attempt > 1 {
            ledger.reruns += 1;
        }
        let objects = stack.objects_of(id).await?;
        ledger.objects += objects.len();
        if status.state != JobState::Succeeded {
            ensure!(
                objects.is_empty(),
                "job {id} is {} but stored {objects:?}",
                status.state
            );
            continue;
        }
        let result = status
            .result
            .as_ref()
            .with_context(|| format!("job {id} succeeded without a result"))?;
        let mut expected: Vec<String> = result.images.iter().map(|i| i.key.clone()).collect();
        expected.push(result.grid.key.clone());
        expected.push(Names::manifest_object(id));
        expected.sort();
        ensure!(
            objects == expected,
            "job {id}: stored {objects:?}, its status names {expected:?}"
        );
        let manifest = store
            .get(&Names::manifest_object(id))
            .await?
            .with_context(|| format!("job {id}: no manifest"))?;
        let stored: JobResult = serde_json::from_slice(&manifest)?;
        ensure!(
            stored.grid.key == result.grid.key
                && stored.images.len() == result.images.len()
                && stored
                    .images
                    .iter()
                    .zip(&result.images)
                    .all(|(a, b)| a.key == b.key && a.seed == b.seed),
            "job {id}: the manifest is not the result its status reports"
        );
        ledger.results += 1;
    }
    if let Some(recorder) = events {
        let mut total = 0;
        for &id in jobs {
            let terminal = recorder
                .of_finished(id, Duration::from_secs(10))
                .await
                .iter()
                .filter(|(_, e)| e.kind.is_terminal())
                .count();
            ensure!(terminal == 1, "job {id}: {terminal} terminal events");
            total += terminal;
        }
        ledger.terminal_events = Some(total);
    }
    let (ready, _) = stack.queue_depths().await?;
    ensure!(ready == 0, "{ready} messages still in the job queue");
    Ok(ledger)
}
