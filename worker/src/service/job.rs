//! One job, from the bytes of a delivery to the decision to ack, reject or
//! requeue it, in three phases so that the jobs of a batch share the engine
//! call and nothing else: [`prepare`] (decode, lease, the checks that may
//! end it at once, `running`, its inputs), [`generate`] (one engine call
//! for every job of the batch, each job with its own cancel poller,
//! deadline and event sink) and, per job as soon as its own outcome is
//! known, its end (`after`).
//!
//! Order matters: results are stored (images, grid, then manifest), then the
//! status says `succeeded`, then the terminal event is published, and only
//! then is the delivery acked. A crash anywhere before the ack redelivers the
//! job; the manifest keeps a redelivery from storing the result twice.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::queue::{decode_message, JobMessage};
use common::rules::{Scheduler, ValidJob};
use common::status::{JobBatch, JobResult, JobState, JobStatus, Progress, Timings};
use common::status_store::{StatusStore, Update};
use sdxl::scheduler::SamplerKind;
use tracing::Instrument;
use uuid::Uuid;

use super::context::JobContext;
use super::error::JobError;
use super::events::PreviewSink;
use super::finish::{finish_cancelled, finish_succeeded, mark_failed};
use super::generation::{self, BatchEntry, Generation};
use super::inputs::{fetch_images, JobInputs};
use super::lease::{take_lease, Lease, Taken};
use super::results;
use super::retry::retry;
use crate::engine::{EngineJob, EngineLora};

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

/// A job that passed its checks and is `running`, its inputs fetched:
/// ready for the engine. It holds the job's lease until it is dropped.
pub struct Ready {
    id: Uuid,
    span: tracing::Span,
    job: ValidJob,
    created_at: DateTime<Utc>,
    /// The `running` record.
    status: JobStatus,
    started_at: DateTime<Utc>,
    engine_job: EngineJob,
    _lease: Box<Lease>,
}

impl Ready {
    pub fn id(&self) -> Uuid {
        self.id
    }
}

/// What became of a delivery before generation.
pub enum Prepared {
    /// It needs no generation (finished before, cancelled while queued,
    /// poison, a transient failure): settle it so.
    Settled(Disposition),
    /// Another worker holds its lease: leave it unsettled for a later round.
    Busy,
    Ready(Box<Ready>),
}

/// The first phase of a delivery: decode and validate it again (anything
/// can be published to a queue), take the job's lease (`wait_for_lease`:
/// wait while another worker holds it, else answer `Busy`), and everything
/// that may end the job before it runs.
pub async fn prepare(ctx: &JobContext, payload: &[u8], wait_for_lease: bool) -> Prepared {
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
            return Prepared::Settled(Disposition::Reject);
        }
    };
    let id = message.id;
    let span = tracing::info_span!("job", %id);
    match before(ctx, &message, wait_for_lease, &span)
        .instrument(span.clone())
        .await
    {
        Ok(Before::Ready(ready)) => Prepared::Ready(ready),
        Ok(Before::Done) => Prepared::Settled(Disposition::Ack),
        Ok(Before::Busy(holder)) => {
            tracing::info!(parent: &span, %holder, "another worker holds this job: leaving it for a later round");
            Prepared::Busy
        }
        Err(e) => Prepared::Settled(conclude(ctx, id, &span, Err(e)).await),
    }
}

/// The engine call of `ready` (one job, or a batch of compatible ones) and
/// each job's end: one future per job, in order, each ending with its
/// delivery's disposition as soon as its own outcome is handled, a
/// cancelled job's while the others still run.
pub fn generate(ctx: &JobContext, ready: Vec<Ready>) -> Vec<impl Future<Output = Disposition> + '_> {
    let batch_id = Uuid::new_v4();
    if ready.len() > 1 {
        let jobs: Vec<String> = ready.iter().map(|r| r.id.to_string()).collect();
        tracing::info!(batch = %batch_id, ?jobs, "running {} jobs as one batch", jobs.len());
    }
    let mut entries = Vec::with_capacity(ready.len());
    let mut watchers = Vec::with_capacity(ready.len());
    for r in &ready {
        // The cancel flag is polled from Redis; the deadline raises it too.
        let cancel = Arc::new(AtomicBool::new(false));
        let poller = tokio::spawn(
            poll_cancel(ctx.status.clone(), r.id, cancel.clone(), ctx.config.cancel_poll).instrument(r.span.clone()),
        );
        let sink = PreviewSink::start(ctx.status.clone(), r.id);
        entries.push(BatchEntry {
            job: r.engine_job.clone(),
            cancel,
            events: Box::new(sink.callback()),
        });
        watchers.push((poller, sink));
    }
    let model_start = Instant::now();
    let running = generation::generate_batch(ctx.engine.clone(), entries, ctx.config.job_deadline);
    ready
        .into_iter()
        .zip(watchers)
        .zip(running)
        .map(move |((ready, (poller, sink)), running)| {
            let span = ready.span.clone();
            async move {
                let generated = running.outcome().await;
                let model_time = model_start.elapsed();
                poller.abort();
                sink.finish().await;
                let outcome = after(ctx, &ready, generated, model_time, batch_id).await;
                let span = ready.span.clone();
                conclude(ctx, ready.id, &span, outcome).await
            }
            .instrument(span)
        })
        .collect()
}

