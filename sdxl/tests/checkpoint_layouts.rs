//! The other weight layouts a diffusers folder can have: the `fp16` variant
//! (`*.fp16.safetensors`) and sharded checkpoints (`*.safetensors.index.json`).
//! Both must give exactly the images of the plain single-file fixture.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdxl::noise::{initial_noise, ImageNoise};
use sdxl::pipeline::{DenoiseParams, LoadOptions, SdxlPipeline, Start};
use sdxl::scheduler::SamplerKind;

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sdxl-reference/tiny-sdxl")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let target = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn image(model: &Path, variant: Option<&str>) -> Vec<f32> {
    let p = SdxlPipeline::load(&LoadOptions {
        variant: variant.map(str::to_string),
        ..LoadOptions::new(model.display().to_string(), Device::Cpu, DType::F32)
    })
    .unwrap();
    let params = DenoiseParams {
        width: 64,
        height: 64,
        num_inference_steps: 2,
        guidance_scale: 5.0,
        sampler: SamplerKind::Euler,
        unet_images: 0,
    };
    let embeds = p.encode_prompt("a lighthouse", Some("blurry"), true).unwrap();
    let (_, c, h, w) = p.latent_shape(64, 64);
    let noise = ImageNoise::from_init(initial_noise(3, c, h, w, &Device::Cpu).unwrap());
    let latents = p
        .denoise(&embeds, &[noise], &params, Start::Noise, &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap()
        .unwrap();
    p.decode(&latents).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn fp16_variant_files_are_loaded_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    copy_dir(&fixture_model(), &model);
    for (dir, base) in [
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ] {
        let from = model.join(dir).join(format!("{base}.safetensors"));
        std::fs::rename(&from, model.join(dir).join(format!("{base}.fp16.safetensors"))).unwrap();
    }
    let err = SdxlPipeline::load(&LoadOptions::new(model.display().to_string(), Device::Cpu, DType::F32))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors"),
        "without --variant the plain files are wanted: {err}"
    );
    assert_eq!(image(&model, Some("fp16")), image(&fixture_model(), None));
}

#[test]
fn sharded_checkpoints_load_through_their_index() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    copy_dir(&fixture_model(), &model);
    let unet_dir = model.join("unet");
    let single = unet_dir.join("diffusion_pytorch_model.safetensors");
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    std::fs::remove_file(&single).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (shard, chunk) in names.chunks(names.len().div_ceil(3)).enumerate() {
        let file = format!("diffusion_pytorch_model-{:05}-of-00003.safetensors", shard + 1);
        let part: HashMap<String, Tensor> = chunk.iter().map(|k| ((*k).clone(), tensors[*k].clone())).collect();
        candle_core::safetensors::save(&part, unet_dir.join(&file)).unwrap();
        for k in chunk {
            weight_map.insert((*k).clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        unet_dir.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(image(&model, None), image(&fixture_model(), None));
}
