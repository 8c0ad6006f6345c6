//! From latents to pictures: the VAE decode (in f32 when the VAE asks for
//! it; whole, or in tiles when a whole decode would not fit), the full-size
//! TAESD decode, and the pooled TAESD previews shown while an image forms.

use candle_core::{DType, Tensor};

use super::model::SdxlPipeline;
use crate::vae::{decode_bytes, tiled_decode_bytes, TileSizes, VaeTiling};
use crate::ModelError;

/// Estimated peak bytes of decoding one image, whole and tiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeMemory {
    pub whole: u64,
    /// `None` when one tile covers the image (a tiled decode is the whole one).
    pub tiled: Option<u64>,
}

impl SdxlPipeline {
    /// VAE decode of final latents to images `[b, 3, H, W]` in [-1, 1]
    /// (f32), one image at a time: the decoder's activations are the
    /// largest of the pipeline (an f32 2048² image: about 15 GB), and a
    /// batch's peak would be the sum of them. Whole, unless the pipeline
    /// was loaded with [`VaeTiling::On`]; [`Self::decode_within`] chooses
    /// by the free memory.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        self.decode_within(latents, None)
    }

    /// [`Self::decode`] with `free` bytes of device memory for the decode:
    /// each image whole when its estimate ([`Self::decode_memory`]) fits in
    /// them, else in tiles ([`Self::decode_tiled`] decides).
    pub fn decode_within(&self, latents: &Tensor, free: Option<u64>) -> Result<Tensor, ModelError> {
        let (b, _, h, w) = latents.dims4()?;
        let f = self.vae_scale_factor;
        let tiled = self.decode_tiled(w * f, h * f, free);
        let tiles = self.vae_tiles();
        let images = (0..b)
            .map(|i| {
                let latents = latents.narrow(0, i, 1)?.to_dtype(self.vae_dtype)?;
                let z = self.vae.unscale_latents(&latents)?;
                let image = if tiled {
                    self.vae.tiled_decode(&z, &tiles)?
                } else {
                    self.vae.decode(&z)?
                };
                image.to_dtype(DType::F32)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(if b == 1 {
            images.into_iter().next().expect("one image")
        } else {
            Tensor::cat(&images, 0)?
        })
    }

    /// Whether [`Self::decode_within`] decodes a `width`×`height` image in
    /// tiles with `free` bytes: never with [`VaeTiling::Off`]; with `On`
    /// when the latents are larger than one tile; with `Auto` when they are
    /// and the whole decode's estimate is more than `free` (never without
    /// a `free`, nor when the tile sizes do not stitch this size back).
    pub fn decode_tiled(&self, width: usize, height: usize, free: Option<u64>) -> bool {
        let (_, _, h, w) = self.latent_shape(width, height);
        let tiles = self.vae_tiles();
        match self.vae_tiling {
            VaeTiling::Off => false,
            VaeTiling::On => tiles.tiles_needed(h, w),
            VaeTiling::Auto => {
                tiles.tiles_needed(h, w)
                    && tiles.check(h, w, self.vae_scale_factor).is_ok()
                    && free.is_some_and(|free| self.decode_memory(width, height).whole > free)
            }
        }
    }

    /// Estimated peak bytes of decoding one `width`×`height` image, whole
    /// and tiled (`vae::decode_bytes`, `vae::tiled_decode_bytes`), in the
    /// VAE's dtype.
    pub fn decode_memory(&self, width: usize, height: usize) -> DecodeMemory {
        let (_, _, h, w) = self.latent_shape(width, height);
        let c = self.vae.config();
        let tiles = self.vae_tiles();
        DecodeMemory {
            whole: decode_bytes(c, self.vae_dtype, 1, h, w),
            tiled: (tiles.tiles_needed(h, w) && tiles.check(h, w, self.vae_scale_factor).is_ok())
                .then(|| tiled_decode_bytes(c, self.vae_dtype, &tiles, 1, h, w)),
        }
    }

    /// How this pipeline chooses between whole and tiled decodes.
    pub fn vae_tiling(&self) -> VaeTiling {
        self.vae_tiling
    }

    /// The tiles of a tiled decode: diffusers' defaults for the VAE's config.
    pub fn vae_tiles(&self) -> TileSizes {
        TileSizes::from_config(self.vae.config())
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
