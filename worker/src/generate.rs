//! `worker generate`: images from a prompt on this machine's devices, with
//! no services. With `--init-noise` one image on one device from the given
//! noise (how the tests reproduce diffusers); otherwise through the rank
//! group, as the service runs jobs.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use common::rules;
use sdxl::image_processor;
use sdxl::noise::ImageNoise;
use sdxl::pipeline::{DenoiseParams, SdxlPipeline};
use sdxl::scheduler::SamplerKind;
use worker::engine::{Engine, EngineEvent, EngineJob};
use worker::ranks::{default_ranks, DeviceKind, RankGroup, RankGroupConfig};

use crate::args::{denoise_progress, ModelArgs, UsageError};
use crate::noise_file::NoiseFile;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// What to steer away from; `""` means none.
    #[arg(long, default_value = rules::DEFAULT_NEGATIVE_PROMPT)]
    negative_prompt: String,
    /// Image width in pixels (a multiple of 8).
    #[arg(long, default_value_t = rules::DEFAULT_SIZE as usize)]
    width: usize,
    /// Image height in pixels (a multiple of 8).
    #[arg(long, default_value_t = rules::DEFAULT_SIZE as usize)]
    height: usize,
    /// Denoising steps.
    #[arg(long, alias = "num-inference-steps", default_value_t = rules::DEFAULT_STEPS as usize)]
    steps: usize,
    /// Classifier-free guidance scale (guidance is off at 1 or below).
    #[arg(long, default_value_t = rules::DEFAULT_GUIDANCE_SCALE)]
    guidance_scale: f64,
    /// The sampler (the diffusers class each one equals is in the README).
    #[arg(long, default_value = rules::DEFAULT_SCHEDULER, value_parser = crate::args::sampler_parser())]
    scheduler: SamplerKind,
    /// Noise seed; a random one is drawn and printed when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// A safetensors file of random draws `[1, 4, H/8, W/8]` used instead of
    /// the seed's: named `init`, `step.K` (the K-th noise a stochastic sampler
    /// takes), `vae_sample`; or one tensor of any name, the initial noise.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Ranks (devices) to spread the images over; default: every visible
    /// CUDA device, or 1 on CPU.
    #[arg(long)]
    ranks: Option<usize>,
    /// Images of the prompt; image `i` uses seed `seed + i` (default: one per rank).
    #[arg(long)]
    num_images: Option<usize>,
    /// With a TAESD (`--taesd`): a preview grid at step 0 and every this many steps (0 = none).
    #[arg(long, default_value_t = rules::DEFAULT_PREVIEW_EVERY as usize)]
    preview_every: usize,
    /// Write each preview grid as `step_NNN.jpg` here.
    #[arg(long)]
    save_previews: Option<PathBuf>,
    /// Where to write the PNG (the grid when there are several images).
    #[arg(long)]
    output: PathBuf,
    /// Also write each image as `{index}.png` here.
    #[arg(long)]
    output_dir: Option<PathBuf>,
}

