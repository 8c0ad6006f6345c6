//! Pictures for people: the grid of several images laid out as torchvision's
//! `make_grid`, and the blurred JPEG previews. (Tensors become images in
//! `sdxl::image_processor`.)

use image::RgbImage;

/// Lays images out as torchvision's `make_grid` does: `floor(sqrt(n))` images
/// per row, `padding` black pixels around and between them; a single image is
/// returned as it is, unpadded (torchvision returns `tensor.squeeze(0)`). All
/// images must have the size of the first.
pub fn make_grid(images: &[RgbImage], padding: u32) -> RgbImage {
    let Some(first) = images.first() else {
        return RgbImage::new(0, 0);
    };
    if images.len() == 1 {
        return first.clone();
    }
    let n = images.len() as u32;
    let per_row = ((n as f64).sqrt().floor() as u32).clamp(1, n);
    let rows = n.div_ceil(per_row);
    let (w, h) = first.dimensions();
    let (cell_w, cell_h) = (w + padding, h + padding);
    let mut grid = RgbImage::new(cell_w * per_row + padding, cell_h * rows + padding);
    for (i, img) in images.iter().enumerate() {
        let (x, y) = (i as u32 % per_row, i as u32 / per_row);
        image::imageops::replace(
            &mut grid,
            img,
            (x * cell_w + padding) as i64,
            (y * cell_h + padding) as i64,
        );
    }
    grid
}

/// The preview blur of the seed design: a Gaussian of radius
/// `int(timestep / 1000 * 10)`, so previews sharpen as denoising proceeds.
pub fn preview_blur_radius(timestep: f32) -> u32 {
    (timestep / 1000.0 * 10.0).max(0.0) as u32
}

/// Blurs with a Gaussian of standard deviation `radius` (PIL's
/// `GaussianBlur(radius)`, which also approximates it with box passes);
/// radius 0 returns the image unchanged. Box passes cost the same at any
/// radius: a 2-megapixel preview grid blurs in milliseconds.
pub fn blur(img: RgbImage, radius: u32) -> RgbImage {
    if radius == 0 {
        img
    } else {
        image::imageops::fast_blur(&img, radius as f32)
    }
}

/// The preview grid as it is published: tiles laid out, blurred by the
/// timestep's radius, JPEG-encoded.
pub fn preview_jpeg(tiles: &[RgbImage], timestep: f32) -> Result<Vec<u8>, image::ImageError> {
    encode_jpeg(&blur(make_grid(tiles, 2), preview_blur_radius(timestep)), 80)
}

/// JPEG bytes of `img` at `quality` (1–100).
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
    img.write_with_encoder(encoder)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, image::Rgb([v, v, v]))
    }

    #[test]
    fn grid_follows_make_grid_layout() {
        // 3 images: floor(sqrt(3)) = 1 per row, so a column of three
        let g = make_grid(&[solid(4, 2, 10), solid(4, 2, 20), solid(4, 2, 30)], 2);
        assert_eq!(g.dimensions(), (2 + 4 + 2, 3 * (2 + 2) + 2));
        assert_eq!(g.get_pixel(2, 2).0, [10, 10, 10]);
        assert_eq!(g.get_pixel(2, 6).0, [20, 20, 20]);
        assert_eq!(g.get_pixel(2, 10).0, [30, 30, 30]);
        assert_eq!(g.get_pixel(0, 0).0, [0, 0, 0], "padding is black");
        // 5 images: 2 per row, 3 rows
        let g = make_grid(&vec![solid(4, 4, 1); 5], 2);
        assert_eq!(g.dimensions(), (2 * 6 + 2, 3 * 6 + 2));
        assert_eq!(g.get_pixel(8, 14).0, [0, 0, 0], "the sixth cell stays empty");
        // one image: returned as it is, as torchvision does
        let one = solid(8, 8, 5);
        assert_eq!(make_grid(std::slice::from_ref(&one), 2), one);
    }

    #[test]
    fn blur_radius_falls_with_the_timestep() {
        assert_eq!(preview_blur_radius(999.0), 9);
        assert_eq!(preview_blur_radius(500.0), 5);
        assert_eq!(preview_blur_radius(99.0), 0);
        let mut img = solid(16, 16, 0);
        img.put_pixel(8, 8, image::Rgb([255, 255, 255]));
        assert_eq!(blur(img.clone(), 0), img);
        let blurred = blur(img, 2);
        assert!(blurred.get_pixel(8, 8).0[0] < 255 && blurred.get_pixel(9, 8).0[0] > 0);
    }

    #[test]
    fn jpeg_starts_with_the_jpeg_magic() {
        let bytes = encode_jpeg(&solid(8, 8, 128), 80).unwrap();
        assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF]);
    }
}
