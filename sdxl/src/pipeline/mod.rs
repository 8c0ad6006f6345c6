//! `StableDiffusionXLPipeline`: text encoding with both CLIP encoders,
//! classifier-free-guided denoising with the `text_time` UNet and the job's
//! sampler, VAE decode, and TAESD previews.
//!
//! Pure model code: it takes strings, noise and numbers and returns tensors;
//! what happens between steps (progress, previews, cancellation) is the
//! caller's, through a callback.
//!
//! - `load.rs`: [`LoadOptions`] and building every component (a diffusers
//!   folder, or a single-file checkpoint with a folder of configs);
//! - `prompt.rs`: tokenizing and encoding the prompt and negative prompt;
//! - `denoise.rs`: the denoising loop ([`DenoiseParams`], [`StepState`]);
//! - `decode.rs`: the VAE decode and the TAESD previews.

mod decode;
mod denoise;
mod load;
mod prompt;

use candle_core::{DType, Device, Tensor};

pub use self::decode::{preview_pool, PREVIEW_MAX_SIDE};
pub use self::denoise::{draws, DenoiseParams, StepState};
pub use self::load::{is_single_file, LoadOptions};
use super::clip::ClipTextModel;
use super::scheduler::SchedulerConfig;
use super::taesd::TinyDecoder;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKLDecoder;

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
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    text_encoder: ClipTextModel,
    text_encoder_2: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKLDecoder,
    taesd: Option<TinyDecoder>,
    scheduler_config: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
    latent_channels: usize,
    /// Pixels per latent pixel (2^(VAE blocks − 1)).
    vae_scale_factor: usize,
    device: Device,
    dtype: DType,
    vae_dtype: DType,
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

    /// `(height, width)` of a preview, or `None` without a preview decoder.
    pub fn preview_size(&self, width: usize, height: usize) -> Option<(usize, usize)> {
        let (_, _, h, w) = self.latent_shape(width, height);
        self.taesd.as_ref().map(|t| {
            let pool = preview_pool(h.max(w) * t.upscale());
            (h / pool * t.upscale(), w / pool * t.upscale())
        })
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
