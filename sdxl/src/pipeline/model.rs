//! The loaded pipeline itself: [`SdxlPipeline`] (its components and the
//! numbers they share) and [`PromptEmbeds`], with the accessors that need no
//! other part of the pipeline. `load.rs`, `prompt.rs`, `denoise.rs` and
//! `decode.rs` add their `impl SdxlPipeline` blocks on top of it.

use candle_core::{DType, Device, Tensor};

use crate::clip::ClipTextModel;
use crate::scheduler::SchedulerConfig;
use crate::taesd::TinyDecoder;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKLDecoder;

/// The conditioning of one prompt for the UNet, unconditional half first
/// when guidance is on.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[2 or 1, 77, d1 + d2]`.
    pub prompt_embeds: Tensor,
    /// `[2 or 1, projection_dim]`.
    pub pooled_prompt_embeds: Tensor,
}

/// A loaded SDXL pipeline on one device.
#[derive(Debug)]
pub struct SdxlPipeline {
    pub(super) tokenizer: ClipTokenizer,
    pub(super) tokenizer_2: ClipTokenizer,
    pub(super) text_encoder: ClipTextModel,
    pub(super) text_encoder_2: ClipTextModel,
    pub(super) unet: UNet2DConditionModel,
    pub(super) vae: AutoencoderKLDecoder,
    pub(super) taesd: Option<TinyDecoder>,
    pub(super) scheduler_config: SchedulerConfig,
    pub(super) force_zeros_for_empty_prompt: bool,
    pub(super) latent_channels: usize,
    /// Pixels per latent pixel (2^(VAE blocks − 1)).
    pub(super) vae_scale_factor: usize,
    pub(super) device: Device,
    pub(super) dtype: DType,
    pub(super) vae_dtype: DType,
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

    /// The UNet alone (for parity tests and benchmarks).
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// The VAE decoder alone (for parity tests and benchmarks).
    pub fn vae(&self) -> &AutoencoderKLDecoder {
        &self.vae
    }
}
