//! How much device memory a VAE decode takes, estimated from the config
//! before it runs, so that the pipeline can decode an image whole when that
//! fits and in tiles when it does not, instead of finding out by running
//! out of memory.
//!
//! The estimate counts the tensors alive at the fullest moment of each stage
//! of `Decoder::decode` as it runs on a GPU with our kernels and cuDNN
//! convolutions (the default): a convolution holds its input, its output and
//! a workspace about the size of its input (cuDNN's NCHW kernels through
//! NHWC); a resnet at most three of its tensors and that workspace
//! (`ResnetBlock2D::forward` drops each as soon as the next exists); an
//! upsampler its input, the upsampled tensor, its output and the workspace;
//! the mid-block attention its projections and its scores
//! (`nn::attention_scores_at_once` of them, as candle's attention makes them
//! a block of queries at a time). The convolutional stages grow with the
//! pixels ([`decode_bytes_per_pixel`]); the attention's scores grow with
//! their square until they are made in blocks, and are counted apart.
//! Allocator rounding and the CUDA context are left to the caller's margin.

use candle_core::DType;

use super::tiling::TileSizes;
use crate::config::VaeConfig;
use crate::nn::attention_scores_at_once;

/// Values alive at once per pixel of one resnet's input resolution,
/// `c_in` → `c_out` channels: see the module's header.
fn resnet_values(c_in: u64, c_out: u64) -> u64 {
    if c_in == c_out {
        // input, normed, conv1 + workspace; then input, normed, conv2 + workspace
        4 * c_out
    } else {
        // conv1: input, normed, output, workspace (input-sized);
        // shortcut: input, norm2's output, shortcut, workspace;
        // conv2: input, norm2's output, shortcut, output, workspace
        (3 * c_in + c_out).max(2 * c_in + 2 * c_out).max(c_in + 4 * c_out)
    }
}

/// The largest number of values alive at once during the convolutional
/// stages of the decoder, per *latent* pixel (a stage at 2^k times the
/// latent resolution counts 4^k per latent pixel).
fn conv_values_per_latent_pixel(c: &VaeConfig) -> u64 {
    let widths: Vec<u64> = c.block_out_channels.iter().rev().map(|&w| w as u64).collect();
    let Some(&top) = widths.first() else {
        return 0;
    };
    let latent = c.latent_channels as u64;
    // conv_in on post_quant_conv's output: input, output, workspace
    let mut peak = 3 * latent + top;
    peak = peak.max(resnet_values(top, top));
    let mut prev = top;
    let mut area = 1u64;
    for (i, &width) in widths.iter().enumerate() {
        peak = peak.max(resnet_values(prev, width) * area);
        if c.layers_per_block > 0 {
            peak = peak.max(resnet_values(width, width) * area);
        }
        if i + 1 < widths.len() {
            // input, then upsampled, output and workspace at four times the pixels
            peak = peak.max(width * area * (1 + 3 * 4));
            area *= 4;
        }
        prev = width;
    }
    // conv_norm_out (+ SiLU) then conv_out: input, normed, workspace, output
    let first = c.block_out_channels[0] as u64;
    peak.max((3 * first + c.out_channels as u64) * area)
}

/// Bytes per output pixel of the VAE decoder's convolutional stages in
/// `dtype` (its largest stage, the one that decides the peak): for SDXL's
/// VAE (widths 128, 256, 512, 512) the first resnet at full resolution,
/// 256 → 128 channels, with 896 values a pixel: 3,584 bytes in f32, 15 GB
/// for a 2048² image. The mid-block attention is counted apart
/// ([`decode_bytes`]).
pub fn decode_bytes_per_pixel(c: &VaeConfig, dtype: DType) -> f64 {
    let pixels_per_latent = (1u64 << (2 * c.block_out_channels.len().saturating_sub(1))) as f64;
    conv_values_per_latent_pixel(c) as f64 * dtype.size_in_bytes() as f64 / pixels_per_latent
}

/// Peak bytes of the mid block's attention over `batch` latents of
/// `tokens` pixels: its input, norm, tokens, q, k, v and their per-head
/// copies (9 values a token and channel), and the scores candle holds at
/// once: twice in f32 (the scaled scores and their softmax), in half types
/// the scores, their f32 copy, the f32 softmax and its cast back.
fn attention_bytes(c: &VaeConfig, dtype: DType, batch: usize, tokens: usize) -> u64 {
    if !c.mid_block_add_attention {
        return 0;
    }
    let e = dtype.size_in_bytes() as u64;
    let channels = *c.block_out_channels.last().unwrap_or(&0) as u64;
    let scores = attention_scores_at_once(batch, tokens, tokens) as u64;
    let per_score = 2 * e + if e < 4 { 8 } else { 0 };
    9 * channels * (batch * tokens) as u64 * e + scores * per_score
}

