//! diffusers' tiled decode of `AutoencoderKL` (`enable_tiling()`, then
//! `tiled_decode`): the latents are cut into overlapping square tiles, each
//! decoded alone (`post_quant_conv` and the decoder), and every tile's top
//! and left edges are blended linearly into its upper and left neighbours'
//! before the tiles are cropped and joined. The peak memory is one tile's
//! decode, whatever the image size.
//!
//! The stepping, the blend and the crop are diffusers' to the pixel, so a
//! tiled image equals diffusers' tiled image (not the untiled one: each tile
//! sees only its own latents, and the mid-block attention only its tile).

use candle_core::{bail, Result, Tensor};

use super::autoencoder::AutoencoderKL;
use crate::config::VaeConfig;

/// The tile settings of diffusers' `AutoencoderKL`, under its attribute names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileSizes {
    /// Side of a latent tile (diffusers: `sample_size / 2^(blocks − 1)`);
    /// latents larger than this on either side are tiled.
    pub tile_latent_min_size: usize,
    /// Side of a decoded tile in pixels (diffusers: `sample_size`).
    pub tile_sample_min_size: usize,
    /// How much of a tile overlaps the next (diffusers: 0.25).
    pub tile_overlap_factor: f64,
}

impl TileSizes {
    /// diffusers' defaults for `config`, as `AutoencoderKL.__init__` sets them.
    pub fn from_config(config: &VaeConfig) -> Self {
        let sample_size = config.sample_size.0;
        let blocks = config.block_out_channels.len().max(1);
        TileSizes {
            // int(sample_size / 2 ** (len(block_out_channels) - 1))
            tile_latent_min_size: (sample_size as f64 / (1u64 << (blocks - 1)) as f64) as usize,
            tile_sample_min_size: sample_size,
            tile_overlap_factor: 0.25,
        }
    }

    /// Latent rows (and columns) from one tile's start to the next's.
    pub fn overlap_size(&self) -> usize {
        (self.tile_latent_min_size as f64 * (1.0 - self.tile_overlap_factor)) as usize
    }

    /// Pixel rows (and columns) over which two neighbouring tiles are blended.
    pub fn blend_extent(&self) -> usize {
        (self.tile_sample_min_size as f64 * self.tile_overlap_factor) as usize
    }

    /// Pixel rows (and columns) of each decoded tile that are kept.
    pub fn row_limit(&self) -> usize {
        self.tile_sample_min_size.saturating_sub(self.blend_extent())
    }

    /// diffusers' condition for a tiled decode of `h`×`w` latents: larger
    /// than one tile on either side.
    pub fn tiles_needed(&self, h: usize, w: usize) -> bool {
        h > self.tile_latent_min_size || w > self.tile_latent_min_size
    }

    /// How many tiles a `h`×`w` latent is cut into (rows, columns).
    pub fn grid(&self, h: usize, w: usize) -> (usize, usize) {
        let step = self.overlap_size().max(1);
        (h.div_ceil(step), w.div_ceil(step))
    }

    /// Whether these sizes stitch `h`×`w` latents into exactly the
    /// `scale`-times larger image the untiled decode gives. diffusers does
    /// not check: sizes that do not fit together give it an image of another
    /// size or with misplaced tiles; here they are an error.
    pub fn check(&self, h: usize, w: usize, scale: usize) -> Result<()> {
        let t = self.tile_latent_min_size;
        let f = self.tile_overlap_factor;
        if t == 0 || self.overlap_size() == 0 || !(0.0..1.0).contains(&f) {
            bail!(
                "VAE tiling: tile_latent_min_size {t} with tile_overlap_factor {f} leaves no step between tiles \
                 (the size must be at least 1 and the factor in [0, 1))"
            );
        }
        if self.tile_sample_min_size != t * scale {
            bail!(
                "VAE tiling: tile_sample_min_size {} is not tile_latent_min_size {t} × {scale} (the decoder's upscaling)",
                self.tile_sample_min_size
            );
        }
        for (side, n) in [("height", h), ("width", w)] {
            let got = self.stitched(n, scale);
            if got != n * scale {
                bail!(
                    "VAE tiling: tiles of {t} latents overlapping by {f} stitch a {side} of {n} latents into \
                     {got} pixels, not {} (tile_latent_min_size × tile_overlap_factor must be a whole number)",
                    n * scale
                );
            }
        }
        Ok(())
    }

