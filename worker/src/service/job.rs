//! One job, from the bytes of a delivery to the decision to ack, reject or
//! requeue it.
//!
//! Order matters: results are stored (images, grid, then manifest), then the
//! status says `succeeded`, then the terminal event is published, and only
//! then is the delivery acked. A crash anywhere before the ack redelivers the
//! job; the manifest keeps a redelivery from storing the result twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::event::{EventKind, JobEvent};
use common::queue::{decode_message, JobMessage};
use common::result_store::ResultStore;
use common::rules::WebhookEvent;
use common::rules::{Scheduler, ValidJob};
use common::status::{JobResult, JobState, JobStatus, Progress, Timings};
use common::status_store::{StatusStore, Update};
use common::webhook;
use lapin::Channel;
use sdxl::scheduler::SamplerKind;
use tracing::Instrument;
use uuid::Uuid;

use super::config::WorkerConfig;
use super::error::JobError;
use super::events::PreviewSink;
use super::generation::{generate, Generation};
use super::inputs::{fetch_images, JobInputs, LoraCache};
use super::results;
use super::retry::{retry, Backoff};
use crate::engine::{Engine, EngineJob, EngineLora};

/// What to tell RabbitMQ about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Done (succeeded, cancelled, or already finished before).
    Ack,
    /// Poison: reject without requeue, RabbitMQ dead-letters it.
    Reject,
    /// Transient failure: nack with requeue, a worker gets it again.
    Requeue,
}

/// Everything a job needs, shared by all jobs of this worker.
pub struct JobContext {
    pub engine: Arc<dyn Engine>,
    pub status: StatusStore,
    pub results: ResultStore,
    pub config: WorkerConfig,
    pub worker_name: String,
    pub loras: LoraCache,
    /// The channel (confirm mode) of this RabbitMQ session that webhook
    /// events are published on; set by each session.
    pub webhooks: std::sync::Mutex<Option<Channel>>,
}

impl JobContext {
    fn backoff(&self) -> Backoff {
        Backoff::new(self.config.retry_for)
    }

    /// Announces the webhook event of `record`'s state (if its webhook wants
    /// it), before the delivery is settled: a failure requeues the job, whose
    /// next run announces it again.
    async fn announce(&self, record: &JobStatus) -> Result<(), JobError> {
        let channel = self.webhooks.lock().ok().and_then(|c| c.clone());
        let needed = WebhookEvent::of_state(record.state).is_some_and(|e| record.request.webhook_for(e).is_some());
        if !needed {
            return Ok(());
        }
        let channel = channel
            .ok_or_else(|| JobError::Transient("no RabbitMQ channel to announce the webhook event on".into()))?;
        retry(self.backoff(), "announcing the webhook event", || {
            webhook::announce(&channel, &self.status, record)
        })
        .await
        .map_err(|e| JobError::Transient(e.to_string()))?;
        Ok(())
    }
}

/// Handles one delivery's payload and says what to do with it.
pub async fn handle(ctx: &JobContext, payload: &[u8]) -> Disposition {
    // Anything can be published to a queue: decode and validate again, with
    // the dispatcher's own rules.
    let message = match decode_message(payload) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, bytes = payload.len(), "poison message: dead-lettering it");
            if let Some(id) = e.id {
                let span = tracing::info_span!("job", %id);
                if let Err(e) = mark_failed(ctx, id, &e.reason).instrument(span.clone()).await {
                    tracing::error!(parent: &span, error = %e, "could not mark the poison job failed");
                }
            }
            return Disposition::Reject;
        }
    };
    let id = message.id;
    let span = tracing::info_span!("job", %id);
    let outcome = run(ctx, &message).instrument(span.clone()).await;
    match &outcome {
        Ok(()) => {}
        Err(JobError::Poison(reason)) => {
            tracing::error!(parent: &span, %reason, "poison job: marking it failed and dead-lettering it");
            if let Err(e) = mark_failed(ctx, id, reason).instrument(span.clone()).await {
                tracing::error!(parent: &span, error = %e, "could not mark the poison job failed");
            }
        }
        Err(JobError::Transient(reason)) => {
            tracing::warn!(parent: &span, %reason, "transient failure outlasted the retries: requeueing the job");
        }
    }
    disposition(&outcome)
}

/// What a handled job's outcome means for its delivery: done (succeeded,
/// cancelled, or finished before) is acked; poison is rejected, which
/// dead-letters it; a transient failure is requeued for another try.
pub fn disposition(outcome: &Result<(), JobError>) -> Disposition {
    match outcome {
        Ok(()) => Disposition::Ack,
        Err(JobError::Poison(_)) => Disposition::Reject,
        Err(JobError::Transient(_)) => Disposition::Requeue,
    }
}

