//! `worker generate --init-noise FILE`: one image on one device with the
//! file's random draws instead of the seed's — how the tests reproduce
//! diffusers' own images, LoRAs, img2img and inpainting included.

use std::time::{Duration, Instant};

use anyhow::Context;
use sdxl::image_processor;
use sdxl::noise::ImageNoise;
use sdxl::pipeline::{DenoiseParams, LoraWeights, SdxlPipeline, Source};

use super::args::{GenerateArgs, Resolved};
use crate::args::{denoise_progress, UsageError};
use crate::noise_file::NoiseFile;

pub fn run(args: GenerateArgs, resolved: Resolved) -> anyhow::Result<()> {
    if args.ranks.unwrap_or(1) != 1 || args.num_images.unwrap_or(1) != 1 {
        return Err(
            UsageError("--init-noise makes one image: use it without --ranks/--num-images above 1".into()).into(),
        );
    }
    let path = args.init_noise.as_ref().expect("checked by the caller");
    let given = NoiseFile::read(path)?;
    let (width, height) = (resolved.width, resolved.height);
    let params = DenoiseParams {
        width,
        height,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        sampler: args.scheduler,
        unet_images: 0,
    };

    let t0 = Instant::now();
    let mut pipeline = SdxlPipeline::load(&args.model.load_options(0)?).context("loading the model")?;
    let loras = args
        .loras
        .iter()
        .map(|(path, scale)| {
            Ok(LoraWeights {
                id: path.display().to_string(),
                lora: std::sync::Arc::new(pipeline.read_lora(path)?),
                scale: *scale,
            })
        })
        .collect::<Result<Vec<_>, sdxl::ModelError>>()?;
    pipeline.set_loras(&loras)?;
    let load = t0.elapsed();

    let init = resolved.init.as_ref();
    let strength = init.map(|i| i.strength);
    let inpaint = init.is_some_and(|i| i.mask.is_some());
    let (_, c, h, w) = pipeline.latent_shape(width, height);
    let draws = sdxl::pipeline::draws(pipeline.scheduler_config(), &params, strength, inpaint)?;
    let given = given.for_job(&draws, (c, h, w), (width, height))?;
    // A draw the file does not give comes from the seed, as without a file.
    let seed = args.seed.unwrap_or_else(rand::random);
    if draws.iter().any(|d| !given.iter().any(|(g, _)| g == d)) {
        eprintln!("seed: {seed} (for the draws the file does not give)");
    }
    let noise = [ImageNoise::from_seed(seed).with_given(given)];
    let source = match init {
        None => Source::Text,
        Some(i) => match &i.mask {
            Some(mask) => Source::Inpaint {
                image: &i.image,
                mask,
                strength: i.strength,
            },
            None => Source::Image {
                image: &i.image,
                strength: i.strength,
            },
        },
    };
    let device = pipeline.device().clone();
    let timed = |start: Instant| -> anyhow::Result<Duration> {
        device.synchronize()?;
        Ok(start.elapsed())
    };

    let t = Instant::now();
    let embeds = pipeline.encode_prompt(&args.prompt, Some(args.negative_prompt.as_str()), params.do_cfg())?;
    let prepared = pipeline.prepare(&source, width, height, &noise)?;
    let encode = timed(t)?;

    let steps = pipeline.steps_to_run(&params, strength)?;
    let bar = denoise_progress(steps);
    let t = Instant::now();
    let latents = pipeline
        .denoise(&embeds, &noise, &params, prepared.start(), &mut |state| {
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
        "stages: load {:.3}s, encode {:.3}s, denoise {:.3}s ({:.1} ms/step), decode {:.3}s, total {:.3}s",
        load.as_secs_f64(),
        encode.as_secs_f64(),
        denoise.as_secs_f64(),
        denoise.as_secs_f64() * 1000.0 / steps.max(1) as f64,
        decode.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    println!("{}", args.output.display());
    Ok(())
}
