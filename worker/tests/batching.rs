//! Jobs batched on the rank group make exactly what they make alone: on CPU
//! ranks with the tiny model, three jobs of other prompts, seeds, image
//! counts, guidance scales and previews, run as one batch and each alone,
//! give the same images byte for byte, the same progress events and the
//! same previews at the same steps, on one rank and on two. A job cancelled
//! in a batch ends at once while the others finish with their solo images.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sdxl::scheduler::SamplerKind;
use worker::engine::{BatchJob, Engine, EngineError, EngineEvent, EngineJob, EngineLora, EngineOutput};
use worker::ranks::{RankGroup, RankGroupConfig};

mod common;

use common::fixture;

fn group(ranks: usize) -> RankGroup {
    RankGroup::start(RankGroupConfig {
        warm_up: false,
        ..common::tiny_group(ranks, Duration::from_secs(60))
    })
    .unwrap()
}

/// Three jobs that batch (64², 4 steps, a sampler with fresh noise at
/// every step, guidance on) and differ in everything else.
fn three_jobs(steps: usize) -> Vec<EngineJob> {
    let base = |prompt: &str, seed| EngineJob {
        scheduler: SamplerKind::EulerAncestral,
        ..EngineJob::text(prompt, 64, 64, steps, seed)
    };
    vec![
        EngineJob {
            negative_prompt: Some("blurry, low quality".into()),
            num_images: Some(2),
            preview_every: 2,
            ..base("a red bicycle", 1)
        },
        EngineJob {
            guidance_scale: 7.5,
            num_images: Some(1),
            preview_every: 1,
            ..base("a lighthouse at dawn", 40)
        },
        EngineJob {
            guidance_scale: 3.0,
            num_images: Some(3),
            preview_every: 0,
            ..base("a bowl of fruit", 7)
        },
    ]
}

/// What one job saw: `(sequence, event)` and its outcome with its sequence.
#[derive(Default)]
struct Seen {
    progress: Vec<usize>,
    previews: Vec<(usize, Vec<u8>)>,
    outcome: Option<(u64, Instant, Result<EngineOutput, EngineError>)>,
    /// The sequence number of each progress event, in the order of all callbacks.
    progress_at: Vec<u64>,
}

/// Runs `jobs` as one engine batch; `on_progress(job, step)` may raise a flag.
fn run(
    g: &RankGroup,
    jobs: &[EngineJob],
    cancels: &[Arc<AtomicBool>],
    on_progress: &dyn Fn(usize, usize),
) -> Vec<Seen> {
    let seen: Vec<RefCell<Seen>> = jobs.iter().map(|_| RefCell::default()).collect();
    let clock = RefCell::new(0u64);
    let tick = || {
        let mut c = clock.borrow_mut();
        *c += 1;
        *c
    };
    let batch = jobs
        .iter()
        .zip(cancels)
        .enumerate()
        .map(|(i, (job, cancel))| {
            let seen = &seen[i];
            BatchJob {
                job,
                cancel,
                events: Box::new(move |e| {
                    let at = tick();
                    let mut s = seen.borrow_mut();
                    match e {
                        EngineEvent::Progress { step, .. } => {
                            s.progress.push(step);
                            s.progress_at.push(at);
                            drop(s);
                            on_progress(i, step);
                        }
                        EngineEvent::Preview { step, jpeg, .. } => s.previews.push((step, jpeg)),
                    }
                }),
                done: Box::new(move |r| {
                    let at = tick();
                    seen.borrow_mut().outcome = Some((at, Instant::now(), r));
                }),
            }
        })
        .collect();
    g.generate_batch(batch);
    seen.into_iter().map(RefCell::into_inner).collect()
}

fn flags(n: usize) -> Vec<Arc<AtomicBool>> {
    (0..n).map(|_| Arc::new(AtomicBool::new(false))).collect()
}