fn engine_job(job: &ValidJob, inputs: JobInputs, loras: Vec<EngineLora>) -> EngineJob {
    EngineJob {
        prompt: job.prompt.clone(),
        negative_prompt: (!job.negative_prompt.is_empty()).then(|| job.negative_prompt.clone()),
        width: job.width as usize,
        height: job.height as usize,
        num_inference_steps: job.num_inference_steps as usize,
        guidance_scale: job.guidance_scale,
        scheduler: sampler(job.scheduler),
        seed: job.seed,
        num_images: job.num_images.map(|n| n as usize),
        preview_every: job.preview_every as usize,
        init_image: inputs.image,
        mask: inputs.mask,
        strength: job.strength.unwrap_or(1.0),
        loras,
    }
}

/// The model's sampler of a request's scheduler (the two lists have the
/// same names; a test below checks it).
fn sampler(s: Scheduler) -> SamplerKind {
    SamplerKind::from_name(s.name()).expect("every scheduler of the rules is a sampler of the model")
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

async fn run(ctx: &JobContext, message: &JobMessage<ValidJob>) -> Result<(), JobError> {
    let id = message.id;
    let backoff = ctx.backoff();
    let job = message.request.clone();

    let Some(_lease) = take_lease(ctx, id).await? else {
        tracing::info!("another worker finished this job meanwhile: acking it");
        return Ok(());
    };
    let current = retry(backoff, "reading the status", || ctx.status.get(id)).await?;
    if let Some(s) = current.as_ref().filter(|s| s.state.is_terminal()) {
        tracing::info!(state = %s.state, "job already finished: acking it");
        // Its end may have been written by a worker that died before it
        // announced it (the record says whether it did).
        return ctx.announce(s).await;
    }
    let mut queued = JobStatus::queued(id, job.clone(), message.created_at);
    queued.owner.clone_from(&message.owner);
    if retry(backoff, "reading the cancel flag", || ctx.status.cancel_requested(id)).await? {
        return finish_cancelled(ctx, id, current.as_ref().unwrap_or(&queued)).await;
    }
    if let Some(result) = results::load_manifest(&ctx.results, id, backoff).await? {
        tracing::info!("a previous attempt stored the result: finishing from it");
        return finish_succeeded(ctx, id, current.as_ref().unwrap_or(&queued), result).await;
    }

    let started_at = Utc::now();
    let running = retry(backoff, "writing `running`", || {
        ctx.status.update(id, |current| {
            let mut next = start(current, id, &job, message.created_at, started_at, &ctx.worker_name)?;
            if current.is_none() {
                next.owner.clone_from(&message.owner);
            }
            Some(next)
        })
    })
    .await?;
    let status = match running {
        Update::Written(s) => s,
        Update::Unchanged(s) => {
            tracing::info!(state = ?s.as_ref().map(|s| s.state), "job finished meanwhile: acking it");
            return match s {
                Some(s) => ctx.announce(&s).await,
                None => Ok(()),
            };
        }
    };
    tracing::info!(attempt = status.attempt, worker = %ctx.worker_name, "running");
    ctx.announce(&status).await?;

    let inputs = fetch_images(&ctx.results, &job, backoff).await?;
    let loras = ctx.loras.fetch_all(&ctx.results, &job.loras, backoff).await?;

    // The engine runs on a blocking thread; the cancel flag is polled from
    // Redis, and the deadline stops the engine the same way.
    let cancel = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll_cancel(
        ctx.status.clone(),
        id,
        cancel.clone(),
        ctx.config.cancel_poll,
    ));
    let sink = PreviewSink::start(ctx.status.clone(), id);
    let deadline = ctx.config.job_deadline;
    let model_start = Instant::now();
    let generated = generate(
        ctx.engine.clone(),
        engine_job(&job, inputs, loras),
        cancel,
        deadline,
        sink.callback(),
    )
    .await;
    let model_time = model_start.elapsed();
    poller.abort();
    sink.finish().await;
    let output = match generated {
        Generation::Done(output) => output,
        Generation::Cancelled => return finish_cancelled(ctx, id, &status).await,
        Generation::PastDeadline => {
            return Err(JobError::Poison(format!(
                "the job ran past its deadline of {} s and was stopped at step {} (SDXL_JOB_DEADLINE)",
                deadline.as_secs_f64(),
                ctx.status.get(id).await.ok().flatten().map_or(0, |s| s.progress.step)
            )))
        }
        Generation::Failed(reason) => return Err(JobError::Poison(reason)),
    };

    let upload_start = Instant::now();
    let (format, quality) = (job.output_format, ctx.config.jpeg_quality);
    let encoded =
        tokio::task::spawn_blocking(move || results::encode(id, &output, format, quality).map(|e| (e, output.timings)))
            .await
            .map_err(|e| JobError::Poison(format!("encoding panicked: {e}")))??;
    let (encoded, stage) = encoded;
    let (images, grid) = results::upload(&ctx.results, &encoded, backoff).await?;
    let timings = Timings {
        queue_wait_ms: (started_at - message.created_at).num_milliseconds().max(0) as u64,
        model_ms: millis(model_time),
        text_encode_ms: millis(stage.text_encode),
        image_encode_ms: millis(stage.image_encode),
        denoise_ms: millis(stage.denoise),
        preview_ms: millis(stage.preview),
        decode_ms: millis(stage.decode),
        upload_ms: millis(upload_start.elapsed()),
    };
    let result = JobResult {
        grid,
        images,
        timings,
        scheduler: job.scheduler,
    };
    results::write_manifest(&ctx.results, id, &result, backoff).await?;
    finish_succeeded(ctx, id, &status, result).await
}