/// Logs a job's end and marks a poison job `failed`; says what to do with
/// its delivery.
async fn conclude(ctx: &JobContext, id: Uuid, span: &tracing::Span, outcome: Result<(), JobError>) -> Disposition {
    match &outcome {
        Ok(()) => {}
        Err(JobError::Poison(reason)) => {
            tracing::error!(parent: span, %reason, "poison job: marking it failed and dead-lettering it");
            if let Err(e) = mark_failed(ctx, id, reason).instrument(span.clone()).await {
                tracing::error!(parent: span, error = %e, "could not mark the poison job failed");
            }
        }
        Err(JobError::Transient(reason)) => {
            tracing::warn!(parent: span, %reason, "transient failure outlasted the retries: requeueing the job");
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

/// How the first phase ended, when nothing failed.
enum Before {
    Ready(Box<Ready>),
    /// Finished before (here or elsewhere), or cancelled while queued.
    Done,
    /// Another worker holds the lease (only when not waiting for it).
    Busy(String),
}

async fn before(
    ctx: &JobContext,
    message: &JobMessage<ValidJob>,
    wait_for_lease: bool,
    span: &tracing::Span,
) -> Result<Before, JobError> {
    let id = message.id;
    let backoff = ctx.backoff();
    let job = message.request.clone();

    let lease = match take_lease(ctx, id, wait_for_lease).await? {
        Taken::Held(lease) => lease,
        Taken::Busy(holder) => return Ok(Before::Busy(holder)),
        Taken::Finished => {
            tracing::info!("another worker finished this job meanwhile: acking it");
            return Ok(Before::Done);
        }
    };
    let current = retry(backoff, "reading the status", || ctx.status.get(id)).await?;
    if let Some(s) = current.as_ref().filter(|s| s.state.is_terminal()) {
        tracing::info!(state = %s.state, "job already finished: acking it");
        // Its end may have been written by a worker that died before it
        // announced it (the record says whether it did).
        ctx.announce(s).await?;
        return Ok(Before::Done);
    }
    let mut queued = JobStatus::queued(id, job.clone(), message.created_at);
    queued.owner.clone_from(&message.owner);
    if retry(backoff, "reading the cancel flag", || ctx.status.cancel_requested(id)).await? {
        finish_cancelled(ctx, id, current.as_ref().unwrap_or(&queued)).await?;
        return Ok(Before::Done);
    }
    if let Some(result) = results::load_manifest(&ctx.results, id, backoff).await? {
        tracing::info!("a previous attempt stored the result: finishing from it");
        finish_succeeded(ctx, id, current.as_ref().unwrap_or(&queued), result).await?;
        return Ok(Before::Done);
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
            if let Some(s) = s {
                ctx.announce(&s).await?;
            }
            return Ok(Before::Done);
        }
    };
    tracing::info!(attempt = status.attempt, worker = %ctx.worker_name, "running");
    ctx.announce(&status).await?;

    let inputs = fetch_images(&ctx.results, &job, backoff).await?;
    let loras = ctx.loras.fetch_all(&ctx.results, &job.loras, backoff).await?;
    Ok(Before::Ready(Box::new(Ready {
        id,
        span: span.clone(),
        engine_job: engine_job(&job, inputs, loras),
        job,
        created_at: message.created_at,
        status,
        started_at,
        _lease: lease,
    })))
}

/// The last phase: the job's outcome stored and recorded (or its
/// cancellation or failure), before its delivery is settled.
async fn after(
    ctx: &JobContext,
    ready: &Ready,
    generated: Generation,
    model_time: Duration,
    batch_id: Uuid,
) -> Result<(), JobError> {
    let (id, job, backoff) = (ready.id, &ready.job, ctx.backoff());
    let output = match generated {
        Generation::Done(output) => output,
        Generation::Cancelled => return finish_cancelled(ctx, id, &ready.status).await,
        Generation::PastDeadline => {
            return Err(JobError::Poison(format!(
                "the job ran past its deadline of {} s and was stopped at step {} (SDXL_JOB_DEADLINE)",
                ctx.config.job_deadline.as_secs_f64(),
                ctx.status.get(id).await.ok().flatten().map_or(0, |s| s.progress.step)
            )))
        }
        Generation::Failed(reason) => return Err(JobError::Poison(reason)),
    };

    let upload_start = Instant::now();
    let (format, quality) = (job.output_format, ctx.config.jpeg_quality);
    let shape = output.batch;
    let encoded =
        tokio::task::spawn_blocking(move || results::encode(id, &output, format, quality).map(|e| (e, output.timings)))
            .await
            .map_err(|e| JobError::Poison(format!("encoding panicked: {e}")))??;
    let (encoded, stage) = encoded;
    let (images, grid) = results::upload(&ctx.results, &encoded, backoff).await?;
    let timings = Timings {
        queue_wait_ms: (ready.started_at - ready.created_at).num_milliseconds().max(0) as u64,
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
        batch: (shape.jobs > 1).then_some(JobBatch {
            id: batch_id,
            jobs: shape.jobs as u32,
            images: shape.images as u32,
        }),
    };
    results::write_manifest(&ctx.results, id, &result, backoff).await?;
    finish_succeeded(ctx, id, &ready.status, result).await
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
pub fn sampler(s: Scheduler) -> SamplerKind {
    SamplerKind::from_name(s.name()).expect("every scheduler of the rules is a sampler of the model")
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
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