fn output(seen: &Seen) -> &EngineOutput {
    match &seen.outcome {
        Some((_, _, Ok(out))) => out,
        other => panic!("no images: {:?}", other.as_ref().map(|o| &o.2)),
    }
}

fn assert_same_images(batched: &EngineOutput, alone: &EngineOutput, what: &str) {
    assert_eq!(batched.images.len(), alone.images.len(), "{what}: image count");
    for (b, a) in batched.images.iter().zip(&alone.images) {
        assert_eq!(b.seed, a.seed, "{what}: seeds in order");
        assert!(
            b.image == a.image,
            "{what}: the image of seed {} differs batched and alone",
            b.seed
        );
    }
    assert!(batched.grid == alone.grid, "{what}: the grid differs");
}

fn batched_equals_alone(ranks: usize) {
    let g = group(ranks);
    let jobs = three_jobs(4);
    let batched = run(&g, &jobs, &flags(3), &|_, _| {});
    for (i, job) in jobs.iter().enumerate() {
        let alone = run(&g, std::slice::from_ref(job), &flags(1), &|_, _| {});
        let what = format!("job {i} on {ranks} rank(s)");
        let (b, a) = (output(&batched[i]), output(&alone[0]));
        assert_same_images(b, a, &what);
        assert_eq!(b.batch.jobs, 3, "{what}");
        assert_eq!(b.batch.images, 6, "{what}");
        assert_eq!(a.batch.jobs, 1, "{what}");
        assert_eq!(batched[i].progress, vec![1, 2, 3, 4], "{what}: progress");
        assert_eq!(batched[i].progress, alone[0].progress, "{what}: progress");
        let steps = |s: &Seen| s.previews.iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(steps(&batched[i]), steps(&alone[0]), "{what}: preview steps");
        for ((step, b), (_, a)) in batched[i].previews.iter().zip(&alone[0].previews) {
            assert!(b == a, "{what}: the preview at step {step} differs");
        }
    }
    assert_eq!(
        batched.iter().map(|s| s.previews.len()).collect::<Vec<_>>(),
        vec![3, 5, 0],
        "previews at 0, 2, 4 / every step / none"
    );
    let images: Vec<_> = batched.iter().flat_map(|s| output(s).images.clone()).collect();
    assert!(images[0].image != images[2].image, "other prompts, other images");
}

#[test]
fn a_batch_makes_each_jobs_own_images_events_and_previews_on_one_rank() {
    batched_equals_alone(1);
}

#[test]
fn a_batch_makes_each_jobs_own_images_events_and_previews_on_two_ranks() {
    batched_equals_alone(2);
}

/// Job 1 is cancelled at its second step (its flag raised from its own
/// progress callback): it ends `Cancelled` long before the batch does,
/// with no more events, and jobs 0 and 2 still make their solo images. Two
/// ranks, which may see the flag at different steps.
#[test]
fn a_job_cancelled_in_a_batch_ends_at_once_and_the_others_are_unchanged() {
    let g = group(2);
    let jobs = three_jobs(8);
    let cancels = flags(3);
    let flag = cancels[1].clone();
    let start = Instant::now();
    let batched = run(&g, &jobs, &cancels, &|job, step| {
        if job == 1 && step == 2 {
            flag.store(true, Ordering::SeqCst);
        }
    });
    let ended = start.elapsed();
    let (cancelled_at, cancelled_when, outcome) = batched[1].outcome.as_ref().unwrap();
    assert!(matches!(outcome, Err(EngineError::Cancelled)), "{outcome:?}");
    let last = batched[1].progress.last().copied().unwrap_or(0);
    assert!((2..6).contains(&last), "job 1 ran on to step {last}");
    // its outcome came while job 0 was still denoising
    let job0_last_step = *batched[0].progress_at.last().unwrap();
    assert!(
        *cancelled_at < job0_last_step,
        "job 1 ended at callback {cancelled_at}, job 0's last step at {job0_last_step}"
    );
    assert!(cancelled_when.duration_since(start) < ended);
    assert_eq!(batched[0].progress, (1..=8).collect::<Vec<_>>());
    for i in [0, 2] {
        let alone = run(&g, std::slice::from_ref(&jobs[i]), &flags(1), &|_, _| {});
        assert_same_images(output(&batched[i]), output(&alone[0]), &format!("job {i}"));
        assert_eq!(batched[i].previews.len(), alone[0].previews.len());
    }
    // the group serves the next batch
    let again = run(&g, &jobs[..1], &flags(1), &|_, _| {});
    assert_eq!(output(&again[0]).images.len(), 2);
}

