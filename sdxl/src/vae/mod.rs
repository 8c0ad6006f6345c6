//! diffusers' `AutoencoderKL`: the encoder (image → latent distribution,
//! for img2img and inpainting), the decoder (latents → image), whole or in
//! tiles, and what they share.
//!
//! - `autoencoder.rs`: [`AutoencoderKL`], the latent scaling both ways;
//! - `encoder.rs`: `encoder.*`, `quant_conv`, the Gaussian sample;
//! - `decoder.rs`: `post_quant_conv`, `decoder.*`;
//! - `tiling.rs`: diffusers' tiled decode ([`TileSizes`], `tiled_decode`)
//!   and when to use it ([`VaeTiling`]);
//! - `memory.rs`: how much memory a decode takes, whole or tiled;
//! - `mid.rs`: the mid block and its attention, the resnet settings.

mod autoencoder;
mod decoder;
mod encoder;
mod memory;
mod mid;
mod tiling;

pub use self::autoencoder::AutoencoderKL;
pub use self::decoder::Decoder;
pub use self::encoder::{mode, sample, Encoder};
pub use self::memory::{decode_bytes, decode_bytes_per_pixel, tiled_decode_bytes};
pub use self::tiling::{TileSizes, VaeTiling};
