//! `worker bench`: the speed of each stage of the pipeline on one device, as a
//! table and as JSON, for BENCHMARKS.md and for comparison with diffusers
//! (`bench/diffusers_reference.py` measures the same stages the same way).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{Device, Tensor};
use common::rules;
use serde::Serialize;

use sdxl::noise::ImageNoise;
use sdxl::pipeline::{DenoiseParams, SdxlPipeline, Start};
use worker::ranks::memory::PeakSampler;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: crate::args::ModelArgs,
    #[arg(long, default_value_t = rules::DEFAULT_SIZE as usize)]
    width: usize,
    #[arg(long, default_value_t = rules::DEFAULT_SIZE as usize)]
    height: usize,
    #[arg(long, default_value_t = rules::DEFAULT_STEPS as usize)]
    steps: usize,
    #[arg(long, default_value_t = rules::DEFAULT_GUIDANCE_SCALE)]
    guidance_scale: f64,
    /// The sampler of the whole-image run.
    #[arg(long, default_value = rules::DEFAULT_SCHEDULER, value_parser = crate::args::sampler_parser())]
    scheduler: sdxl::scheduler::SamplerKind,
    /// Timed repetitions of each stage (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Timed whole images.
    #[arg(long, default_value_t = 3)]
    images: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A safetensors file with `sample`, `encoder_hidden_states`, `text_embeds`,
    /// `time_ids` (and `timestep`): run the UNet once on them and write
    /// `unet_out` to `FILE.candle.safetensors`, to compare with diffusers.
    #[arg(long)]
    unet_io: Option<PathBuf>,
    /// Only run this stage (`unet` or `vae`): two warm-up runs, then one
    /// between cuProfilerStart/Stop (for `ncu --profile-from-start off`), and exit.
    #[arg(long, value_parser = ["unet", "vae"])]
    profile: Option<String>,
    /// Skip the whole-image timing (for quick A/B runs of single stages).
    #[arg(long)]
    no_image: bool,
    /// Images per second for these batch sizes (comma-separated, e.g.
    /// 1,2,4,8,16): one prompt, each image its own seed, denoised together
    /// (the UNet in chunks that fit the free memory) and decoded.
    #[arg(long, value_delimiter = ',')]
    throughput: Vec<usize>,
}

/// Median milliseconds of each stage.
#[derive(Debug, Serialize)]
struct Report {
    device: String,
    dtype: String,
    /// `dtype`, or `fp8` for the UNet's transformer linear layers.
    precision: String,
    width: usize,
    height: usize,
    steps: usize,
    guidance_scale: f64,
    load_s: f64,
    text_encode_ms: f64,
    /// What the UNet's steps share (the cross-attentions' keys and values
    /// over the text context, the added embedding), made once an image
    /// before its steps.
    unet_conditioning_ms: f64,
    /// One step as the denoising loop runs it (the conditioning made
    /// beforehand).
    unet_step_ms: f64,
    vae_decode_ms: f64,
    preview_decode_ms: Option<f64>,
    image_s: f64,
    taesd_decode_ms: Option<f64>,
    /// Of `image_s`: encoding the image as PNG.
    png_encode_ms: f64,
    /// The first UNet step of this process (driver JIT of the kernels included).
    first_unet_step_ms: f64,
    throughput: Vec<Throughput>,
    peak_gpu_memory_mib: Option<f64>,
}

