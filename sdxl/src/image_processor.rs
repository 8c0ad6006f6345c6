//! Between tensors and 8-bit images, as diffusers' `VaeImageProcessor`
//! does it: the pipeline's float output to RGB, rounded as `numpy_to_pil`
//! does; input images (img2img, inpainting) and masks to tensors, sized and
//! binarised as its `preprocess` does.

use candle_core::{DType, Tensor};
use image::imageops::FilterType;
use image::{GrayImage, RgbImage};

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

/// The size diffusers' `VaeImageProcessor.get_default_height_width` gives
/// an image: its own, each side rounded down to a multiple of
/// `vae_scale_factor`.
pub fn default_size(width: u32, height: u32, vae_scale_factor: usize) -> (usize, usize) {
    let f = vae_scale_factor.max(1);
    let round = |x: u32| x as usize - x as usize % f;
    (round(width), round(height))
}

/// `VaeImageProcessor.preprocess` of an RGB image: resized to
/// `width`×`height` when it has another size (Lanczos, as diffusers'
/// `resample="lanczos"`), as `[1, 3, h, w]` f32 in [-1, 1] on the CPU.
pub fn preprocess(image: &RgbImage, width: usize, height: usize) -> candle_core::Result<Tensor> {
    let resized;
    let image = if image.dimensions() == (width as u32, height as u32) {
        image
    } else {
        resized = image::imageops::resize(image, width as u32, height as u32, FilterType::Lanczos3);
        &resized
    };
    let hwc: Vec<f32> = image.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    let t = Tensor::from_vec(hwc, (height, width, 3), &candle_core::Device::Cpu)?.permute((2, 0, 1))?;
    ((t.unsqueeze(0)? * 2.0)? - 1.0)?.contiguous()
}

/// PIL's `convert("L")` of an RGB pixel: `(299 R + 587 G + 114 B) / 1000`
/// in its fixed-point form.
fn luma(p: &image::Rgb<u8>) -> u8 {
    let [r, g, b] = p.0.map(u32::from);
    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
}

/// The grey levels of a mask, as PIL converts a colour image to "L".
pub fn to_grayscale(mask: &RgbImage) -> GrayImage {
    GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
        image::Luma([luma(mask.get_pixel(x, y))])
    })
}

/// The inpainting `mask_processor`'s preprocess: grey levels, resized to
/// `width`×`height` when needed, scaled to [0, 1] and binarised at 0.5 (1 =
/// repaint), as `[1, 1, h, w]` f32 on the CPU.
pub fn preprocess_mask(mask: &GrayImage, width: usize, height: usize) -> candle_core::Result<Tensor> {
    let resized;
    let mask = if mask.dimensions() == (width as u32, height as u32) {
        mask
    } else {
        resized = image::imageops::resize(mask, width as u32, height as u32, FilterType::Lanczos3);
        &resized
    };
    let values: Vec<f32> = mask
        .as_raw()
        .iter()
        .map(|&v| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_vec(values, (1, 1, height, width), &candle_core::Device::Cpu)
}

/// `torch.nn.functional.interpolate(mask, size=(h, w))` (mode "nearest":
/// source index `floor(i · in / out)`) of a `[1, 1, H, W]` CPU mask.
pub fn mask_to_latents(mask: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (_, _, big_h, big_w) = mask.dims4()?;
    let values: Vec<f32> = mask.flatten_all()?.to_vec1()?;
    let pick = |i: usize, out: usize, inp: usize| ((i as f64 * inp as f64 / out as f64).floor() as usize).min(inp - 1);
    let out: Vec<f32> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (y, x)))
        .map(|(y, x)| values[pick(y, h, big_h) * big_w + pick(x, w, big_w)])
        .collect();
    Tensor::from_vec(out, (1, 1, h, w), &candle_core::Device::Cpu)
}

/// Decodes PNG, JPEG or WebP bytes to RGB (an alpha channel is dropped).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, image::ImageError> {
    Ok(rgb_of(image::load_from_memory(bytes)?))
}

/// Decodes a mask (PNG, JPEG or WebP) to grey levels as PIL's "L".
pub fn decode_mask(bytes: &[u8]) -> Result<GrayImage, image::ImageError> {
    Ok(mask_of(image::load_from_memory(bytes)?))
}

/// Decodes PNG, JPEG or WebP bytes of untrusted origin: refused when a side
/// is over `max_side` pixels, before the pixels are allocated (a small file
/// can declare a huge image).
pub fn decode_untrusted(bytes: &[u8], max_side: u32) -> Result<image::DynamicImage, image::ImageError> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    reader.limits(limits);
    reader.decode()
}

/// An input image as the pipeline takes it: 8-bit RGB, alpha dropped.
pub fn rgb_of(image: image::DynamicImage) -> RgbImage {
    image.to_rgb8()
}

/// A mask as the pipeline takes it: grey levels as PIL's "L" (a grey image
/// as it is, a colour one converted).
pub fn mask_of(image: image::DynamicImage) -> GrayImage {
    match image {
        image::DynamicImage::ImageLuma8(g) => g,
        other => to_grayscale(&other.to_rgb8()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_down_to_the_vae_factor() {
        assert_eq!(default_size(128, 128, 8), (128, 128));
        assert_eq!(default_size(1023, 517, 8), (1016, 512));
    }

    #[test]
    fn preprocess_maps_bytes_to_signed_unit_and_back() {
        let img = RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 16, y as u8 * 32, 255]));
        let t = preprocess(&img, 16, 8).unwrap();
        assert_eq!(t.dims(), [1, 3, 8, 16]);
        assert_eq!(from_signed_unit(&t).unwrap()[0], img);
    }

    #[test]
    fn masks_are_binarised_and_pooled_by_nearest() {
        let m = GrayImage::from_fn(16, 16, |x, _| image::Luma([if x < 8 { 0 } else { 200 }]));
        let t = preprocess_mask(&m, 16, 16).unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|&x| x == 0.0 || x == 1.0));
        let small = mask_to_latents(&t, 2, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(small, vec![0.0, 1.0, 0.0, 1.0]);
        assert_eq!(luma(&image::Rgb([255, 255, 255])), 255);
        assert_eq!(luma(&image::Rgb([255, 0, 0])), 76);
    }
}
