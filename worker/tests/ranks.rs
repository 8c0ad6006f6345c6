//! Data-parallel generation on CPU ranks: the images of a job are shared out
//! over the ranks, gathered to rank 0 into one grid, previews come from every
//! rank, and a rank that fails or stalls fails the job cleanly on all ranks.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use worker::engine::{Engine, EngineError, EngineEvent, EngineJob};
use worker::ranks::{Fault, FaultKind, RankGroup, RankGroupConfig};

mod common;

use common::fixture;

fn generate(args: &[&str], dir: &Path) -> Vec<RgbImage> {
    let model = fixture().join("tiny-sdxl");
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a lighthouse at dawn",
        ])
        .args(["--width", "64", "--height", "64", "--steps", "3"])
        .args(args)
        .arg("--output")
        .arg(dir.join("grid.png"))
        .arg("--output-dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut images = Vec::new();
    while let Ok(img) = image::open(dir.join(format!("{}.png", images.len()))) {
        images.push(img.to_rgb8());
    }
    images
}

#[test]
fn three_ranks_make_the_images_that_single_runs_make() {
    let tmp = tempfile::tempdir().unwrap();
    let grid_dir = tmp.path().join("ranks3");
    let images = generate(&["--seed", "7", "--ranks", "3"], &grid_dir);
    assert_eq!(images.len(), 3);
    let grid = image::open(grid_dir.join("grid.png")).unwrap().to_rgb8();
    // make_grid: floor(sqrt(3)) = 1 image per row, 2-pixel padding
    assert_eq!(grid.dimensions(), (64 + 4, 3 * 66 + 2));
    for (i, img) in images.iter().enumerate() {
        let single = generate(
            &["--seed", &(7 + i).to_string(), "--ranks", "1"],
            &tmp.path().join(format!("single{i}")),
        );
        assert_eq!(single.len(), 1);
        assert!(
            single[0] == *img,
            "image {i} differs from a single run with seed {}",
            7 + i
        );
        let tile = image::imageops::crop_imm(&grid, 2, 2 + 66 * i as u32, 64, 64).to_image();
        assert!(tile == *img, "grid tile {i} is image {i}");
    }
    assert!(images[0] != images[1], "other seeds, other images");
}

#[test]
fn five_images_on_two_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let images = generate(&["--seed", "100", "--ranks", "2", "--num-images", "5"], tmp.path());
    assert_eq!(images.len(), 5);
    let grid = image::open(tmp.path().join("grid.png")).unwrap().to_rgb8();
    assert_eq!(grid.dimensions(), (2 * 66 + 2, 3 * 66 + 2));
    // image 3 is the first of rank 1: it must be seed 103's image
    let single = generate(&["--seed", "103", "--ranks", "1"], &tmp.path().join("single"));
    assert!(single[0] == images[3]);
}

fn group(ranks: usize, timeout: Duration) -> RankGroup {
    RankGroup::start(config(ranks, timeout)).unwrap()
}

fn config(ranks: usize, timeout: Duration) -> RankGroupConfig {
    common::tiny_group(ranks, timeout)
}

fn job(seed: u64) -> EngineJob {
    EngineJob {
        negative_prompt: Some("blurry, low quality".into()),
        preview_every: 2,
        ..EngineJob::text("a red bicycle", 64, 64, 4, seed)
    }
}

#[test]
fn previews_of_every_rank_arrive_in_the_preview_grid() {
    let g = group(3, Duration::from_secs(30));
    let mut previews = Vec::new();
    let mut progress = Vec::new();
    let out = g
        .generate(
            &job(1),
            &mut |e| match e {
                EngineEvent::Preview { step, jpeg, .. } => previews.push((step, jpeg)),
                EngineEvent::Progress { step, .. } => progress.push(step),
            },
            &Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
    assert_eq!(out.images.len(), 3);
    assert_eq!(progress, vec![1, 2, 3, 4]);
    assert_eq!(previews.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 2, 4]);
    let (_, last) = previews.last().unwrap();
    let img = image::load_from_memory_with_format(last, image::ImageFormat::Jpeg)
        .unwrap()
        .to_rgb8();
    // three 64x64 TAESD previews, one per rank, in a column
    assert_eq!(img.dimensions(), (68, 3 * 66 + 2));
    for i in 0..3u32 {
        let tile = image::imageops::crop_imm(&img, 2, 2 + 66 * i, 64, 64).to_image();
        let mean: f64 = tile.as_raw().iter().map(|&v| v as f64).sum::<f64>() / tile.as_raw().len() as f64;
        assert!(mean > 5.0, "rank {i}'s preview tile is empty (mean {mean})");
    }
}

#[test]
fn a_failing_rank_fails_the_job_everywhere_and_the_next_job_runs() {
    let g = group(3, Duration::from_secs(30));
    g.inject_fault(Fault {
        rank: 1,
        step: 2,
        kind: FaultKind::Error("CUDA out of memory (injected)".into()),
    });
    let err = g
        .generate(&job(5), &mut |_| {}, &Arc::new(AtomicBool::new(false)))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EngineError::Failed(_)), "{msg}");
    assert!(msg.contains("rank 1") && msg.contains("out of memory"), "{msg}");
    let out = g
        .generate(&job(6), &mut |_| {}, &Arc::new(AtomicBool::new(false)))
        .unwrap();
    assert_eq!(out.images.len(), 3);
}

