//! The image side of img2img and inpainting: an input image to UNet-space
//! latents through the VAE encoder (in f32 when the VAE asks for it, as
//! decode is), each image of the job with its own `vae_sample` draw, and a
//! mask to the latent resolution.

use candle_core::Tensor;
use image::{GrayImage, RgbImage};

use super::denoise::Start;
use super::model::SdxlPipeline;
use crate::image_processor::{mask_to_latents, preprocess, preprocess_mask};
use crate::noise::{draw_batch, Draw, ImageNoise};
use crate::ModelError;

/// How encoded latents are scaled into UNet space: img2img applies the
/// config's `latents_mean`/`latents_std` when it has them, inpainting only
/// the `scaling_factor` (diffusers' two pipelines differ there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentScaling {
    Img2Img,
    Inpaint,
}

impl SdxlPipeline {
    /// `image` (any size; resized to `width`×`height` when it differs) to
    /// latents `[k, c, h/f, w/f]`, image `i` sampled with `noise[i]`'s
    /// `vae_sample` draw.
    pub fn encode_image(
        &self,
        image: &RgbImage,
        width: usize,
        height: usize,
        noise: &[ImageNoise],
        scaling: LatentScaling,
    ) -> Result<Tensor, ModelError> {
        if !self.vae.has_encoder() {
            return Err(ModelError::Input(
                "this VAE has no encoder weights (`encoder.*`): it cannot start from an image".into(),
            ));
        }
        let pixels = preprocess(image, width, height)?
            .to_device(&self.device)?
            .to_dtype(self.vae_dtype)?;
        let moments = self.vae.encode_moments(&pixels).expect("checked above")?;
        let (_, c2, h, w) = moments.dims4()?;
        let draws = draw_batch(noise, Draw::VaeSample, (c2 / 2, h, w))?.to_device(&self.device)?;
        let k = noise.len();
        let moments = moments.repeat((k, 1, 1, 1))?;
        let z = crate::vae::sample(&moments, &draws)?.to_dtype(self.dtype)?;
        Ok(match scaling {
            LatentScaling::Img2Img => self.vae.scale_latents(&z)?,
            LatentScaling::Inpaint => (z * self.vae.config().scaling_factor)?,
        })
    }

    /// A mask (white = repaint) to `[1, 1, h/f, w/f]`, binarised, for an
    /// image of `width`×`height`.
    pub fn latent_mask(&self, mask: &GrayImage, width: usize, height: usize) -> Result<Tensor, ModelError> {
        let full = preprocess_mask(mask, width, height)?;
        let (_, _, h, w) = self.latent_shape(width, height);
        Ok(mask_to_latents(&full, h, w)?)
    }
}

/// What a job starts from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// Text to image.
    Text,
    /// img2img: repaint `strength` of `image` (0 < strength ≤ 1).
    Image { image: &'a RgbImage, strength: f64 },
    /// Inpainting: repaint where `mask` is white, `strength` of the way.
    Inpaint {
        image: &'a RgbImage,
        mask: &'a GrayImage,
        strength: f64,
    },
}

/// A job's start made ready: the encoded image and the latent mask.
#[derive(Debug)]
pub struct Prepared {
    image: Option<Tensor>,
    mask: Option<Tensor>,
    strength: f64,
}

impl Prepared {
    /// The starts of several jobs' images denoised in one loop
    /// ([`SdxlPipeline::denoise_images`]), each given with its number of
    /// images, in the loop's order: their encoded images one after the
    /// other, and each job's mask once per image of it. The jobs share a
    /// kind of start and a strength (what lets them share a loop).
    pub fn join(parts: &[(&Prepared, usize)]) -> Result<Prepared, ModelError> {
        if let [(one, _)] = parts {
            return Ok(Prepared {
                image: one.image.clone(),
                mask: one.mask.clone(),
                strength: one.strength,
            });
        }
        let Some((first, _)) = parts.first() else {
            return Err(ModelError::Input("no start to join".into()));
        };
        if parts.iter().any(|(p, _)| {
            p.image.is_some() != first.image.is_some()
                || p.mask.is_some() != first.mask.is_some()
                || p.strength != first.strength
        }) {
            return Err(ModelError::Input(
                "jobs denoised in one loop must start alike (text, image or inpainting, one strength)".into(),
            ));
        }
        let cat = |tensors: Vec<Tensor>| -> Result<Option<Tensor>, ModelError> {
            Ok(if tensors.is_empty() {
                None
            } else {
                Some(Tensor::cat(&tensors, 0)?)
            })
        };
        let images = parts.iter().filter_map(|(p, _)| p.image.clone()).collect();
        let masks = parts
            .iter()
            .filter_map(|(p, n)| p.mask.as_ref().map(|m| m.repeat((*n, 1, 1, 1))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Prepared {
            image: cat(images)?,
            mask: cat(masks)?,
            strength: first.strength,
        })
    }

    /// Where [`SdxlPipeline::denoise`] starts.
    pub fn start(&self) -> Start<'_> {
        match (&self.image, &self.mask) {
            (Some(latents), Some(mask)) => Start::Inpaint {
                latents,
                mask,
                strength: self.strength,
            },
            (Some(latents), None) => Start::Image {
                latents,
                strength: self.strength,
            },
            _ => Start::Noise,
        }
    }
}

impl SdxlPipeline {
    /// Encodes what `source` starts from for an image of `width`×`height`,
    /// each image of the job with its own draws.
    pub fn prepare(
        &self,
        source: &Source,
        width: usize,
        height: usize,
        noise: &[ImageNoise],
    ) -> Result<Prepared, ModelError> {
        Ok(match *source {
            Source::Text => Prepared {
                image: None,
                mask: None,
                strength: 1.0,
            },
            Source::Image { image, strength } => Prepared {
                image: Some(self.encode_image(image, width, height, noise, LatentScaling::Img2Img)?),
                mask: None,
                strength,
            },
            Source::Inpaint { image, mask, strength } => Prepared {
                image: Some(self.encode_image(image, width, height, noise, LatentScaling::Inpaint)?),
                mask: Some(self.latent_mask(mask, width, height)?),
                strength,
            },
        })
    }
}
