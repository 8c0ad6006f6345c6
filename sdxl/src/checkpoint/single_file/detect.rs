//! What kind of checkpoint a key list is, so a wrong file is refused with a
//! sentence saying what it is (SD 1.x, the refiner, a LoRA, a diffusers
//! component file) rather than with the first missing key.

use std::path::Path;

use super::map::SingleFileError;
use super::{clip, unet, vae};
use crate::checkpoint::file::read_safetensors_keys;

/// What a checkpoint's keys say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// UNet and both text encoders in the SGM layout; `has_vae` when
    /// `first_stage_model.*` is there too.
    SdxlBase {
        has_vae: bool,
    },
    /// The SDXL refiner (a single OpenCLIP text encoder as embedder 0).
    SdxlRefiner,
    /// Stable Diffusion 1.x/2.x (`cond_stage_model.*`).
    StableDiffusion,
    /// An SGM UNet without text encoders.
    UNetOnly,
    /// A diffusers component file (`down_blocks.*`, `text_model.*`, …).
    Diffusers,
    /// A LoRA (`lora_unet_*`, `*.lora_A.weight`, …).
    Lora,
    Unknown,
}

impl CheckpointKind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            CheckpointKind::SdxlBase { .. } => "an SDXL checkpoint",
            CheckpointKind::SdxlRefiner => "this is an SDXL refiner checkpoint, which is not supported",
            CheckpointKind::StableDiffusion => {
                "this is a Stable Diffusion 1.x/2.x checkpoint (`cond_stage_model.*` text encoder)"
            }
            CheckpointKind::UNetOnly => "it holds a UNet (`model.diffusion_model.*`) but no SDXL text encoders",
            CheckpointKind::Diffusers => {
                "this is a single diffusers component file (`down_blocks.*`, `text_model.*` names); use a diffusers folder"
            }
            CheckpointKind::Lora => "this is a LoRA, not a model checkpoint",
            CheckpointKind::Unknown => "it has no `model.diffusion_model.*` UNet weights",
        }
    }
}

/// Classifies a checkpoint by its key names.
pub fn detect_checkpoint<'a>(keys: impl IntoIterator<Item = &'a str>) -> CheckpointKind {
    let (mut unet, mut te1, mut te2, mut refiner_te, mut sd_te, mut vae, mut lora, mut diffusers) =
        (false, false, false, false, false, false, false, false);
    for k in keys {
        unet |= k.starts_with(unet::PREFIX);
        te1 |= k.starts_with(clip::TE1_PREFIX);
        te2 |= k.starts_with(clip::TE2_PREFIX);
        refiner_te |= k.starts_with("conditioner.embedders.0.model.");
        sd_te |= k.starts_with("cond_stage_model.");
        vae |= k.starts_with(vae::PREFIX);
        lora |= k.starts_with("lora_unet_") || k.starts_with("lora_te") || k.contains(".lora_A.");
        diffusers |= [
            "down_blocks.",
            "mid_block.",
            "text_model.",
            "encoder.down_blocks.",
            "decoder.up_blocks.",
        ]
        .iter()
        .any(|p| k.starts_with(p));
    }
    match () {
        _ if unet && te1 && te2 => CheckpointKind::SdxlBase { has_vae: vae },
        _ if unet && refiner_te => CheckpointKind::SdxlRefiner,
        _ if unet && sd_te => CheckpointKind::StableDiffusion,
        _ if unet => CheckpointKind::UNetOnly,
        _ if lora => CheckpointKind::Lora,
        _ if diffusers => CheckpointKind::Diffusers,
        _ => CheckpointKind::Unknown,
    }
}

/// Whether the safetensors file at `path` looks like a single-file SDXL
/// checkpoint (reads only its header; pickles are refused).
pub fn looks_like_sdxl_single_file(path: &Path) -> Result<bool, SingleFileError> {
    let keys = read_safetensors_keys(path)?;
    Ok(matches!(
        detect_checkpoint(keys.iter().map(|(k, _)| k.as_str())),
        CheckpointKind::SdxlBase { .. }
    ))
}
