//! The SDXL pipeline against diffusers' golden outputs, stage by stage.
//!
//! Reads `tests/fixtures/sdxl-reference` (a copy of the reference fixtures), or
//! the folder `SDXL_REFERENCE_DIR` names: any folder of the same format (other
//! sizes, float32 storage, an empty negative prompt) must pass too. Tolerances
//! are the fixture README's: 1e-4 absolute in f32 for every tensor, 1 of 255
//! for images, exact token ids.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, IndexOp, Tensor};
use sdxl::image_processor;
use sdxl::noise::ImageNoise;
use sdxl::pipeline::{DenoiseParams, LoadOptions, SdxlPipeline, Start};
use sdxl::scheduler::{build, SamplerKind, SchedulerConfig};
use serde::Deserialize;

mod common;

const TOL: f32 = 1e-4;

#[derive(Debug, Deserialize)]
struct TokenizerCase {
    text: String,
    ids_1: Vec<u32>,
    ids_2: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct ScheduleCase {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
}

#[derive(Debug, Deserialize)]
struct Golden {
    height: usize,
    width: usize,
    steps: usize,
    guidance_scale: f64,
    prompts: Vec<String>,
    negative_prompt: Option<String>,
    tokenizer_cases: Vec<TokenizerCase>,
    scheduler: HashMap<String, ScheduleCase>,
    unet_timestep: f32,
    #[serde(default = "default_model_dir")]
    model_dir: String,
    #[serde(default = "default_taesd_dir")]
    taesd_dir: String,
}

fn default_model_dir() -> String {
    "tiny-sdxl".into()
}
fn default_taesd_dir() -> String {
    "tiny-taesdxl".into()
}

struct Fixture {
    dir: PathBuf,
    golden: Golden,
    tensors: HashMap<String, Tensor>,
    pipeline: SdxlPipeline,
}

fn fixture_dir() -> PathBuf {
    match std::env::var_os("SDXL_REFERENCE_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sdxl-reference"),
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = fixture_dir();
        let golden: Golden =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).expect("golden.json"))
                .expect("golden.json parses");
        let tensors =
            candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).expect("golden.safetensors");
        let pipeline = SdxlPipeline::load(&LoadOptions {
            taesd: Some(dir.join(&golden.taesd_dir).display().to_string()),
            ..LoadOptions::new(
                dir.join(&golden.model_dir).display().to_string(),
                Device::Cpu,
                DType::F32,
            )
        })
        .expect("the fixture pipeline loads");
        Fixture {
            dir,
            golden,
            tensors,
            pipeline,
        }
    })
}

impl Fixture {
    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("golden.safetensors lacks {name}"))
    }
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = common::max_abs_diff(name, got, want);
    eprintln!("{name}: max abs diff {d:.3e}");
    assert!(d <= tol, "{name}: max abs diff {d} > {tol}");
}

#[test]
fn tokenizers_match_every_case_exactly() {
    let f = fixture();
    assert!(!f.golden.tokenizer_cases.is_empty());
    for case in &f.golden.tokenizer_cases {
        let (ids_1, ids_2) = f.pipeline.tokenize(&case.text).unwrap();
        assert_eq!(ids_1, case.ids_1, "tokenizer on {:?}", case.text);
        assert_eq!(ids_2, case.ids_2, "tokenizer_2 on {:?}", case.text);
    }
}

