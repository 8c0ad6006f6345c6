//! `worker generate` through the rank group, as the service runs jobs:
//! every rank makes its share of the images from their own seeds, rank 0
//! gathers them into a grid (and the previews).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use worker::engine::{Engine, EngineEvent, EngineJob, EngineLora};
use worker::ranks::{default_ranks, DeviceKind, RankGroup, RankGroupConfig};

use super::args::{GenerateArgs, Resolved};
use crate::args::denoise_progress;

pub fn run(args: GenerateArgs, resolved: Resolved) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("seed: {seed}");
    let device = args.model.device.kind();
    let ranks = args.ranks.unwrap_or_else(|| default_ranks(device));
    let t0 = Instant::now();
    let group = RankGroup::start(RankGroupConfig {
        memory_budget: args.model.memory.memory_budget,
        load: args.model.load_options_on(Device::Cpu),
        device,
        ranks,
        collective_timeout: Duration::from_secs(300),
        warm_up: false,
    })
    .context("loading the model")?;
    let load = t0.elapsed();
    eprintln!(
        "ranks: {ranks} ({})",
        match device {
            DeviceKind::Cuda => "CUDA devices, gathered over NCCL",
            DeviceKind::Cpu => "CPU, gathered in process",
        }
    );
    let loras = args
        .loras
        .iter()
        .map(|(path, scale)| EngineLora {
            id: path.display().to_string(),
            path: path.clone(),
            scale: *scale,
        })
        .collect();
    let init = resolved.init.as_ref();
    let job = EngineJob {
        prompt: args.prompt.clone(),
        negative_prompt: Some(args.negative_prompt.clone()),
        width: resolved.width,
        height: resolved.height,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        scheduler: args.scheduler,
        seed,
        num_images: args.num_images,
        preview_every: args.preview_every,
        init_image: init.map(|i| i.image.clone()),
        mask: init.and_then(|i| i.mask.clone()),
        strength: init.map_or(1.0, |i| i.strength),
        loras,
    };
    if let Some(dir) = &args.save_previews {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let bar = denoise_progress(args.steps);
    let mut preview_error = None;
    let mut previews = 0usize;
    let t = Instant::now();
    let out = group
        .generate(
            &job,
            &mut |event| match event {
                EngineEvent::Progress { step, total_steps } => {
                    bar.set_length(total_steps as u64);
                    bar.set_position(step as u64);
                }
                EngineEvent::Preview { step, jpeg, .. } => {
                    previews += 1;
                    if let Some(dir) = &args.save_previews {
                        if let Err(e) = std::fs::write(dir.join(format!("step_{step:03}.jpg")), jpeg) {
                            preview_error = Some(e);
                        }
                    }
                }
            },
            &Arc::new(AtomicBool::new(false)),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let total = t.elapsed();
    bar.finish_and_clear();
    if let Some(e) = preview_error {
        return Err(e).context("writing a preview");
    }
    out.grid
        .save(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    if let Some(dir) = &args.output_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (i, img) in out.images.iter().enumerate() {
            let path = dir.join(format!("{i}.png"));
            img.image
                .save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    let tm = &out.timings;
    eprintln!(
        "stages: load {:.3}s, text encode {:.3}s, denoise {:.3}s ({:.1} ms/step, of it previews {:.3}s), decode {:.3}s, job {:.3}s; {} images on {} ranks, {} previews",
        load.as_secs_f64(),
        tm.text_encode.as_secs_f64(),
        tm.denoise.as_secs_f64(),
        tm.denoise.as_secs_f64() * 1000.0 / args.steps.max(1) as f64,
        tm.preview.as_secs_f64(),
        tm.decode.as_secs_f64(),
        total.as_secs_f64(),
        out.images.len(),
        ranks,
        previews
    );
    if let Some(peak) = tm.peak_memory {
        eprintln!(
            "device memory at the peak (rank 0): {}",
            worker::ranks::memory::size(peak)
        );
    }
    for img in &out.images {
        eprintln!("image seed {}", img.seed);
    }
    println!("{}", args.output.display());
    Ok(())
}