/// The `running` record: from `queued`, from `running` (a redelivery), or
/// from nothing (a job published straight to the queue, or an expired record).
fn start(
    current: Option<&JobStatus>,
    id: Uuid,
    job: &ValidJob,
    created_at: DateTime<Utc>,
    now: DateTime<Utc>,
    worker: &str,
) -> Option<JobStatus> {
    let mut next = match current {
        Some(s) if s.state.is_terminal() => return None,
        Some(s) => s.clone(),
        None => JobStatus::queued(id, job.clone(), created_at),
    };
    next.state = JobState::Running;
    next.started_at = Some(now);
    next.worker = Some(worker.to_string());
    next.attempt += 1;
    next.progress = Progress {
        step: 0,
        total_steps: job.num_inference_steps,
    };
    next.error = None;
    Some(next)
}

/// The job's lease, renewed in the background while held; given back when
/// dropped.
struct Lease {
    store: StatusStore,
    id: Uuid,
    holder: String,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
        let (store, id, holder) = (self.store.clone(), self.id, std::mem::take(&mut self.holder));
        tokio::spawn(async move {
            if let Err(e) = store.release_lease(id, &holder).await {
                tracing::debug!(error = %e, "could not release the lease (it expires by itself)");
            }
        });
    }
}

/// Takes the job's lease, waiting while another worker holds it. `None`:
/// the job became terminal while waiting (the other worker finished it).
async fn take_lease(ctx: &JobContext, id: Uuid) -> Result<Option<Lease>, JobError> {
    let (ttl, backoff) = (ctx.config.lease_ttl, ctx.backoff());
    let holder = ctx.worker_name.clone();
    let waited = Instant::now();
    let mut told = false;
    loop {
        let other = retry(backoff, "taking the job's lease", || {
            ctx.status.acquire_lease(id, &holder, ttl)
        })
        .await?;
        let Some(other) = other else {
            break;
        };
        if !told {
            tracing::info!(holder = %other, "another worker holds this job: waiting for it to finish or its lease to expire");
            told = true;
        }
        if let Ok(Some(s)) = ctx.status.get(id).await {
            if s.state.is_terminal() {
                return Ok(None);
            }
        }
        if waited.elapsed() > ctx.config.job_deadline + ttl {
            return Err(JobError::Transient(format!(
                "{other} has held the job's lease for {:?}",
                waited.elapsed()
            )));
        }
        tokio::time::sleep((ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(2))).await;
    }
    let renewer = tokio::spawn({
        let (store, holder) = (ctx.status.clone(), holder.clone());
        async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                match store.renew_lease(id, &holder, ttl).await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!("lost the job's lease to another worker"),
                    Err(e) => tracing::warn!(error = %e, "could not renew the job's lease"),
                }
            }
        }
    });
    Ok(Some(Lease {
        store: ctx.status.clone(),
        id,
        holder,
        renewer,
    }))
}

async fn poll_cancel(store: StatusStore, id: Uuid, flag: Arc<AtomicBool>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match store.cancel_requested(id).await {
            Ok(true) => {
                tracing::info!("cancel requested: stopping after this step");
                flag.store(true, Ordering::Relaxed);
                return;
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read the cancel flag now"),
        }
    }
}

fn terminal_event(id: Uuid, kind: EventKind, status: &JobStatus) -> JobEvent {
    JobEvent {
        kind,
        job_id: id,
        step: status.progress.step,
        total_steps: status.progress.total_steps,
        image: None,
        error: status.error.clone(),
    }
}