/// With a memory budget of 1.5 GiB a rank (the CPU has no free-memory
/// figure of its own), a 1024² job is refused before it starts, by its
/// estimate (the UNet alone: 4.7 GiB for one image in f32), with the
/// figures and what to lower; the ranks are free again at once and run the
/// next job.
#[test]
fn a_job_over_the_memory_budget_fails_plainly_and_the_next_job_runs() {
    let g = RankGroup::start(RankGroupConfig {
        memory_budget: Some(3 << 29),
        warm_up: false,
        ..config(2, Duration::from_secs(30))
    })
    .unwrap();
    let start = Instant::now();
    let big = EngineJob {
        width: 1024,
        height: 1024,
        ..job(1)
    };
    let err = g
        .generate(&big, &mut |_| {}, &Arc::new(AtomicBool::new(false)))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EngineError::Failed(_)), "{msg}");
    assert!(
        msg.contains("not enough device memory: 1 image(s) of 1024×1024 on this rank need about 5.7 GiB"),
        "{msg}"
    );
    assert!(
        msg.contains("the UNet 4.7 GiB with one image per call")
            && msg.ends_with("but 1.5 GiB is free within the memory budget; lower width and height"),
        "{msg}"
    );
    assert!(start.elapsed() < Duration::from_secs(5), "refused before any work");
    let out = g
        .generate(&job(2), &mut |_| {}, &Arc::new(AtomicBool::new(false)))
        .unwrap();
    assert_eq!(out.images.len(), 2);
    assert_eq!(out.timings.peak_memory, None, "no device figure on the CPU");
}

#[test]
fn a_stalled_rank_times_out_instead_of_hanging_the_node() {
    let g = group(2, Duration::from_secs(2));
    g.inject_fault(Fault {
        rank: 1,
        step: 0,
        kind: FaultKind::Stall(Duration::from_secs(4)),
    });
    let start = Instant::now();
    let err = g
        .generate(&job(5), &mut |_| {}, &Arc::new(AtomicBool::new(false)))
        .unwrap_err();
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(4), "took {:?}", start.elapsed());
    // the stalled rank wakes up, finds the job given up, and serves the next one
    let out = g
        .generate(&job(6), &mut |_| {}, &Arc::new(AtomicBool::new(false)))
        .unwrap();
    assert_eq!(out.images.len(), 2);
}

#[test]
fn cancel_stops_every_rank_between_steps() {
    let g = group(2, Duration::from_secs(30));
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let mut last_step = 0;
    let err = g
        .generate(
            &job(9),
            &mut |e| {
                if let EngineEvent::Progress { step, .. } = e {
                    last_step = step;
                    if step == 1 {
                        flag.store(true, Ordering::SeqCst);
                    }
                }
            },
            &cancel,
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::Cancelled), "{err}");
    assert!(last_step < 4);
    let out = g
        .generate(&job(10), &mut |_| {}, &Arc::new(AtomicBool::new(false)))
        .unwrap();
    assert_eq!(out.images.len(), 2);
}

/// An inpainting job with a LoRA and a stochastic sampler, its three images
/// made by one rank (a batch of three) or by three (one each), gives the
/// same images, pixel for pixel: every draw is the image's own, and on the
/// CPU each image has a UNet call of its own. Previews count the steps that
/// run (strength 0.75 of 4 steps: 3), on every rank alike.
#[test]
fn img2img_inpainting_and_loras_are_the_same_on_any_number_of_ranks() {
    let features = fixture().join("../sdxl-features");
    let image = Arc::new(image::open(features.join("img2img_input.png")).unwrap().to_rgb8());
    let mask = Arc::new(image::open(features.join("inpaint_mask.png")).unwrap().to_luma8());
    let job = EngineJob {
        width: image.width() as usize,
        height: image.height() as usize,
        scheduler: sdxl::scheduler::SamplerKind::EulerAncestral,
        num_images: Some(3),
        preview_every: 1,
        init_image: Some(image),
        mask: Some(mask),
        strength: 0.75,
        loras: vec![worker::engine::EngineLora {
            id: "kohya".into(),
            path: features.join("lora_kohya.safetensors"),
            scale: 0.8,
        }],
        ..job(11)
    };
    let run = |ranks: usize| {
        let g = group(ranks, Duration::from_secs(60));
        let mut steps = Vec::new();
        let out = g
            .generate(
                &job,
                &mut |e| {
                    if let EngineEvent::Preview { step, total_steps, .. } = e {
                        steps.push((step, total_steps));
                    }
                },
                &Arc::new(AtomicBool::new(false)),
            )
            .unwrap();
        (out, steps)
    };
    let (one, one_steps) = run(1);
    let (three, three_steps) = run(3);
    assert_eq!(one_steps, vec![(0, 3), (1, 3), (2, 3), (3, 3)]);
    assert_eq!(three_steps, one_steps);
    assert_eq!(one.images.len(), 3);
    for (a, b) in one.images.iter().zip(&three.images) {
        assert_eq!(a.seed, b.seed);
        let max = a
            .image
            .as_raw()
            .iter()
            .zip(b.image.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        let n = a
            .image
            .as_raw()
            .iter()
            .zip(b.image.as_raw())
            .filter(|(x, y)| x != y)
            .count();
        assert!(
            max <= 1 && n * 1000 < a.image.as_raw().len(),
            "image of seed {} differs between 1 and 3 ranks: by at most {max}, in {n} values",
            a.seed
        );
    }
    assert!(
        one.images[0].image != one.images[1].image,
        "each image has its own draws"
    );
}
