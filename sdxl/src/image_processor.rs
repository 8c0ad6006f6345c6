//! Between tensors and 8-bit images, as diffusers' `VaeImageProcessor`
//! postprocesses: the pipeline's float output to RGB, rounded as
//! `numpy_to_pil` does.

use candle_core::{DType, Tensor};
use image::RgbImage;

/// `[b, 3, h, w]` images in [-1, 1] (the VAE's range) to 8-bit RGB:
/// `round(clamp(x / 2 + 0.5, 0, 1) * 255)`, halves to even as numpy does.
pub fn from_signed_unit(images: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let unit = ((images.to_dtype(DType::F32)? / 2.0)? + 0.5)?;
    from_unit(&unit)
}

/// `[b, 3, h, w]` images in [0, 1] to 8-bit RGB (values outside are clamped).
pub fn from_unit(images: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        candle_core::bail!("expected 3 colour channels, got {c}");
    }
    let hwc = images.to_dtype(DType::F32)?.permute((0, 2, 3, 1))?.contiguous()?;
    let values: Vec<f32> = hwc.flatten_all()?.to_vec1()?;
    let per_image = h * w * 3;
    (0..b)
        .map(|i| {
            let bytes: Vec<u8> = values[i * per_image..(i + 1) * per_image]
                .iter()
                .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, bytes)
                .ok_or_else(|| candle_core::Error::Msg("image buffer size mismatch".into()))
        })
        .collect()
}
