//! Fixture locations and loaders shared by the integration tests.
//!
//! The fixtures live in the workspace's `tests/fixtures/`; each folder can be
//! replaced with an environment variable (`SDXL_REFERENCE_DIR`,
//! `SDXL_FEATURES_DIR`, `SDXL_BASE_CONFIGS_DIR`, `SDXL_TILING_DIR`) to run
//! the same tests on other reference data.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use sdxl::checkpoint::file::read_safetensors_keys;
use sdxl::checkpoint::layout::{Component, ModelLayout};
use sdxl::config::{read_json, ClipTextConfig, UNetConfig, VaeConfig};

/// `var`'s folder, or `default` under the workspace's `tests/fixtures/`.
fn dir(var: &str, default: &str) -> PathBuf {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(default),
    }
}

/// `sdxl-reference/` (holds the tiny diffusers folder `tiny-sdxl/`).
pub fn reference_dir() -> PathBuf {
    dir("SDXL_REFERENCE_DIR", "sdxl-reference")
}

/// The project's own fixture folder `name`, whatever the variables say (for
/// tests whose expected values were made from exactly those files).
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// `sdxl-features/` (the single file and the LoRAs).
pub fn features_dir() -> PathBuf {
    dir("SDXL_FEATURES_DIR", "sdxl-features")
}

/// `vae-tiling/` (diffusers' tiled VAE decodes).
pub fn tiling_dir() -> PathBuf {
    dir("SDXL_TILING_DIR", "vae-tiling")
}

/// The full-size SDXL base configs (no weights).
pub fn base_configs_dir() -> PathBuf {
    dir("SDXL_BASE_CONFIGS_DIR", "../../sdxl/configs/sdxl-base-1.0")
}

pub fn tiny_dir() -> PathBuf {
    reference_dir().join("tiny-sdxl")
}

/// The four configs of a diffusers folder.
pub fn configs(model: &Path) -> (UNetConfig, VaeConfig, ClipTextConfig, ClipTextConfig) {
    (
        read_json(&model.join("unet/config.json")).unwrap(),
        read_json(&model.join("vae/config.json")).unwrap(),
        read_json(&model.join("text_encoder/config.json")).unwrap(),
        read_json(&model.join("text_encoder_2/config.json")).unwrap(),
    )
}

pub fn layout(model: &Path) -> ModelLayout {
    let (u, v, t1, t2) = configs(model);
    ModelLayout::new(&u, Some(&v), &t1, &t2).unwrap()
}

pub fn tiny_layout() -> ModelLayout {
    layout(&tiny_dir())
}

/// The weights file of one component of a diffusers folder.
pub fn component_file(model: &Path, c: Component) -> PathBuf {
    match c {
        Component::Unet => model.join("unet/diffusion_pytorch_model.safetensors"),
        Component::Vae => model.join("vae/diffusion_pytorch_model.safetensors"),
        Component::TextEncoder => model.join("text_encoder/model.safetensors"),
        Component::TextEncoder2 => model.join("text_encoder_2/model.safetensors"),
    }
}

pub fn single_file() -> PathBuf {
    features_dir().join("tiny-sdxl-single.safetensors")
}

/// `(name, shape)` of every tensor of a safetensors file.
pub fn shapes(path: &Path) -> Vec<(String, Vec<usize>)> {
    read_safetensors_keys(path).unwrap()
}

/// A tensor's values as f32 bit patterns (f16/bf16 → f32 is exact), with its dtype.
pub fn bits(t: &Tensor) -> (DType, Vec<usize>, Vec<u32>) {
    let v = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (t.dtype(), t.dims().to_vec(), v.into_iter().map(f32::to_bits).collect())
}

/// Largest absolute difference in f32, after checking the shapes agree.
pub fn max_abs_diff(name: &str, got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let got = got.to_dtype(DType::F32).unwrap();
    let want = want.to_dtype(DType::F32).unwrap();
    (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