/// Checks the numbers before anything is loaded, naming the flag and the rule.
fn validate(args: &GenerateArgs) -> Result<(), UsageError> {
    // Any positive multiple of 8, not the service's size range: small and
    // custom models run at other sizes on one machine.
    let multiple = rules::SIZE_MULTIPLE as usize;
    for (name, v) in [("--width", args.width), ("--height", args.height)] {
        if v == 0 || !v.is_multiple_of(multiple) {
            return Err(UsageError(format!(
                "{name} {v} must be a positive multiple of {multiple}"
            )));
        }
    }
    let (lo, hi) = rules::STEPS_RANGE;
    if (args.steps as i64) < lo {
        return Err(UsageError(format!("--steps {} must be at least {lo}", args.steps)));
    }
    if args.steps as i64 > hi {
        return Err(UsageError(format!("--steps {} must be at most {hi}", args.steps)));
    }
    if args.ranks == Some(0) {
        return Err(UsageError("--ranks 0 must be at least 1".into()));
    }
    if args.num_images == Some(0) {
        return Err(UsageError("--num-images 0 must be at least 1".into()));
    }
    let (lo, hi) = rules::GUIDANCE_RANGE;
    if !(lo..=hi).contains(&args.guidance_scale) {
        return Err(UsageError(format!(
            "--guidance-scale {} must be a number between {lo} and {hi}",
            args.guidance_scale
        )));
    }
    Ok(())
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    validate(&args)?;
    if args.init_noise.is_none() {
        return generate_on_ranks(args);
    }
    if args.ranks.unwrap_or(1) != 1 || args.num_images.unwrap_or(1) != 1 {
        return Err(
            UsageError("--init-noise makes one image: use it without --ranks/--num-images above 1".into()).into(),
        );
    }
    let path = args.init_noise.as_ref().expect("checked above");
    let given = NoiseFile::read(path)?;
    let params = DenoiseParams {
        width: args.width,
        height: args.height,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        sampler: args.scheduler,
    };

    let t0 = Instant::now();
    let pipeline = SdxlPipeline::load(&args.model.load_options(0)?).context("loading the model")?;
    let load = t0.elapsed();

    let (_, c, h, w) = pipeline.latent_shape(args.width, args.height);
    let draws = sdxl::pipeline::draws(pipeline.scheduler_config(), &params)?;
    let given = given.for_job(&draws, (c, h, w), (args.width, args.height))?;
    // A draw the file does not give comes from the seed, as without a file.
    let seed = args.seed.unwrap_or_else(rand::random);
    if draws.iter().any(|d| !given.iter().any(|(g, _)| g == d)) {
        eprintln!("seed: {seed} (for the draws the file does not give)");
    }
    let noise = ImageNoise::from_seed(seed).with_given(given);
    let negative = Some(args.negative_prompt.as_str());
    let device = pipeline.device().clone();
    let timed = |start: Instant| -> anyhow::Result<Duration> {
        device.synchronize()?;
        Ok(start.elapsed())
    };

    let t = Instant::now();
    let embeds = pipeline.encode_prompt(&args.prompt, negative, params.do_cfg())?;
    let encode = timed(t)?;

    let bar = denoise_progress(args.steps);
    let t = Instant::now();
    let latents = pipeline
        .denoise(&embeds, std::slice::from_ref(&noise), &params, &mut |state| {
            bar.set_position(state.step as u64);
            std::ops::ControlFlow::Continue(())
        })?
        .context("denoising stopped early")?;
    let denoise = timed(t)?;
    bar.finish_and_clear();

    let t = Instant::now();
    let images = pipeline.decode(&latents)?;
    let decode = timed(t)?;
    let image = image_processor::from_signed_unit(&images)?
        .into_iter()
        .next()
        .context("the pipeline returned no image")?;
    image
        .save(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "stages: load {:.3}s, text encode {:.3}s, denoise {:.3}s ({:.1} ms/step), decode {:.3}s, total {:.3}s",
        load.as_secs_f64(),
        encode.as_secs_f64(),
        denoise.as_secs_f64(),
        denoise.as_secs_f64() * 1000.0 / args.steps as f64,
        decode.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    println!("{}", args.output.display());
    Ok(())
}

/// `generate` through the rank group, as the service runs jobs: every rank
/// makes its share of the images, rank 0 gathers them into a grid.
fn generate_on_ranks(args: GenerateArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("seed: {seed}");
    let device = args.model.device.kind();
    let ranks = args.ranks.unwrap_or_else(|| default_ranks(device));
    let t0 = Instant::now();
    let group = RankGroup::start(RankGroupConfig {
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
    let job = EngineJob {
        prompt: args.prompt.clone(),
        negative_prompt: Some(args.negative_prompt.clone()),
        width: args.width,
        height: args.height,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        scheduler: args.scheduler,
        seed,
        num_images: args.num_images,
        preview_every: args.preview_every,
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
                EngineEvent::Progress { step, .. } => bar.set_position(step as u64),
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
        tm.denoise.as_secs_f64() * 1000.0 / args.steps as f64,
        tm.preview.as_secs_f64(),
        tm.decode.as_secs_f64(),
        total.as_secs_f64(),
        out.images.len(),
        ranks,
        previews
    );
    for img in &out.images {
        eprintln!("image seed {}", img.seed);
    }
    println!("{}", args.output.display());
    Ok(())
}