/// Every job of a batch cancelled: the batch stops, every job `Cancelled`.
#[test]
fn a_batch_whose_jobs_are_all_cancelled_stops() {
    let g = group(2);
    let jobs = three_jobs(20);
    let cancels = flags(3);
    let all = cancels.clone();
    let batched = run(&g, &jobs, &cancels, &|_, step| {
        if step == 1 {
            all.iter().for_each(|c| c.store(true, Ordering::SeqCst));
        }
    });
    for s in &batched {
        assert!(matches!(s.outcome.as_ref().unwrap().2, Err(EngineError::Cancelled)));
        assert!(s.progress.len() < 20);
    }
}

/// Inpainting jobs with a LoRA batch too (the same strength, each its own
/// draws): each image is the one its job makes alone.
#[test]
fn inpainting_jobs_with_a_lora_batch_and_keep_their_images() {
    let features = fixture().join("../sdxl-features");
    let image = Arc::new(image::open(features.join("img2img_input.png")).unwrap().to_rgb8());
    let mask = Arc::new(image::open(features.join("inpaint_mask.png")).unwrap().to_luma8());
    let inpaint = |prompt: &str, seed, num_images| EngineJob {
        width: image.width() as usize,
        height: image.height() as usize,
        scheduler: SamplerKind::EulerAncestral,
        num_images: Some(num_images),
        preview_every: 1,
        init_image: Some(image.clone()),
        mask: Some(mask.clone()),
        strength: 0.75,
        loras: vec![EngineLora {
            id: "kohya".into(),
            path: features.join("lora_kohya.safetensors"),
            scale: 0.8,
        }],
        ..EngineJob::text(prompt, 64, 64, 4, seed)
    };
    let jobs = vec![inpaint("a red door", 3, 2), inpaint("a blue window", 11, 1)];
    let g = group(1);
    let batched = run(&g, &jobs, &flags(2), &|_, _| {});
    for (i, job) in jobs.iter().enumerate() {
        let alone = run(&g, std::slice::from_ref(job), &flags(1), &|_, _| {});
        assert_same_images(output(&batched[i]), output(&alone[0]), &format!("inpainting job {i}"));
        assert_eq!(batched[i].progress, vec![1, 2, 3], "strength 0.75 of 4 steps runs 3");
        assert_eq!(batched[i].previews.len(), alone[0].previews.len());
    }
    assert_eq!(output(&batched[0]).batch.jobs, 2);
}

/// Jobs that cannot share a loop, handed over together, run one group after
/// the other, each as it would alone.
#[test]
fn incompatible_jobs_of_one_call_run_in_turn() {
    let g = group(1);
    let a = EngineJob::text("a cat", 64, 64, 2, 5);
    let b = EngineJob {
        guidance_scale: 1.0,
        ..EngineJob::text("a dog", 64, 64, 2, 6)
    };
    let batched = run(&g, &[a.clone(), b.clone(), a.clone()], &flags(3), &|_, _| {});
    assert_eq!(output(&batched[0]).batch.jobs, 2);
    assert_eq!(output(&batched[1]).batch.jobs, 1);
    let alone = run(&g, std::slice::from_ref(&b), &flags(1), &|_, _| {});
    assert_same_images(output(&batched[1]), output(&alone[0]), "the job without guidance");
}