    /// The pixels along one side after cropping and joining the tiles.
    fn stitched(&self, n: usize, scale: usize) -> usize {
        (0..n)
            .step_by(self.overlap_size().max(1))
            .map(|start| (self.tile_latent_min_size.min(n - start) * scale).min(self.row_limit()))
            .sum()
    }
}

/// When the VAE decodes an image in tiles (diffusers' `enable_tiling`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VaeTiling {
    /// Whole when the image's estimated decode fits the free memory the
    /// caller passes to the pipeline's `decode_within`, else tiled; whole
    /// when it passes none.
    #[default]
    Auto,
    /// Tiled whenever the latents are larger than one tile, as diffusers
    /// does after `vae.enable_tiling()`.
    On,
    /// Always whole.
    Off,
}

impl VaeTiling {
    pub const ALL: [VaeTiling; 3] = [VaeTiling::Auto, VaeTiling::On, VaeTiling::Off];

    pub fn name(self) -> &'static str {
        match self {
            VaeTiling::Auto => "auto",
            VaeTiling::On => "on",
            VaeTiling::Off => "off",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl AutoencoderKL {
    /// `vae.enable_tiling(); vae.tiled_decode(z)` with `tiles` (see
    /// [`TileSizes::from_config`] for diffusers' defaults): `z` are latents
    /// already divided by the scaling factor, of any size. diffusers decodes
    /// every tile first and then blends; here each row is blended as soon as
    /// it is decoded and only the row above is kept, which gives the same
    /// numbers (a tile is blended only with tiles already blended) and holds
    /// two rows of decoded tiles instead of all of them.
    pub fn tiled_decode(&self, z: &Tensor, tiles: &TileSizes) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        tiles.check(h, w, self.scale_factor())?;
        let (t, step) = (tiles.tile_latent_min_size, tiles.overlap_size());
        let (extent, limit) = (tiles.blend_extent(), tiles.row_limit());
        let mut above: Vec<Tensor> = Vec::new();
        let mut rows = Vec::new();
        for i in (0..h).step_by(step) {
            let mut row: Vec<Tensor> = Vec::new();
            for (col, j) in (0..w).step_by(step).enumerate() {
                let tile = z.narrow(2, i, t.min(h - i))?.narrow(3, j, t.min(w - j))?.contiguous()?;
                let mut decoded = self.decode(&tile)?;
                if let Some(up) = above.get(col) {
                    decoded = blend(up, &decoded, extent, 2)?;
                }
                if let Some(left) = row.last() {
                    decoded = blend(left, &decoded, extent, 3)?;
                }
                row.push(decoded);
            }
            let kept = row.iter().map(|tile| crop(tile, limit)).collect::<Result<Vec<_>>>()?;
            rows.push(Tensor::cat(&kept, 3)?);
            above = row;
        }
        Tensor::cat(&rows, 2)
    }

    /// Pixels per latent pixel: 2^(blocks − 1).
    pub fn scale_factor(&self) -> usize {
        1 << self.config().block_out_channels.len().saturating_sub(1)
    }
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): the first
/// `extent` rows (columns) of `b` fade from the last ones of `a` into `b`'s
/// own, `a · (1 − y/extent) + b · (y/extent)` at row `y`, with the weights
/// rounded to the tensors' type as PyTorch does with a Python float.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let fraction = |y: usize| y as f64 / extent as f64;
    let weights = |f: &dyn Fn(usize) -> f64| -> Result<Tensor> {
        let values: Vec<f32> = (0..extent).map(|y| f(y) as f32).collect();
        let mut shape = vec![1, 1, 1, 1];
        shape[dim] = extent;
        Tensor::from_vec(values, shape, b.device())?.to_dtype(b.dtype())
    };
    let from_a = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let from_b = b.narrow(dim, 0, extent)?;
    let edge =
        (from_a.broadcast_mul(&weights(&|y| 1.0 - fraction(y))?)? + from_b.broadcast_mul(&weights(&fraction)?)?)?;
    let rest = b.dim(dim)? - extent;
    if rest == 0 {
        return Ok(edge);
    }
    Tensor::cat(&[&edge, &b.narrow(dim, extent, rest)?], dim)
}

