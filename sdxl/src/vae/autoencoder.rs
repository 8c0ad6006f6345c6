//! diffusers' `AutoencoderKL` as the SDXL pipelines use it: encode an image
//! to UNet-space latents (img2img, inpainting) and decode latents back,
//! with the config's `scaling_factor` (and `latents_mean`/`latents_std`
//! when it has them) applied on the way in and undone on the way out.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::decoder::Decoder;
use super::encoder::{self, Encoder};
use super::mid::FILE;
use crate::config::VaeConfig;
use crate::ModelError;

/// The VAE: always a decoder; an encoder when the weights have one.
#[derive(Debug)]
pub struct AutoencoderKL {
    encoder: Option<Encoder>,
    decoder: Decoder,
    config: VaeConfig,
}

impl AutoencoderKL {
    /// Builds the decoder, and the encoder when `vb` holds its weights (a
    /// decoder-only VAE still serves text-to-image; img2img then says why not).
    pub fn new(c: &VaeConfig, vb: VarBuilder) -> std::result::Result<Self, ModelError> {
        if c.block_out_channels.is_empty() {
            return Err(ModelError::config(FILE, "`block_out_channels` is empty"));
        }
        for (key, v) in [("latents_mean", &c.latents_mean), ("latents_std", &c.latents_std)] {
            if let Some(v) = v {
                if v.len() != c.latent_channels {
                    return Err(ModelError::config(
                        FILE,
                        format!(
                            "`{key}` has {} values, expected `latent_channels` = {}",
                            v.len(),
                            c.latent_channels
                        ),
                    ));
                }
            }
        }
        let decoder = Decoder::new(c, vb.clone())?;
        let encoder = if vb.contains_tensor("encoder.conv_in.weight") {
            Some(Encoder::new(c, vb)?)
        } else {
            None
        };
        Ok(Self {
            encoder,
            decoder,
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// `vae.decode(z)`: `z` are latents already divided by the scaling factor.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.decode(z)
    }

    /// The latent distribution's moments of images in [-1, 1]; `None`
    /// without encoder weights.
    pub fn encode_moments(&self, images: &Tensor) -> Option<Result<Tensor>> {
        self.encoder.as_ref().map(|e| e.moments(images))
    }

    /// A sample of the distribution with `noise`, in UNet space:
    /// `retrieve_latents(vae.encode(image))` then the pipelines' scaling.
    pub fn sample_latents(&self, moments: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.scale_latents(&encoder::sample(moments, noise)?)
    }

    /// What the SDXL pipelines do after encoding: `(z - latents_mean) ·
    /// scaling_factor / latents_std` when the config has both, else `z ·
    /// scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        match (&c.latents_mean, &c.latents_std) {
            (Some(mean), Some(std)) => {
                let (mean, std) = (self.per_channel(mean, z)?, self.per_channel(std, z)?);
                (z.broadcast_sub(&mean)? * c.scaling_factor)?.broadcast_div(&std)
            }
            _ => z * c.scaling_factor,
        }
    }

    /// What the SDXL pipelines do before `decode`: undo `latents_mean`/`latents_std`
    /// when the config has them, and the `scaling_factor`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        match (&c.latents_mean, &c.latents_std) {
            (Some(mean), Some(std)) => {
                let (mean, std) = (self.per_channel(mean, latents)?, self.per_channel(std, latents)?);
                (latents.broadcast_mul(&std)? / c.scaling_factor)?.broadcast_add(&mean)
            }
            _ => latents / c.scaling_factor,
        }
    }

    fn per_channel(&self, values: &[f64], like: &Tensor) -> Result<Tensor> {
        let shape = (1, values.len(), 1, 1);
        Tensor::from_vec(values.iter().map(|&v| v as f32).collect(), shape, like.device())?.to_dtype(like.dtype())
    }
}
