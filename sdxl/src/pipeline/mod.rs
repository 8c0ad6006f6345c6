//! `StableDiffusionXLPipeline`: text encoding with both CLIP encoders,
//! classifier-free-guided denoising with the `text_time` UNet and the job's
//! sampler, VAE decode, and TAESD previews.
//!
//! Pure model code: it takes strings, noise and numbers and returns tensors;
//! what happens between steps (progress, previews, cancellation) is the
//! caller's, through a callback.
//!
//! - `model.rs`: [`SdxlPipeline`] itself and [`PromptEmbeds`];
//! - `load.rs`: [`LoadOptions`] and building every component (a diffusers
//!   folder, or a single-file checkpoint with a folder of configs);
//! - `prompt.rs`: tokenizing and encoding the prompt and negative prompt;
//! - `denoise.rs`: the denoising loop ([`DenoiseParams`], [`StepState`]);
//! - `image.rs`: img2img's and inpainting's input image and mask;
//! - `lora.rs`: LoRAs merged into a copy of the text encoders and the UNet;
//! - `decode.rs`: the VAE decode (whole or tiled, [`VaeTiling`]) and the
//!   TAESD previews.

mod decode;
mod denoise;
mod image;
mod load;
mod lora;
mod model;
mod prompt;

pub use self::decode::{preview_pool, PREVIEW_MAX_SIDE};
pub use self::denoise::{draws, first_step, DenoiseParams, ImageJob, Start, StepState};
pub use self::image::{LatentScaling, Prepared, Source};
pub use self::load::{is_single_file, LoadOptions};
pub use self::lora::LoraWeights;
pub use self::model::{PromptEmbeds, SdxlPipeline};

/// Whole or tiled VAE decodes, and what each takes.
pub use self::decode::DecodeMemory;
pub use crate::vae::VaeTiling;
