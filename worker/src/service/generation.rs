//! One engine call as the service makes it: on a blocking thread (the engine
//! blocks), with the cancel flag the Redis poller raises and a deadline that
//! stops the engine the same way, between two steps. What comes back is the
//! decision the job's handler acts on ([`Generation`]); deciding it here,
//! away from RabbitMQ, Redis and S3, is what lets the unit tests below drive
//! every outcome with a fake [`Engine`] in milliseconds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{Engine, EngineError, EngineEvent, EngineJob, EngineOutput};

/// How an engine call ended.
#[derive(Debug)]
pub enum Generation {
    Done(EngineOutput),
    /// Stopped by a cancel request.
    Cancelled,
    /// Stopped because it ran past the deadline (the job fails; no retry).
    PastDeadline,
    /// The engine refused the job or failed (or panicked): poison, not retried.
    Failed(String),
}

/// Runs `job` on `engine` until it ends, `cancel` is raised, or `deadline` passes.
pub async fn generate(
    engine: Arc<dyn Engine>,
    job: EngineJob,
    cancel: Arc<AtomicBool>,
    deadline: Duration,
    mut events: impl FnMut(EngineEvent) + Send + 'static,
) -> Generation {
    let timed_out = Arc::new(AtomicBool::new(false));
    let timer = tokio::spawn({
        let (cancel, timed_out) = (cancel.clone(), timed_out.clone());
        async move {
            tokio::time::sleep(deadline).await;
            tracing::warn!(?deadline, "the job ran past its deadline: stopping it");
            timed_out.store(true, Ordering::SeqCst);
            cancel.store(true, Ordering::SeqCst);
        }
    });
    let span = tracing::Span::current();
    let generated = tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        engine.generate(&job, &mut events, &cancel)
    })
    .await;
    timer.abort();
    match generated {
        Err(join) => Generation::Failed(format!("the engine panicked: {join}")),
        Ok(Err(EngineError::Cancelled)) if timed_out.load(Ordering::SeqCst) => Generation::PastDeadline,
        Ok(Err(EngineError::Cancelled)) => Generation::Cancelled,
        Ok(Err(e @ (EngineError::Invalid(_) | EngineError::Failed(_)))) => Generation::Failed(e.to_string()),
        Ok(Ok(output)) => Generation::Done(output),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;
    use crate::engine::{GeneratedImage, StageTimings};

    /// What the fake engine does with a job.
    #[derive(Debug, Clone, Copy)]
    pub enum Behaviour {
        /// `steps` progress events, then one image.
        Succeed {
            steps: usize,
        },
        Invalid,
        Fail,
        Panic,
        /// Steps every 5 ms until the cancel flag is raised.
        RunUntilCancelled,
    }

    /// An engine that behaves as told and counts its calls.
    pub struct FakeEngine {
        pub behaviour: Behaviour,
        pub calls: Mutex<usize>,
    }

    impl FakeEngine {
        pub fn new(behaviour: Behaviour) -> Arc<Self> {
            Arc::new(FakeEngine {
                behaviour,
                calls: Mutex::new(0),
            })
        }
    }

    impl Engine for FakeEngine {
        fn world_size(&self) -> usize {
            1
        }

        fn generate(
            &self,
            job: &EngineJob,
            events: &mut dyn FnMut(EngineEvent),
            cancel: &Arc<AtomicBool>,
        ) -> Result<EngineOutput, EngineError> {
            *self.calls.lock().unwrap() += 1;
            match self.behaviour {
                Behaviour::Succeed { steps } => {
                    for step in 1..=steps {
                        events(EngineEvent::Progress {
                            step,
                            total_steps: steps,
                        });
                    }
                    let image = image::RgbImage::new(job.width as u32, job.height as u32);
                    Ok(EngineOutput {
                        grid: image.clone(),
                        images: vec![GeneratedImage { seed: job.seed, image }],
                        timings: StageTimings::default(),
                    })
                }
                Behaviour::Invalid => Err(EngineError::Invalid("width 12 is not a multiple of 8".into())),
                Behaviour::Fail => Err(EngineError::Failed("CUDA out of memory".into())),
                Behaviour::Panic => panic!("the fake engine panics"),
                Behaviour::RunUntilCancelled => loop {
                    if cancel.load(Ordering::SeqCst) {
                        return Err(EngineError::Cancelled);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                },
            }
        }
    }

    pub fn job() -> EngineJob {
        EngineJob::text("a fake job", 8, 8, 3, 7)
    }

    async fn run(
        behaviour: Behaviour,
        cancel_after: Option<Duration>,
        deadline: Duration,
    ) -> (Generation, Vec<EngineEvent>) {
        let engine = FakeEngine::new(behaviour);
        let cancel = Arc::new(AtomicBool::new(false));
        if let Some(after) = cancel_after {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                cancel.store(true, Ordering::SeqCst);
            });
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let outcome = generate(engine, job(), cancel, deadline, move |e| sink.lock().unwrap().push(e)).await;
        let events = seen.lock().unwrap().clone();
        (outcome, events)
    }

    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_finished_job_brings_its_output_and_its_events() {
        let (outcome, events) = run(Behaviour::Succeed { steps: 3 }, None, LONG).await;
        let Generation::Done(output) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(output.images[0].seed, 7);
        assert_eq!(events.len(), 3);
    }

    #[tokio::test]
    async fn a_refused_or_failed_or_panicking_job_is_poison() {
        for behaviour in [Behaviour::Invalid, Behaviour::Fail, Behaviour::Panic] {
            let (outcome, _) = run(behaviour, None, LONG).await;
            assert!(matches!(outcome, Generation::Failed(_)), "{behaviour:?}: {outcome:?}");
        }
    }

    #[tokio::test]
    async fn a_cancel_stops_the_engine() {
        let start = Instant::now();
        let (outcome, _) = run(Behaviour::RunUntilCancelled, Some(Duration::from_millis(20)), LONG).await;
        assert!(matches!(outcome, Generation::Cancelled), "{outcome:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn the_deadline_stops_the_engine_and_says_so() {
        let start = Instant::now();
        let (outcome, _) = run(Behaviour::RunUntilCancelled, None, Duration::from_millis(30)).await;
        assert!(matches!(outcome, Generation::PastDeadline), "{outcome:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