/// One batch size's rate.
#[derive(Debug, Serialize)]
struct Throughput {
    batch: usize,
    /// Images denoised in one UNet call.
    unet_images: usize,
    seconds: f64,
    images_per_s: f64,
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// Times `f` `iters` times after one warm-up run, synchronising the device.
fn time<T>(device: &Device, iters: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Duration> {
    f()?;
    device.synchronize()?;
    let mut xs = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        xs.push(t.elapsed());
    }
    Ok(median(xs))
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let opts = args.model.load_options(0)?;
    let device = opts.device.clone();
    let memory = PeakSampler::start(&device);
    let t = Instant::now();
    let pipeline = SdxlPipeline::load(&opts).context("loading the model")?;
    device.synchronize()?;
    let load = t.elapsed();
    let params = DenoiseParams {
        width: args.width,
        height: args.height,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        sampler: args.scheduler,
        unet_images: 0,
    };
    let prompt = "a photograph of an astronaut riding a horse on the moon, highly detailed";
    let negative = Some(rules::DEFAULT_NEGATIVE_PROMPT);
    let text = time(&device, args.iters, || {
        Ok(pipeline.encode_prompt(prompt, negative, params.do_cfg())?)
    })?;

    let embeds = pipeline.encode_prompt(prompt, negative, params.do_cfg())?;
    let (_, c, h, w) = pipeline.latent_shape(args.width, args.height);
    let batch = if params.do_cfg() { 2 } else { 1 };
    let dtype = pipeline.dtype();
    let sample = Tensor::randn(0f32, 1f32, (batch, c, h, w), &device)?.to_dtype(dtype)?;
    let context = embeds.prompt_embeds.to_dtype(dtype)?;
    let pooled = embeds.pooled_prompt_embeds.to_dtype(dtype)?;
    let (hf, wf) = (args.height as f32, args.width as f32);
    let time_ids = Tensor::from_vec(vec![hf, wf, 0.0, 0.0, hf, wf], (1, 6), &device)?
        .repeat((batch, 1))?
        .to_dtype(dtype)?;
    if args.profile.as_deref() == Some("unet") {
        // a step as the denoising loop runs it (see below)
        let conditioning = pipeline.unet().conditioning(&context, &pooled, &time_ids)?;
        return profile(&device, || {
            Ok(pipeline.unet().forward_conditioned(&sample, 500.0, &conditioning)?)
        });
    }
    if args.profile.as_deref() == Some("vae") {
        let latents = Tensor::randn(0f32, 1f32, (1, c, h, w), &device)?.to_dtype(dtype)?;
        return profile(&device, || Ok(pipeline.decode(&latents)?));
    }
    let first = Instant::now();
    pipeline.unet().forward(&sample, 500.0, &context, &pooled, &time_ids)?;
    device.synchronize()?;
    let first_unet = first.elapsed();
    // a step as the denoising loop runs it: what every step shares (the
    // context's cross-attention keys and values, the added embedding) is
    // made once an image, before the steps
    let conditioning_time = time(&device, args.iters, || {
        Ok(pipeline.unet().conditioning(&context, &pooled, &time_ids)?)
    })?;
    let conditioning = pipeline.unet().conditioning(&context, &pooled, &time_ids)?;
    let unet = time(&device, args.iters, || {
        Ok(pipeline.unet().forward_conditioned(&sample, 500.0, &conditioning)?)
    })?;

    let latents = Tensor::randn(0f32, 1f32, (1, c, h, w), &device)?.to_dtype(dtype)?;
    let vae = time(&device, args.iters.min(5), || Ok(pipeline.decode(&latents)?))?;
    let preview = if pipeline.has_previews() {
        Some(time(&device, args.iters, || Ok(pipeline.preview(&latents)?))?)
    } else {
        None
    };
    let taesd = if pipeline.has_previews() {
        Some(time(&device, args.iters, || Ok(pipeline.tiny_decode(&latents)?))?)
    } else {
        None
    };
    if let Some(io) = &args.unet_io {
        unet_io(&pipeline, io)?;
    }

    let image = time(&device, if args.no_image { 0 } else { args.images }, || {
        if args.no_image {
            return Ok(None);
        }
        let embeds = pipeline.encode_prompt(prompt, negative, params.do_cfg())?;
        let noise = [ImageNoise::from_seed(0)];
        let latents = pipeline
            .denoise(&embeds, &noise, &params, Start::Noise, &mut |_| {
                std::ops::ControlFlow::Continue(())
            })?
            .context("denoising stopped")?;
        let decoded = pipeline.decode(&latents)?;
        let rgb = sdxl::image_processor::from_signed_unit(&decoded)?;
        Ok(Some(png(&rgb[0])?))
    })?;
    let reference_rgb = {
        let latents = Tensor::randn(0f32, 1f32, (1, c, h, w), &device)?.to_dtype(dtype)?;
        sdxl::image_processor::from_signed_unit(&pipeline.decode(&latents)?)?
    };
    let png_time = time(&device, 3, || png(&reference_rgb[0]))?;

    let mut throughput = Vec::new();
    for &batch in &args.throughput {
        let unet_images = worker::ranks::unet_images(&pipeline, args.width, args.height).min(batch);
        let batch_params = DenoiseParams { unet_images, ..params };
        let noise: Vec<ImageNoise> = (0..batch as u64).map(ImageNoise::from_seed).collect();
        let run = || -> anyhow::Result<()> {
            let embeds = pipeline.encode_prompt(prompt, negative, params.do_cfg())?;
            let latents = pipeline
                .denoise(&embeds, &noise, &batch_params, Start::Noise, &mut |_| {
                    std::ops::ControlFlow::Continue(())
                })?
                .context("denoising stopped")?;
            let decoded = pipeline.decode(&latents)?;
            sdxl::image_processor::from_signed_unit(&decoded)?;
            Ok(())
        };
        let seconds = time(&device, 1, run)?.as_secs_f64();
        println!(
            "throughput batch {batch} (UNet {unet_images} at a time): {seconds:.2} s, {:.3} images/s",
            batch as f64 / seconds
        );
        throughput.push(Throughput {
            batch,
            unet_images,
            seconds,
            images_per_s: batch as f64 / seconds,
        });
    }

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let report = Report {
        device: format!("{:?}", device.location()),
        dtype: format!("{dtype:?}"),
        precision: args.model.precision.name().to_string(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        load_s: load.as_secs_f64(),
        text_encode_ms: ms(text),
        unet_conditioning_ms: ms(conditioning_time),
        unet_step_ms: ms(unet),
        vae_decode_ms: ms(vae),
        preview_decode_ms: preview.map(ms),
        taesd_decode_ms: taesd.map(ms),
        image_s: image.as_secs_f64(),
        png_encode_ms: ms(png_time),
        first_unet_step_ms: ms(first_unet),
        throughput,
        peak_gpu_memory_mib: memory.and_then(PeakSampler::stop).map(|b| b as f64 / (1024.0 * 1024.0)),
    };
    println!(
        "| stage | {} {:?} precision {} |",
        report.device, dtype, report.precision
    );
    println!("|---|---|");
    println!("| model load (local safetensors) | {:.2} s |", report.load_s);
    println!("| text encode (prompt + negative) | {:.1} ms |", report.text_encode_ms);
    println!(
        "| UNet conditioning: context keys and values, added embedding (once an image, batch {batch}) | {:.2} ms |",
        report.unet_conditioning_ms
    );
    println!("| UNet step (batch {batch}) | {:.1} ms |", report.unet_step_ms);
    println!(
        "| first UNet step of the process (kernel JIT included) | {:.1} ms |",
        report.first_unet_step_ms
    );
    println!("| VAE decode (1 image) | {:.1} ms |", report.vae_decode_ms);
    if let Some(p) = report.taesd_decode_ms {
        println!("| TAESD decode (1 image, full size) | {p:.1} ms |");
    }
    if let Some(p) = report.preview_decode_ms {
        println!("| preview decode as the worker does it (1 image, pooled to 512 px) | {p:.1} ms |");
    }
    println!(
        "| whole image ({} steps, text encode to PNG bytes) | {:.2} s |",
        args.steps, report.image_s
    );
    println!("| of which PNG encode | {:.1} ms |", report.png_encode_ms);
    for t in &report.throughput {
        println!(
            "| throughput, batch {} (UNet {} images at a time) | {:.3} images/s |",
            t.batch, t.unet_images, t.images_per_s
        );
    }
    if let Some(m) = report.peak_gpu_memory_mib {
        println!("| peak GPU memory (device-wide, sampled) | {m:.0} MiB |");
    }
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// PNG bytes of an image, as the worker stores it.
fn png(image: &image::RgbImage) -> anyhow::Result<Vec<u8>> {
    use image::ImageEncoder as _;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out).write_image(
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

/// Runs `f` twice to warm up, then once with the CUDA profiler on.
fn profile(device: &Device, mut f: impl FnMut() -> anyhow::Result<Tensor>) -> anyhow::Result<()> {
    f()?;
    f()?;
    device.synchronize()?;
    #[cfg(feature = "cuda")]
    unsafe {
        candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStart();
    }
    let t = Instant::now();
    f()?;
    device.synchronize()?;
    #[cfg(feature = "cuda")]
    unsafe {
        candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStop();
    }
    eprintln!("profiled run: {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
    Ok(())
}

/// One UNet forward on inputs written by the diffusers reference, so the two
/// outputs can be compared (cosine similarity) from the same random weights.
fn unet_io(pipeline: &SdxlPipeline, path: &std::path::Path) -> anyhow::Result<()> {
    let device = pipeline.device();
    let dtype = pipeline.dtype();
    let t = candle_core::safetensors::load(path, device).with_context(|| format!("reading {}", path.display()))?;
    let get = |k: &str| -> anyhow::Result<Tensor> {
        Ok(t.get(k)
            .with_context(|| format!("{} lacks {k}", path.display()))?
            .to_dtype(dtype)?)
    };
    let timestep = t
        .get("timestep")
        .map(|x| {
            x.to_dtype(candle_core::DType::F32)
                .and_then(|x| x.flatten_all()?.to_vec1::<f32>())
        })
        .transpose()?
        .and_then(|v| v.first().copied())
        .unwrap_or(500.0);
    let out = pipeline.unet().forward(
        &get("sample")?,
        timestep,
        &get("encoder_hidden_states")?,
        &get("text_embeds")?,
        &get("time_ids")?,
    )?;
    let out_path = path.with_extension("candle.safetensors");
    let out = out.to_dtype(candle_core::DType::F32)?;
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("unet_out".to_string(), out)]),
        &out_path,
    )?;
    eprintln!("wrote {}", out_path.display());
    Ok(())
}
