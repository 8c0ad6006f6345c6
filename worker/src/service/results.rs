//! The `ResultStore` side of a job: encodes the grid and the images in the
//! requested format and stores them under `jobs/{id}/`, then the manifest
//! `jobs/{id}/result.json`. The manifest is written last, so its presence
//! means everything is stored: a redelivered job whose manifest exists is
//! finished from it, without generating or storing anything again.

use std::io::Cursor;

use common::names::Names;
use common::result_store::ResultStore;
use common::rules::OutputFormat;
use common::status::{ImageRef, JobResult};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ImageEncoder, RgbImage};
use uuid::Uuid;

use super::error::JobError;
use super::retry::{retry, Backoff};
use crate::engine::EngineOutput;

/// One encoded object, ready to upload.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    pub key: String,
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct EncodedResult {
    pub format: OutputFormat,
    pub grid: EncodedImage,
    pub images: Vec<EncodedImage>,
}

fn encode_one(image: &RgbImage, format: OutputFormat, jpeg_quality: u8) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Cursor::new(Vec::new());
    let (w, h) = image.dimensions();
    let color = image::ExtendedColorType::Rgb8;
    match format {
        OutputFormat::Png => PngEncoder::new(&mut out).write_image(image.as_raw(), w, h, color)?,
        OutputFormat::Jpeg => {
            JpegEncoder::new_with_quality(&mut out, jpeg_quality).write_image(image.as_raw(), w, h, color)?
        }
        OutputFormat::Webp => WebPEncoder::new_lossless(&mut out).write_image(image.as_raw(), w, h, color)?,
    }
    Ok(out.into_inner())
}

/// Encodes the grid and every image (CPU work: call it off the async threads).
pub fn encode(
    id: Uuid,
    output: &EngineOutput,
    format: OutputFormat,
    jpeg_quality: u8,
) -> Result<EncodedResult, JobError> {
    let failed = |e: image::ImageError| JobError::Poison(format!("encoding the result as {format}: {e}"));
    let first_seed = output.images.first().map(|i| i.seed).unwrap_or_default();
    let grid = EncodedImage {
        key: Names::grid_object(id, format),
        bytes: encode_one(&output.grid, format, jpeg_quality).map_err(failed)?,
        width: output.grid.width(),
        height: output.grid.height(),
        seed: first_seed,
    };
    let images = output
        .images
        .iter()
        .enumerate()
        .map(|(index, generated)| {
            Ok(EncodedImage {
                key: Names::image_object(id, index, format),
                bytes: encode_one(&generated.image, format, jpeg_quality).map_err(failed)?,
                width: generated.image.width(),
                height: generated.image.height(),
                seed: generated.seed,
            })
        })
        .collect::<Result<Vec<_>, JobError>>()?;
    Ok(EncodedResult { format, grid, images })
}

async fn image_ref(store: &ResultStore, e: &EncodedImage) -> Result<ImageRef, JobError> {
    Ok(ImageRef {
        bucket: store.bucket_name().to_string(),
        key: e.key.clone(),
        url: store.presign_get(&e.key).await?,
        width: e.width,
        height: e.height,
        seed: e.seed,
    })
}

/// Uploads the images, then the grid (each retried while S3 is unreachable).
/// Keys are fixed per job, so a retry or a redelivery overwrites, never adds.
pub async fn upload(
    store: &ResultStore,
    encoded: &EncodedResult,
    backoff: Backoff,
) -> Result<(Vec<ImageRef>, ImageRef), JobError> {
    let content_type = encoded.format.content_type();
    let mut images = Vec::with_capacity(encoded.images.len());
    for image in encoded.images.iter().chain(std::iter::once(&encoded.grid)) {
        retry(backoff, "uploading a result", || {
            store.put(&image.key, image.bytes.clone(), content_type)
        })
        .await?;
        images.push(image_ref(store, image).await?);
    }
    let grid = images.pop().ok_or_else(|| JobError::Poison("no grid".into()))?;
    Ok((images, grid))
}

/// Writes the manifest: from now on the job's result is stored.
pub async fn write_manifest(
    store: &ResultStore,
    id: Uuid,
    result: &JobResult,
    backoff: Backoff,
) -> Result<(), JobError> {
    let json = serde_json::to_vec(result).map_err(|e| JobError::Poison(format!("encoding the manifest: {e}")))?;
    let key = Names::manifest_object(id);
    retry(backoff, "writing the result manifest", || {
        store.put(&key, json.clone(), "application/json")
    })
    .await?;
    Ok(())
}

/// The result a previous attempt stored, with fresh presigned URLs.
pub async fn load_manifest(store: &ResultStore, id: Uuid, backoff: Backoff) -> Result<Option<JobResult>, JobError> {
    let key = Names::manifest_object(id);
    let Some(bytes) = retry(backoff, "reading the result manifest", || store.get(&key)).await? else {
        return Ok(None);
    };
    let mut result: JobResult = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable result manifest");
            return Ok(None);
        }
    };
    for image in std::iter::once(&mut result.grid).chain(result.images.iter_mut()) {
        image.url = store.presign_get(&image.key).await?;
    }
    Ok(Some(result))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{BatchShape, GeneratedImage, StageTimings};

    #[test]
    fn every_format_decodes_back_to_the_same_size_and_lossless_ones_to_the_same_pixels() {
        let image = RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let output = EngineOutput {
            grid: image.clone(),
            images: vec![GeneratedImage {
                seed: 9,
                image: image.clone(),
            }],
            timings: StageTimings::default(),
            batch: BatchShape { jobs: 1, images: 1 },
        };
        for format in OutputFormat::ALL {
            let encoded = encode(Uuid::nil(), &output, format, 90).unwrap();
            assert_eq!(encoded.grid.key, format!("jobs/{}/grid.{format}", Uuid::nil()));
            assert_eq!(encoded.images[0].key, format!("jobs/{}/0.{format}", Uuid::nil()));
            assert_eq!(encoded.images[0].seed, 9);
            let decoded = image::load_from_memory(&encoded.grid.bytes).unwrap().to_rgb8();
            assert_eq!(decoded.dimensions(), (16, 8));
            if format != OutputFormat::Jpeg {
                assert_eq!(decoded, image, "{format} is lossless");
            }
        }
    }
}
