//! One engine call as the service makes it: on a blocking thread (the engine
//! blocks), for one job or a batch of them, each with the cancel flag its
//! Redis poller raises and a deadline that stops it the same way, between
//! two steps. Each job's outcome comes back on its own ([`Running`]), as
//! soon as the engine has it: a job cancelled in a batch ends for its
//! handler at once, while the others go on. What comes back is the decision
//! the job's handler acts on ([`Generation`]); deciding it here, away from
//! RabbitMQ, Redis and S3, is what lets the unit tests below drive every
//! outcome with a fake [`Engine`] in milliseconds.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::engine::{BatchJob, Engine, EngineError, EngineEvent, EngineJob, EngineOutput, JobOutcome as Outcome};

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

/// One job of a batch: the job, its cancel flag and where its events go.
pub struct BatchEntry {
    pub job: EngineJob,
    pub cancel: Arc<AtomicBool>,
    pub events: Box<dyn FnMut(EngineEvent) + Send>,
}

/// A job of a batch in the engine: [`Running::outcome`] waits for its own end.
#[derive(Debug)]
pub struct Running {
    outcome: oneshot::Receiver<Outcome>,
    cancel: Arc<AtomicBool>,
    deadline: Instant,
}

impl Running {
    /// Waits for this job's outcome; past the deadline, raises its cancel
    /// flag and waits for the engine to stop it.
    pub async fn outcome(self) -> Generation {
        let Running {
            mut outcome,
            cancel,
            deadline,
        } = self;
        let mut timed_out = false;
        let result = tokio::select! {
            // an outcome already there wins over a deadline passed meanwhile
            biased;
            r = &mut outcome => r,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("the job ran past its deadline: stopping it");
                timed_out = true;
                cancel.store(true, Ordering::SeqCst);
                outcome.await
            }
        };
        match result {
            Err(_) => Generation::Failed("the engine ended without an outcome for the job".into()),
            Ok(Err(EngineError::Cancelled)) if timed_out => Generation::PastDeadline,
            Ok(Err(EngineError::Cancelled)) => Generation::Cancelled,
            Ok(Err(e @ (EngineError::Invalid(_) | EngineError::Failed(_)))) => Generation::Failed(e.to_string()),
            Ok(Ok(output)) => Generation::Done(output),
        }
    }
}

/// Starts `batch` on `engine` (on a blocking thread) and returns each job's
/// [`Running`], in order. Each job has `deadline` from now. A panicking
/// engine fails every job it had not finished.
pub fn generate_batch(engine: Arc<dyn Engine>, batch: Vec<BatchEntry>, deadline: Duration) -> Vec<Running> {
    let deadline = Instant::now() + deadline;
    let mut running = Vec::with_capacity(batch.len());
    let mut senders = Vec::with_capacity(batch.len());
    for entry in &batch {
        let (tx, rx) = oneshot::channel();
        senders.push(Arc::new(Mutex::new(Some(tx))));
        running.push(Running {
            outcome: rx,
            cancel: entry.cancel.clone(),
            deadline,
        });
    }
    let (jobs, events): (Vec<_>, Vec<_>) = batch.into_iter().map(|e| ((e.job, e.cancel), e.events)).unzip();
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let send = |slot: &Mutex<Option<oneshot::Sender<Outcome>>>, outcome: Outcome| {
            if let Some(tx) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(outcome);
            }
        };
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let batch: Vec<BatchJob> = jobs
                .iter()
                .zip(events)
                .zip(&senders)
                .map(|(((job, cancel), events), slot)| {
                    let slot = slot.clone();
                    BatchJob {
                        job,
                        cancel,
                        events,
                        done: Box::new(move |outcome| send(&slot, outcome)),
                    }
                })
                .collect();
            engine.generate_batch(batch);
        }));
        let why = match run {
            Ok(()) => "the engine gave the job no outcome".to_string(),
            Err(panic) => format!("the engine panicked: {}", panic_message(&*panic)),
        };
        for slot in &senders {
            send(slot, Err(EngineError::Failed(why.clone())));
        }
    });
    running
}

