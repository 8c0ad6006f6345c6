//! The loaded pipeline itself: [`SdxlPipeline`] (its components and the
//! numbers they share) and [`PromptEmbeds`], with the accessors that need no
//! other part of the pipeline. `load.rs`, `prompt.rs`, `denoise.rs`,
//! `image.rs`, `lora.rs` and `decode.rs` add their `impl SdxlPipeline`
//! blocks on top of it.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::layout::ModelLayout;
use crate::checkpoint::single_file::SingleFile;
use crate::clip::ClipTextModel;
use crate::config::{ClipTextConfig, UNetConfig};
use crate::scheduler::SchedulerConfig;
use crate::taesd::TinyDecoder;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::{AutoencoderKL, VaeTiling};

/// The conditioning of one prompt for the UNet, unconditional half first
/// when guidance is on.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[2 or 1, 77, d1 + d2]`.
    pub prompt_embeds: Tensor,
    /// `[2 or 1, projection_dim]`.
    pub pooled_prompt_embeds: Tensor,
}

/// The models a LoRA can change: both text encoders and the UNet.
#[derive(Debug)]
pub(super) struct Adaptable {
    pub(super) text_encoder: ClipTextModel,
    pub(super) text_encoder_2: ClipTextModel,
    pub(super) unet: UNet2DConditionModel,
}

/// Where the adaptable models' weights are read from, kept so that they can
/// be built again with LoRA updates merged in.
#[derive(Debug, Clone)]
pub(super) enum WeightSource {
    /// A diffusers folder: the safetensors files of each component.
    Folder {
        text_encoder: Vec<PathBuf>,
        text_encoder_2: Vec<PathBuf>,
        unet: Vec<PathBuf>,
    },
    /// A single-file checkpoint, mapped and checked.
    SingleFile(Arc<SingleFile>),
}

/// What building the adaptable models again needs.
#[derive(Debug)]
pub(super) struct Rebuild {
    pub(super) source: WeightSource,
    pub(super) te_config: ClipTextConfig,
    pub(super) te2_config: ClipTextConfig,
    pub(super) unet_config: UNetConfig,
    /// Every weight key and shape of the model: what a LoRA may target.
    pub(super) layout: ModelLayout,
}

/// A loaded SDXL pipeline on one device.
#[derive(Debug)]
pub struct SdxlPipeline {
    pub(super) tokenizer: ClipTokenizer,
    pub(super) tokenizer_2: ClipTokenizer,
    /// The models as loaded; never modified.
    pub(super) base: Adaptable,
    /// The models with the current LoRAs merged, and which LoRAs those are.
    pub(super) adapted: Option<(String, Adaptable)>,
    /// The last merged copy while a job without LoRAs runs, kept for the next
    /// job that asks for the same LoRAs.
    pub(super) cached: Option<(String, Adaptable)>,
    /// How many merged copies have been built (reuse shows as no increase).
    pub(super) merges: usize,
    pub(super) rebuild: Rebuild,
    pub(super) vae: AutoencoderKL,
    pub(super) taesd: Option<TinyDecoder>,
    pub(super) scheduler_config: SchedulerConfig,
    pub(super) force_zeros_for_empty_prompt: bool,
    pub(super) latent_channels: usize,
    /// Pixels per latent pixel (2^(VAE blocks − 1)).
    pub(super) vae_scale_factor: usize,
    pub(super) device: Device,
    pub(super) dtype: DType,
    pub(super) vae_dtype: DType,
    pub(super) vae_tiling: VaeTiling,
}

impl SdxlPipeline {
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn has_previews(&self) -> bool {
        self.taesd.is_some()
    }

    /// The model's scheduler config (`scheduler/scheduler_config.json`), from
    /// which every sampler is built.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// The latent shape `[1, c, h/f, w/f]` for an image of `width`×`height`.
    pub fn latent_shape(&self, width: usize, height: usize) -> (usize, usize, usize, usize) {
        (
            1,
            self.latent_channels,
            height / self.vae_scale_factor,
            width / self.vae_scale_factor,
        )
    }

    /// `(height, width)` of the decoded image for a `width`×`height` request.
    pub fn image_size(&self, width: usize, height: usize) -> (usize, usize) {
        let (_, _, h, w) = self.latent_shape(width, height);
        (h * self.vae_scale_factor, w * self.vae_scale_factor)
    }

    pub fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    /// The text encoders and UNet in use: with the current LoRAs merged, or as loaded.
    pub(super) fn active(&self) -> &Adaptable {
        self.adapted.as_ref().map_or(&self.base, |(_, m)| m)
    }

    /// The UNet in use (for parity tests and benchmarks).
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.active().unet
    }

    /// Bytes one image's text context holds on the device through its
    /// denoising loop: the cross-attentions' keys and values of both
    /// guidance rows (`UNet2DConditionModel::conditioning`).
    pub fn context_bytes(&self) -> u64 {
        self.unet().context_kv_bytes(2, self.tokenizer.max_length()) as u64
    }

    /// The VAE (for parity tests and benchmarks).
    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }
}
