//! LoRAs on a loaded pipeline: a plain generation after a LoRA one gives the
//! plain image bit for bit (the base weights are never modified); the same
//! LoRAs and scales again reuse the merged weights; another scale merges
//! anew and changes the image.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use sdxl::noise::ImageNoise;
use sdxl::pipeline::{DenoiseParams, LoadOptions, LoraWeights, SdxlPipeline, Start};
use sdxl::scheduler::SamplerKind;

fn latents(p: &SdxlPipeline) -> Tensor {
    let params = DenoiseParams {
        width: 64,
        height: 64,
        num_inference_steps: 2,
        guidance_scale: 5.0,
        sampler: SamplerKind::Euler,
        unet_images: 0,
    };
    let embeds = p.encode_prompt("a lighthouse", Some("blurry"), true).unwrap();
    p.denoise(&embeds, &[ImageNoise::from_seed(5)], &params, Start::Noise, &mut |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap()
    .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn a_plain_job_after_a_lora_job_is_exactly_the_plain_image() {
    let model = tiny_dir().display().to_string();
    let mut p = SdxlPipeline::load(&LoadOptions::new(model, Device::Cpu, DType::F32)).unwrap();
    let lora = Arc::new(p.read_lora(&features_dir().join("lora_kohya.safetensors")).unwrap());
    let with = |scale: f64| {
        vec![LoraWeights {
            id: "kohya".into(),
            lora: lora.clone(),
            scale,
        }]
    };
    let plain = bits(&latents(&p));
    p.set_loras(&with(0.8)).unwrap();
    assert_eq!(p.active_loras().map(|k| k.starts_with("kohya@")), Some(true));
    let styled = bits(&latents(&p));
    assert_ne!(plain, styled, "the LoRA changes the image");
    assert_eq!(p.lora_merges(), 1);
    p.set_loras(&[]).unwrap();
    assert_eq!(p.active_loras(), None);
    assert_eq!(bits(&latents(&p)), plain, "back to the base weights, bit for bit");
    // the same LoRA and scale again: the merged copy is reused
    p.set_loras(&with(0.8)).unwrap();
    assert_eq!(p.lora_merges(), 1, "no new merge for the same LoRAs and scales");
    assert_eq!(bits(&latents(&p)), styled);
    // another scale is another merge, and another image
    p.set_loras(&with(0.4)).unwrap();
    assert_eq!(p.lora_merges(), 2);
    assert_ne!(bits(&latents(&p)), styled);
}