/// Runs one `job` on `engine` until it ends, `cancel` is raised, or `deadline` passes.
pub async fn generate(
    engine: Arc<dyn Engine>,
    job: EngineJob,
    cancel: Arc<AtomicBool>,
    deadline: Duration,
    events: impl FnMut(EngineEvent) + Send + 'static,
) -> Generation {
    let entry = BatchEntry {
        job,
        cancel,
        events: Box::new(events),
    };
    let mut running = generate_batch(engine, vec![entry], deadline);
    running.pop().expect("one job, one outcome").outcome().await
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Instant;

    use super::*;
    use crate::engine::{BatchShape, GeneratedImage, StageTimings};

    /// What the fake engine does with a batch.
    #[derive(Debug, Clone, Copy)]
    pub enum Behaviour {
        /// `steps` progress events for each job still running, `step_time`
        /// apart; a job whose flag is up ends `Cancelled` at that step; the
        /// others one image each at the end.
        Succeed {
            steps: usize,
            step_time: Duration,
        },
        Invalid,
        Fail,
        Panic,
        /// Steps every 5 ms until every job's cancel flag is raised; each
        /// job ends as its flag rises.
        RunUntilCancelled,
    }

    /// An engine that behaves as told and records the size of each batch.
    pub struct FakeEngine {
        pub behaviour: Behaviour,
        pub batches: Mutex<Vec<usize>>,
    }

    impl FakeEngine {
        pub fn new(behaviour: Behaviour) -> Arc<Self> {
            Arc::new(FakeEngine {
                behaviour,
                batches: Mutex::new(Vec::new()),
            })
        }
    }

    fn output(job: &EngineJob, jobs: usize) -> EngineOutput {
        let image = image::RgbImage::new(job.width as u32, job.height as u32);
        EngineOutput {
            grid: image.clone(),
            images: vec![GeneratedImage { seed: job.seed, image }],
            timings: StageTimings::default(),
            batch: BatchShape { jobs, images: jobs },
        }
    }

    impl Engine for FakeEngine {
        fn world_size(&self) -> usize {
            1
        }

        fn generate_batch(&self, batch: Vec<BatchJob<'_>>) {
            self.batches.lock().unwrap().push(batch.len());
            let n = batch.len();
            let mut jobs: Vec<_> = batch
                .into_iter()
                .map(|j| (j.job, j.cancel, j.events, Some(j.done)))
                .collect();
            match self.behaviour {
                Behaviour::Succeed { steps, step_time } => {
                    for step in 1..=steps {
                        std::thread::sleep(step_time);
                        for (_, cancel, events, done) in jobs.iter_mut() {
                            if done.is_none() {
                                continue;
                            }
                            events(EngineEvent::Progress {
                                step,
                                total_steps: steps,
                            });
                            if cancel.load(Ordering::SeqCst) {
                                (done.take().expect("running"))(Err(EngineError::Cancelled));
                            }
                        }
                    }
                    for (job, _, _, done) in jobs.iter_mut() {
                        if let Some(done) = done.take() {
                            done(Ok(output(job, n)));
                        }
                    }
                }
                Behaviour::Invalid | Behaviour::Fail => {
                    let e = match self.behaviour {
                        Behaviour::Invalid => EngineError::Invalid("width 12 is not a multiple of 8".into()),
                        _ => EngineError::Failed("CUDA out of memory".into()),
                    };
                    for (_, _, _, done) in jobs.iter_mut() {
                        (done.take().expect("running"))(Err(e.clone()));
                    }
                }
                Behaviour::Panic => panic!("the fake engine panics"),
                Behaviour::RunUntilCancelled => {
                    while jobs.iter().any(|j| j.3.is_some()) {
                        for (_, cancel, _, done) in jobs.iter_mut() {
                            if done.is_some() && cancel.load(Ordering::SeqCst) {
                                (done.take().expect("running"))(Err(EngineError::Cancelled));
                            }
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
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
        let (outcome, events) = run(
            Behaviour::Succeed {
                steps: 3,
                step_time: Duration::ZERO,
            },
            None,
            LONG,
        )
        .await;
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

    /// Three jobs, one engine call, each job its own events; the one
    /// cancelled early ends long before the batch does, the others finish.
    #[tokio::test]
    async fn a_job_cancelled_in_a_batch_ends_at_once_and_the_others_go_on() {
        let engine = FakeEngine::new(Behaviour::Succeed {
            steps: 40,
            step_time: Duration::from_millis(10),
        });
        let cancels: Vec<_> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
        let seen: Vec<_> = (0..3).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
        let batch = (0..3)
            .map(|i| BatchEntry {
                job: EngineJob { seed: i, ..job() },
                cancel: cancels[i as usize].clone(),
                events: {
                    let sink = seen[i as usize].clone();
                    Box::new(move |e| sink.lock().unwrap().push(e))
                },
            })
            .collect();
        let start = Instant::now();
        let running = generate_batch(engine.clone(), batch, LONG);
        let cancel = cancels[1].clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            cancel.store(true, Ordering::SeqCst);
        });
        let ends: Vec<_> = running
            .into_iter()
            .map(|r| {
                tokio::spawn(async move {
                    let outcome = r.outcome().await;
                    (outcome, Instant::now())
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for end in ends {
            outcomes.push(end.await.unwrap());
        }
        assert_eq!(*engine.batches.lock().unwrap(), vec![3], "one engine call");
        assert!(matches!(outcomes[1].0, Generation::Cancelled), "{:?}", outcomes[1].0);
        let cancelled_after = outcomes[1].1 - start;
        let batch_after = outcomes[0].1 - start;
        assert!(
            cancelled_after < Duration::from_millis(250) && batch_after >= Duration::from_millis(400),
            "cancelled job ended after {cancelled_after:?}, the batch after {batch_after:?}"
        );
        for i in [0, 2] {
            let Generation::Done(output) = &outcomes[i].0 else {
                panic!("job {i}: {:?}", outcomes[i].0)
            };
            assert_eq!(output.images[0].seed, i as u64);
            assert_eq!(output.batch.jobs, 3);
            assert_eq!(seen[i].lock().unwrap().len(), 40, "job {i} saw every step");
        }
        let cancelled_steps = seen[1].lock().unwrap().len();
        assert!((1..40).contains(&cancelled_steps), "{cancelled_steps}");
    }

    /// In one batch, a job cancelled by its user ends `Cancelled`, and the
    /// deadline stops each of the others as `PastDeadline`, each job's
    /// outcome its own.
    #[tokio::test]
    async fn each_job_of_a_batch_has_its_own_cancel_and_deadline() {
        let engine = FakeEngine::new(Behaviour::RunUntilCancelled);
        let cancels: Vec<_> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
        let batch = cancels
            .iter()
            .map(|cancel| BatchEntry {
                job: job(),
                cancel: cancel.clone(),
                events: Box::new(|_| {}),
            })
            .collect();
        let running = generate_batch(engine, batch, Duration::from_millis(150));
        cancels[2].store(true, Ordering::SeqCst);
        let mut outcomes = Vec::new();
        for r in running {
            outcomes.push(r.outcome().await);
        }
        assert!(matches!(outcomes[0], Generation::PastDeadline), "{:?}", outcomes[0]);
        assert!(matches!(outcomes[1], Generation::PastDeadline), "{:?}", outcomes[1]);
        assert!(matches!(outcomes[2], Generation::Cancelled), "{:?}", outcomes[2]);
    }

    /// A panic fails every job of the batch, none is left waiting.
    #[tokio::test]
    async fn a_panicking_batch_fails_every_job() {
        let engine = FakeEngine::new(Behaviour::Panic);
        let batch = (0..2)
            .map(|_| BatchEntry {
                job: job(),
                cancel: Arc::new(AtomicBool::new(false)),
                events: Box::new(|_| {}),
            })
            .collect();
        for running in generate_batch(engine, batch, LONG) {
            match running.outcome().await {
                Generation::Failed(why) => assert!(why.contains("panicked: the fake engine panics"), "{why}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