#[test]
fn scheduler_matches_for_every_step_count() {
    let f = fixture();
    let config: SchedulerConfig = serde_json::from_str(
        &std::fs::read_to_string(f.dir.join(&f.golden.model_dir).join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert!(!f.golden.scheduler.is_empty());
    for (steps, want) in &f.golden.scheduler {
        let s = build(SamplerKind::Euler, &config, steps.parse().unwrap()).unwrap();
        assert_eq!(s.timesteps().len(), want.timesteps.len(), "{steps} steps");
        for (a, b) in s.timesteps().iter().zip(&want.timesteps) {
            assert!((a - b).abs() <= 1e-3, "{steps} steps: timestep {a} vs {b}");
        }
        let sigmas = s.sigmas().unwrap();
        assert_eq!(sigmas.len(), want.sigmas.len(), "{steps} steps");
        for (a, b) in sigmas.iter().zip(&want.sigmas) {
            assert!((a - b).abs() <= 1e-5 * b.max(1.0), "{steps} steps: sigma {a} vs {b}");
        }
        assert!((s.init_noise_sigma() - want.init_noise_sigma).abs() <= 1e-5 * want.init_noise_sigma.max(1.0));
    }
}

#[test]
fn prompt_embeddings_match() {
    let f = fixture();
    let negative = f.golden.negative_prompt.as_deref();
    for (i, prompt) in f.golden.prompts.iter().enumerate() {
        let embeds = f.pipeline.encode_prompt(prompt, negative, true).unwrap();
        let pe = &embeds.prompt_embeds;
        let pp = &embeds.pooled_prompt_embeds;
        assert_close(
            "prompt_embeds",
            &pe.i(1..2).unwrap(),
            &f.tensor("prompt_embeds").i(i..i + 1).unwrap(),
            TOL,
        );
        assert_close(
            "pooled_prompt_embeds",
            &pp.i(1..2).unwrap(),
            &f.tensor("pooled_prompt_embeds").i(i..i + 1).unwrap(),
            TOL,
        );
        assert_close(
            "negative_prompt_embeds",
            &pe.i(0..1).unwrap(),
            &f.tensor("negative_prompt_embeds").i(i..i + 1).unwrap(),
            TOL,
        );
        assert_close(
            "negative_pooled_prompt_embeds",
            &pp.i(0..1).unwrap(),
            &f.tensor("negative_pooled_prompt_embeds").i(i..i + 1).unwrap(),
            TOL,
        );
    }
}

#[test]
fn unet_output_matches() {
    let f = fixture();
    let out = f
        .pipeline
        .unet()
        .forward(
            f.tensor("unet_in_sample"),
            f.golden.unet_timestep,
            f.tensor("unet_in_encoder_hidden_states"),
            f.tensor("unet_in_text_embeds"),
            f.tensor("unet_in_time_ids"),
        )
        .unwrap();
    assert_close("unet_out", &out, f.tensor("unet_out"), TOL);
}

/// The denoising loop makes what its steps share once (`conditioning`: the
/// context's cross-attention keys and values, the added embedding; the
/// whole-pipeline test checks the steps that reuse it against diffusers):
/// one conditioning serves a second step as diffusers' UNet does, the
/// memory estimate is what its keys and values hold, and a sample
/// whose batch is not the conditioning's is refused.
#[test]
fn unet_conditioning_made_once_serves_every_step() {
    let f = fixture();
    let unet = f.pipeline.unet();
    let context = f.tensor("unet_in_encoder_hidden_states");
    let (text_embeds, time_ids) = (f.tensor("unet_in_text_embeds"), f.tensor("unet_in_time_ids"));
    let sample = f.tensor("unet_in_sample");
    let conditioning = unet.conditioning(context, text_embeds, time_ids).unwrap();
    // a step at another timestep first: what it leaves of the shared
    // conditioning must still give diffusers' output at the reference's
    unet.forward_conditioned(&(sample * 0.5).unwrap(), 1.0, &conditioning)
        .unwrap();
    let out = unet
        .forward_conditioned(sample, f.golden.unet_timestep, &conditioning)
        .unwrap();
    assert_close("unet_out", &out, f.tensor("unet_out"), TOL);

    let (rows, tokens, _) = context.dims3().unwrap();
    let estimate = unet.context_kv_bytes(rows, tokens);
    assert!(estimate > 0);
    // each layer's range is padded to 128 elements at most
    let held = conditioning.context_bytes();
    assert!(
        held >= estimate && held < estimate + 200 * 128 * 4,
        "{held} bytes held, {estimate} estimated"
    );

    assert_eq!(sample.dim(0).unwrap(), rows);
    let twice = Tensor::cat(&[sample, sample], 0).unwrap();
    let err = unet
        .forward_conditioned(&twice, f.golden.unet_timestep, &conditioning)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("for a batch of {rows}")) && err.contains(&format!("the sample's is {}", 2 * rows)),
        "{err}"
    );
}

#[test]
fn vae_and_taesd_decodes_match() {
    let f = fixture();
    let latents = f.tensor("vae_in_latents");
    let image = f.pipeline.decode(latents).unwrap();
    assert_close("vae_out", &image, f.tensor("vae_out"), TOL);
    let preview = f.pipeline.tiny_decode(latents).unwrap().expect("taesd loaded");
    assert_close("taesd_out", &preview, f.tensor("taesd_out"), TOL);
}

#[test]
fn whole_pipeline_matches_latents_and_images() {
    let f = fixture();
    let g = &f.golden;
    let params = DenoiseParams {
        width: g.width,
        height: g.height,
        num_inference_steps: g.steps,
        guidance_scale: g.guidance_scale,
        sampler: SamplerKind::Euler,
        unet_images: 0,
    };
    let noise = f.tensor("pipeline_in_noise");
    for (i, prompt) in g.prompts.iter().enumerate() {
        let embeds = f
            .pipeline
            .encode_prompt(prompt, g.negative_prompt.as_deref(), params.do_cfg())
            .unwrap();
        let mut seen = Vec::new();
        let latents = f
            .pipeline
            .denoise(
                &embeds,
                &[ImageNoise::from_init(noise.i(i..i + 1).unwrap())],
                &params,
                Start::Noise,
                &mut |s| {
                    seen.push(s.step);
                    ControlFlow::Continue(())
                },
            )
            .unwrap()
            .unwrap();
        assert_eq!(seen, (0..=g.steps).collect::<Vec<_>>(), "the callback sees every step");
        let want_latents = f.tensor("pipeline_out_latents").i(i..i + 1).unwrap();
        assert_close("pipeline_out_latents", &latents, &want_latents, TOL);
        let image = image_processor::from_signed_unit(&f.pipeline.decode(&latents).unwrap())
            .unwrap()
            .remove(0);
        let want = f
            .tensor("pipeline_out_images_u8")
            .i(i)
            .unwrap()
            .to_dtype(DType::U8)
            .unwrap();
        let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(image.as_raw().len(), want.len(), "image size");
        let worst = image
            .as_raw()
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        eprintln!("pipeline image {i}: max diff {worst}/255");
        assert!(worst <= 1, "image {i} differs by {worst}/255");
    }
}

#[test]
fn denoise_stops_when_the_callback_breaks() {
    let f = fixture();
    let g = &f.golden;
    let params = DenoiseParams {
        width: g.width,
        height: g.height,
        num_inference_steps: g.steps,
        guidance_scale: g.guidance_scale,
        sampler: SamplerKind::Euler,
        unet_images: 0,
    };
    let embeds = f.pipeline.encode_prompt(&g.prompts[0], None, true).unwrap();
    let noise = f.tensor("pipeline_in_noise").i(0..1).unwrap();
    let mut calls = 0;
    let out = f
        .pipeline
        .denoise(
            &embeds,
            &[ImageNoise::from_init(noise)],
            &params,
            Start::Noise,
            &mut |s| {
                calls += 1;
                if s.step == 1 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .unwrap();
    assert!(out.is_none());
    assert_eq!(calls, 2);
}