/// The first `limit` rows and columns of a decoded tile (all of a smaller one).
fn crop(tile: &Tensor, limit: usize) -> Result<Tensor> {
    let (_, _, h, w) = tile.dims4()?;
    tile.narrow(2, 0, h.min(limit))?.narrow(3, 0, w.min(limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(t: usize, s: usize, f: f64) -> TileSizes {
        TileSizes {
            tile_latent_min_size: t,
            tile_sample_min_size: s,
            tile_overlap_factor: f,
        }
    }

    #[test]
    fn sdxl_defaults_are_diffusers() {
        let config: VaeConfig =
            serde_json::from_str(include_str!("../../configs/sdxl-base-1.0/vae/config.json")).unwrap();
        let tiles = TileSizes::from_config(&config);
        assert_eq!(tiles, sizes(128, 1024, 0.25));
        assert_eq!(
            (tiles.overlap_size(), tiles.blend_extent(), tiles.row_limit()),
            (96, 256, 768)
        );
        assert!(!tiles.tiles_needed(128, 128), "1024² is one tile");
        assert!(tiles.tiles_needed(128, 136));
        assert_eq!(tiles.grid(256, 256), (3, 3), "2048²: nine tiles of 1024²");
        tiles.check(256, 256, 8).unwrap();
        tiles.check(97, 131, 8).unwrap();
    }

    #[test]
    fn sizes_that_do_not_stitch_back_are_refused() {
        // 10 · 0.75 = 7 latents a step, but 80 − 20 = 60 pixels kept, not 56
        let err = sizes(10, 80, 0.25).check(30, 30, 8).unwrap_err().to_string();
        assert!(err.contains("stitch a height of 30 latents"), "{err}");
        assert!(
            sizes(16, 100, 0.25).check(30, 30, 8).is_err(),
            "sample size not 8 × latent size"
        );
        assert!(sizes(1, 8, 0.25).check(30, 30, 8).is_err(), "no step between tiles");
        assert!(sizes(16, 128, 1.0).check(30, 30, 8).is_err());
        sizes(8, 64, 0.5).check(12, 13, 8).unwrap();
    }

    #[test]
    fn blend_fades_linearly_and_stops_at_the_shorter_tile() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::ones((1, 1, 4, 2), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros((1, 1, 3, 2), candle_core::DType::F32, &dev).unwrap();
        let v = blend(&a, &b, 4, 2).unwrap();
        let rows: Vec<Vec<f32>> = v.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        // extent min(4, 4, 3) = 3: weights of a are 1, 2/3, 1/3
        assert_eq!(rows.len(), 3);
        for (row, want) in rows.iter().zip([1.0, 2.0 / 3.0, 1.0 / 3.0]) {
            assert!(row.iter().all(|&x| (x - want).abs() < 1e-6), "{rows:?}");
        }
        let a = Tensor::ones((1, 1, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros((1, 1, 2, 3), candle_core::DType::F32, &dev).unwrap();
        let h = blend(&a, &b, 1, 3).unwrap();
        assert_eq!(h.dims(), &[1, 1, 2, 3]);
        assert_eq!(
            h.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
        );
    }
}