/// Writes a terminal state (unless the record is terminal already), then
/// publishes the terminal event. `base` is the record to finish when Redis
/// has lost it (restarted without persistence, or expired).
async fn finish(
    ctx: &JobContext,
    id: Uuid,
    kind: EventKind,
    base: Option<&JobStatus>,
    change: impl Fn(&mut JobStatus) + Copy,
) -> Result<(), JobError> {
    let backoff = ctx.backoff();
    let update = retry(backoff, "writing the final status", || {
        ctx.status.update(id, |current| {
            let mut next = match current {
                Some(s) if s.state.is_terminal() => return None,
                Some(s) => s.clone(),
                None => base?.clone(),
            };
            next.finished_at = Some(Utc::now());
            change(&mut next);
            Some(next)
        })
    })
    .await?;
    match update {
        Update::Written(status) => {
            tracing::info!(state = %status.state, "job finished");
            let event = terminal_event(id, kind, &status);
            retry(backoff, "publishing the final event", || {
                ctx.status.publish_event(&event)
            })
            .await?;
            ctx.announce(&status).await
        }
        // Finished before: its end may still need announcing.
        Update::Unchanged(Some(status)) => ctx.announce(&status).await,
        Update::Unchanged(None) => Ok(()),
    }
}

async fn finish_succeeded(ctx: &JobContext, id: Uuid, base: &JobStatus, result: JobResult) -> Result<(), JobError> {
    let result = &result;
    finish(ctx, id, EventKind::Succeeded, Some(base), move |s| {
        s.state = JobState::Succeeded;
        s.progress.step = s.progress.total_steps;
        s.result = Some(result.clone());
    })
    .await
}

async fn finish_cancelled(ctx: &JobContext, id: Uuid, base: &JobStatus) -> Result<(), JobError> {
    finish(ctx, id, EventKind::Cancelled, Some(base), |s| {
        s.state = JobState::Cancelled
    })
    .await
}

async fn mark_failed(ctx: &JobContext, id: Uuid, reason: &str) -> Result<(), JobError> {
    finish(ctx, id, EventKind::Failed, None, |s| {
        s.state = JobState::Failed;
        s.error = Some(reason.to_string());
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::rules::validate;
    use common::rules::JobRequest;

    fn job() -> ValidJob {
        let req = JobRequest {
            prompt: Some("p".into()),
            num_inference_steps: Some(3),
            ..Default::default()
        };
        validate(&req, || 1).unwrap()
    }

    #[test]
    fn start_counts_attempts_and_keeps_creation_time() {
        let t0 = Utc::now();
        let first = start(None, Uuid::nil(), &job(), t0, t0, "w1").unwrap();
        assert_eq!(
            (first.state, first.attempt, first.created_at),
            (JobState::Running, 1, t0)
        );
        let again = start(Some(&first), Uuid::nil(), &job(), t0, Utc::now(), "w2").unwrap();
        assert_eq!((again.attempt, again.worker.as_deref()), (2, Some("w2")));
        assert_eq!(
            again.progress,
            Progress {
                step: 0,
                total_steps: 3
            }
        );
        let mut done = again.clone();
        done.state = JobState::Cancelled;
        assert!(start(Some(&done), Uuid::nil(), &job(), t0, t0, "w3").is_none());
    }

    /// What each outcome does to the delivery: the decision the consumer
    /// acts on, together with `generation`'s tests of how engine calls end.
    #[test]
    fn outcomes_decide_ack_reject_or_requeue() {
        assert_eq!(disposition(&Ok(())), Disposition::Ack);
        let poison = Err(JobError::Poison("`width` must be a multiple of 8".into()));
        assert_eq!(disposition(&poison), Disposition::Reject);
        let transient = Err(JobError::Transient("S3 unreachable".into()));
        assert_eq!(disposition(&transient), Disposition::Requeue);
    }

    /// The request's schedulers and the model's samplers are the same list.
    #[test]
    fn every_scheduler_is_a_sampler_and_back() {
        assert_eq!(Scheduler::ALL.len(), SamplerKind::ALL.len());
        for (s, k) in Scheduler::ALL.into_iter().zip(SamplerKind::ALL) {
            assert_eq!(sampler(s), k);
        }
    }

    #[test]
    fn empty_negative_prompt_means_none() {
        let mut j = job();
        j.negative_prompt.clear();
        assert_eq!(engine_job(&j, JobInputs::default(), Vec::new()).negative_prompt, None);
        assert_eq!(
            engine_job(&job(), JobInputs::default(), Vec::new())
                .negative_prompt
                .as_deref(),
            Some("blurry, low quality")
        );
    }
}