/// Estimated peak bytes of activations of `AutoencoderKL.decode` of `batch`
/// latents of `h`×`w` in `dtype`: the larger of the convolutional stages
/// ([`decode_bytes_per_pixel`] times the pixels) and the mid-block
/// attention. The weights are not counted (they are already on the device).
pub fn decode_bytes(c: &VaeConfig, dtype: DType, batch: usize, h: usize, w: usize) -> u64 {
    let latent_pixels = (batch * h * w) as u64;
    let conv = conv_values_per_latent_pixel(c) * latent_pixels * dtype.size_in_bytes() as u64;
    conv.max(attention_bytes(c, dtype, batch, h * w))
}

/// Estimated peak bytes of [`AutoencoderKL::tiled_decode`](super::AutoencoderKL::tiled_decode)
/// of `batch` latents of `h`×`w`: one tile's decode, plus what stays while
/// it runs: two rows of decoded tiles (the row above and this one) and the
/// joined image twice (the joined rows and their concatenation).
pub fn tiled_decode_bytes(c: &VaeConfig, dtype: DType, tiles: &TileSizes, batch: usize, h: usize, w: usize) -> u64 {
    let t = tiles.tile_latent_min_size;
    let scale = 1usize << c.block_out_channels.len().saturating_sub(1);
    let e = dtype.size_in_bytes() as u64;
    let out = c.out_channels as u64;
    let (_, cols) = tiles.grid(h, w);
    let tile_side = (t * scale) as u64;
    let rows_of_tiles = 2 * cols as u64 * tile_side * tile_side * out * e;
    let image = (h * w * scale * scale) as u64 * out * e;
    decode_bytes(c, dtype, batch, t.min(h), t.min(w)) + batch as u64 * (rows_of_tiles + 2 * image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl_vae() -> VaeConfig {
        serde_json::from_str(include_str!("../../configs/sdxl-base-1.0/vae/config.json")).unwrap()
    }

    const GB: f64 = 1e9;

    #[test]
    fn sdxl_vae_needs_3584_bytes_a_pixel_in_f32() {
        let c = sdxl_vae();
        assert_eq!(decode_bytes_per_pixel(&c, DType::F32), 3584.0);
        assert_eq!(decode_bytes_per_pixel(&c, DType::F16), 1792.0);
        // 2048²: the convolutions (15 GB) outweigh the attention, made in blocks
        let whole = decode_bytes(&c, DType::F32, 1, 256, 256) as f64;
        assert!((whole - 3584.0 * 2048.0 * 2048.0).abs() < 1.0, "{whole}");
        // 1536²: 36,864 tokens, 1.36e9 scores in one block: the attention decides
        let attn = decode_bytes(&c, DType::F32, 1, 192, 192) as f64;
        let conv = 3584.0 * 1536.0 * 1536.0;
        assert!(conv < 9.0 * GB && attn > 10.0 * GB && attn < 12.0 * GB, "{attn}");
    }

    #[test]
    fn a_tiled_2048_decode_needs_about_what_a_1024_one_does() {
        let c = sdxl_vae();
        let tiles = TileSizes::from_config(&c);
        let one_tile = decode_bytes(&c, DType::F32, 1, 128, 128);
        let tiled = tiled_decode_bytes(&c, DType::F32, &tiles, 1, 256, 256);
        assert!(tiled > one_tile);
        assert!((tiled as f64) < 5.0 * GB, "{tiled}");
        assert!((decode_bytes(&c, DType::F32, 1, 256, 256) as f64) > 3.0 * tiled as f64);
    }

    #[test]
    fn the_estimate_follows_the_config() {
        let mut c = sdxl_vae();
        let sdxl = decode_bytes_per_pixel(&c, DType::F32);
        c.block_out_channels = vec![64, 128, 256, 256];
        assert_eq!(decode_bytes_per_pixel(&c, DType::F32), sdxl / 2.0);
        c.mid_block_add_attention = false;
        assert_eq!(attention_bytes(&c, DType::F32, 1, 4096), 0);
    }
}
