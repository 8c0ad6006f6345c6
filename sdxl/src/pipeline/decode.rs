//! From latents to pictures: the VAE decode (in f32 when the VAE asks for
//! it), the full-size TAESD decode, and the pooled TAESD previews shown
//! while an image forms.

use candle_core::{DType, Tensor};

use super::model::SdxlPipeline;
use crate::ModelError;

impl SdxlPipeline {
    /// VAE decode of final latents to images `[b, 3, H, W]` in [-1, 1]
    /// (f32), one image at a time: the decoder's activations are the
    /// largest of the pipeline (an f32 2048² image: several GB), and a
    /// batch's peak would be the sum of them.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        let b = latents.dim(0)?;
        let images = (0..b)
            .map(|i| {
                let latents = latents.narrow(0, i, 1)?.to_dtype(self.vae_dtype)?;
                let z = self.vae.unscale_latents(&latents)?;
                self.vae.decode(&z)?.to_dtype(DType::F32)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(if b == 1 {
            images.into_iter().next().expect("one image")
        } else {
            Tensor::cat(&images, 0)?
        })
    }

    /// `AutoencoderTiny.decode` of latents at full resolution, in [-1, 1]
    /// (f32); `None` when no TAESD was loaded.
    pub fn tiny_decode(&self, latents: &Tensor) -> Result<Option<Tensor>, ModelError> {
        match &self.taesd {
            Some(taesd) => Ok(Some(
                taesd.decode(&latents.to_dtype(self.dtype)?)?.to_dtype(DType::F32)?,
            )),
            None => Ok(None),
        }
    }

    /// TAESD decode of (intermediate) latents to images in [-1, 1] (f32);
    /// `None` when no preview decoder was loaded. Latents are average-pooled
    /// by [`preview_pool`] first, so a preview is at most
    /// [`PREVIEW_MAX_SIDE`] pixels on its long side.
    pub fn preview(&self, latents: &Tensor) -> Result<Option<Tensor>, ModelError> {
        let Some(taesd) = &self.taesd else {
            return Ok(None);
        };
        let (_, _, h, w) = latents.dims4()?;
        let pool = preview_pool(h.max(w) * taesd.upscale());
        let latents = latents.to_dtype(self.dtype)?;
        let latents = if pool > 1 { latents.avg_pool2d(pool)? } else { latents };
        Ok(Some(taesd.decode(&latents)?.to_dtype(DType::F32)?))
    }

    /// `(height, width)` of a preview, or `None` without a preview decoder.
    pub fn preview_size(&self, width: usize, height: usize) -> Option<(usize, usize)> {
        let (_, _, h, w) = self.latent_shape(width, height);
        self.taesd.as_ref().map(|t| {
            let pool = preview_pool(h.max(w) * t.upscale());
            (h / pool * t.upscale(), w / pool * t.upscale())
        })
    }
}

/// Previews are for watching an image form, not for keeping: at most this
/// many pixels on the long side. Full-size TAESD decodes of two 1024² images
/// took 490 ms on an H100 in candle; a 512² preview is a quarter of the work
/// and of the bytes sent to every subscriber.
pub const PREVIEW_MAX_SIDE: usize = 512;

/// The power-of-two pooling of latents that brings a preview whose long side
/// would be `side` pixels to at most [`PREVIEW_MAX_SIDE`].
pub fn preview_pool(side: usize) -> usize {
    let mut pool = 1;
    while side / pool > PREVIEW_MAX_SIDE {
        pool *= 2;
    }
    pool
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_pooled_to_at_most_512_pixels() {
        assert_eq!(preview_pool(128), 1);
        assert_eq!(preview_pool(512), 1);
        assert_eq!(preview_pool(1024), 2);
        assert_eq!(preview_pool(2048), 4);
        assert_eq!(preview_pool(1000), 2);
    }
}
