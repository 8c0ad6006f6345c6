//! An [`Engine`] over one [`SdxlPipeline`] on one device: one rank, images
//! made one after the other. It runs exactly the steps of `worker generate`
//! (noise from `initial_noise(seed + i)`, `encode_prompt`, `denoise`,
//! `decode`, `from_signed_unit`), so a job's image equals, bit for bit, what
//! `worker generate` gives for the same seed and device.

use std::io::Cursor;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;

use crate::engine::{Engine, EngineError, EngineEvent, EngineJob, EngineOutput, GeneratedImage, StageTimings};
use crate::imaging;
use crate::sdxl::noise::initial_noise;
use crate::sdxl::pipeline::{DenoiseParams, SdxlPipeline};
use crate::sdxl::ModelError;

/// JPEG quality of previews.
const PREVIEW_QUALITY: u8 = 75;

pub struct PipelineEngine {
    // The pipeline is used by one job at a time; the lock makes that explicit.
    pipeline: Mutex<SdxlPipeline>,
}

impl PipelineEngine {
    pub fn new(pipeline: SdxlPipeline) -> Self {
        PipelineEngine {
            pipeline: Mutex::new(pipeline),
        }
    }
}

fn failed(e: impl std::fmt::Display) -> EngineError {
    EngineError::Failed(e.to_string())
}

fn model_error(e: ModelError) -> EngineError {
    match e {
        ModelError::Input(m) => EngineError::Invalid(m),
        other => failed(other),
    }
}

fn elapsed(device: &Device, start: Instant) -> Result<Duration, EngineError> {
    device.synchronize().map_err(failed)?;
    Ok(start.elapsed())
}

/// torchvision's `make_grid` (nrow 8, padding 2, black): a single image is
/// returned as it is.
pub fn make_grid(images: &[RgbImage]) -> Option<RgbImage> {
    let first = images.first()?;
    if images.len() == 1 {
        return Some(first.clone());
    }
    let (w, h) = first.dimensions();
    let pad = 2u32;
    let cols = images.len().min(8) as u32;
    let rows = (images.len() as u32).div_ceil(cols);
    let (cell_w, cell_h) = (w + pad, h + pad);
    let mut grid = RgbImage::new(cols * cell_w + pad, rows * cell_h + pad);
    for (i, image) in images.iter().enumerate() {
        let (x, y) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(
            &mut grid,
            image,
            i64::from(x * cell_w + pad),
            i64::from(y * cell_h + pad),
        );
    }
    Some(grid)
}

fn jpeg(image: &RgbImage) -> Option<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    JpegEncoder::new_with_quality(&mut out, PREVIEW_QUALITY)
        .encode_image(image)
        .ok()?;
    Some(out.into_inner())
}

impl Engine for PipelineEngine {
    fn world_size(&self) -> usize {
        1
    }

    fn generate(
        &self,
        job: &EngineJob,
        events: &mut dyn FnMut(EngineEvent),
        cancel: &Arc<AtomicBool>,
    ) -> Result<EngineOutput, EngineError> {
        let pipeline = self
            .pipeline
            .lock()
            .map_err(|_| failed("the pipeline lock is poisoned"))?;
        let device = pipeline.device().clone();
        let params = DenoiseParams {
            width: job.width,
            height: job.height,
            num_inference_steps: job.num_inference_steps,
            guidance_scale: job.guidance_scale,
        };
        let (_, c, h, w) = pipeline.latent_shape(job.width, job.height);
        let count = job.num_images.unwrap_or(1).max(1);
        let mut timings = StageTimings::default();

        let start = Instant::now();
        let embeds = pipeline
            .encode_prompt(&job.prompt, job.negative_prompt.as_deref(), params.do_cfg())
            .map_err(model_error)?;
        timings.text_encode = elapsed(&device, start)?;

        let mut latents = Vec::with_capacity(count);
        for i in 0..count {
            let seed = job.seed.wrapping_add(i as u64);
            let noise = initial_noise(seed, c, h, w, &Device::Cpu).map_err(failed)?;
            let start = Instant::now();
            let mut preview_error = None;
            let done = pipeline
                .denoise(&embeds, &noise, &params, &mut |state| {
                    if cancel.load(Ordering::Relaxed) {
                        return ControlFlow::Break(());
                    }
                    // Steps count across the images of the job.
                    let step = i * state.total_steps + state.step;
                    let total_steps = count * state.total_steps;
                    if state.step > 0 {
                        events(EngineEvent::Progress { step, total_steps });
                    }
                    if job.preview_every > 0 && state.step % job.preview_every == 0 && state.step < state.total_steps {
                        match preview(&pipeline, state.latents) {
                            Ok(Some(jpeg)) => events(EngineEvent::Preview {
                                step,
                                total_steps,
                                jpeg,
                            }),
                            Ok(None) => {}
                            Err(e) => preview_error = Some(e),
                        }
                    }
                    ControlFlow::Continue(())
                })
                .map_err(model_error)?;
            if let Some(e) = preview_error {
                tracing::warn!(error = %e, "a preview failed");
            }
            timings.denoise += elapsed(&device, start)?;
            match done {
                Some(l) => latents.push((seed, l)),
                None => return Err(EngineError::Cancelled),
            }
        }

        let start = Instant::now();
        let mut images = Vec::with_capacity(count);
        for (seed, l) in latents {
            let decoded = pipeline.decode(&l).map_err(model_error)?;
            let image = imaging::from_signed_unit(&decoded)
                .map_err(failed)?
                .into_iter()
                .next()
                .ok_or_else(|| failed("the VAE returned no image"))?;
            images.push(GeneratedImage { seed, image });
        }
        timings.decode = elapsed(&device, start)?;
        let pictures: Vec<RgbImage> = images.iter().map(|g| g.image.clone()).collect();
        let grid = make_grid(&pictures).ok_or_else(|| failed("no image"))?;
        Ok(EngineOutput { grid, images, timings })
    }
}

/// A JPEG of the latents through the preview decoder (TAESD), or through the
/// full VAE when none was loaded.
fn preview(pipeline: &SdxlPipeline, latents: &Tensor) -> Result<Option<Vec<u8>>, EngineError> {
    let decoded = match pipeline.preview(latents).map_err(model_error)? {
        Some(d) => d,
        None => pipeline.decode(latents).map_err(model_error)?,
    };
    let image = imaging::from_signed_unit(&decoded).map_err(failed)?.into_iter().next();
    Ok(image.as_ref().and_then(jpeg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_of_one_is_the_image_and_grid_of_three_is_padded() {
        let a = RgbImage::from_pixel(4, 2, image::Rgb([9, 9, 9]));
        assert_eq!(make_grid(std::slice::from_ref(&a)).unwrap(), a);
        let grid = make_grid(&[a.clone(), a.clone(), a]).unwrap();
        // 3 columns of (4 + 2) + 2, 1 row of (2 + 2) + 2
        assert_eq!(grid.dimensions(), (20, 6));
        assert_eq!(grid.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(grid.get_pixel(2, 2).0, [9, 9, 9]);
        assert_eq!(grid.get_pixel(6, 2).0, [0, 0, 0], "padding between images");
        assert_eq!(grid.get_pixel(8, 2).0, [9, 9, 9]);
    }
}
