//! The denoising loop of diffusers' SDXL pipelines: the job's sampler built
//! from the model's scheduler config, classifier-free guidance over a batch
//! of the negative and positive halves, SDXL's `time_ids`, each random draw
//! taken from the image's own noise source, and the three ways to start —
//! from noise (`StableDiffusionXLPipeline`), from an image
//! (`StableDiffusionXLImg2ImgPipeline`: only the last `int(steps ·
//! strength)` steps run) and from an image with a mask
//! (`StableDiffusionXLInpaintPipeline` on a 4-channel UNet: the region kept
//! is put back after every step, at the next step's noise level).

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};

use super::model::{PromptEmbeds, SdxlPipeline};
use crate::noise::{draw_batch, Draw, ImageNoise};
use crate::scheduler::{self, Sampler, SamplerKind, SchedulerConfig};
use crate::ModelError;

/// One generation's numbers.
#[derive(Debug, Clone, Copy)]
pub struct DenoiseParams {
    pub width: usize,
    pub height: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub sampler: SamplerKind,
    /// At most this many images per UNet call (0: all at once). Smaller
    /// calls bound the activation memory; one image per call also makes an
    /// image's result independent of what else is in the batch.
    pub unet_images: usize,
}

/// One image of a batch: its prompt's conditioning, its guidance and its
/// random draws. Images of several jobs (other prompts, other guidance)
/// share one denoising loop when their size, steps and sampler agree.
#[derive(Debug, Clone, Copy)]
pub struct ImageJob<'a> {
    pub embeds: &'a PromptEmbeds,
    pub guidance_scale: f64,
    pub noise: &'a ImageNoise,
}

impl DenoiseParams {
    /// Classifier-free guidance runs only above 1, as in diffusers.
    pub fn do_cfg(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// Where denoising starts.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// Text to image: each image's `init` draw times the sampler's initial sigma.
    Noise,
    /// img2img: the encoded image (UNet-space latents `[k or 1, c, h, w]`),
    /// noised with each image's `init` draw to the first step that runs.
    Image { latents: &'a Tensor, strength: f64 },
    /// Inpainting: as `Image`; `mask` (`[1, 1, h, w]` at latent size, 1 =
    /// repaint) keeps the rest of the image, re-noised to each step's level.
    Inpaint {
        latents: &'a Tensor,
        mask: &'a Tensor,
        strength: f64,
    },
}

impl Start<'_> {
    fn strength(&self) -> Option<f64> {
        match self {
            Start::Noise => None,
            Start::Image { strength, .. } | Start::Inpaint { strength, .. } => Some(*strength),
        }
    }
}

/// The state after a denoising step, handed to the step callback.
#[derive(Debug)]
pub struct StepState<'a> {
    /// Steps done so far (1-based after a step; 0 before the first).
    pub step: usize,
    pub total_steps: usize,
    /// The scheduler timestep of the step just taken (before the first: the first one).
    pub timestep: f32,
    pub latents: &'a Tensor,
}

/// diffusers' `get_timesteps` for img2img and inpainting: the index of the
/// first step that runs, `steps - int(steps · strength)` (times the
/// sampler's order), or an error when that leaves no step.
pub fn first_step(steps: usize, strength: f64, order: usize) -> Result<usize, ModelError> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(ModelError::Input(format!("strength must be in (0, 1], got {strength}")));
    }
    // Python's int() of the product: truncation, as `as` does for positive values
    let init = ((steps as f64 * strength) as usize).min(steps);
    if init == 0 {
        return Err(ModelError::Input(format!(
            "strength {strength} of {steps} steps runs int({steps} × {strength}) = 0 steps: raise the strength or the steps"
        )));
    }
    Ok((steps - init) * order)
}

/// The draws a job takes from each image's noise: what a noise file may
/// name. `strength`: an img2img or inpainting job (`inpaint`: with a mask).
pub fn draws(
    config: &SchedulerConfig,
    params: &DenoiseParams,
    strength: Option<f64>,
    inpaint: bool,
) -> Result<Vec<Draw>, ModelError> {
    let sampler = scheduler::build(params.sampler, config, params.num_inference_steps)?;
    let begin = match strength {
        Some(s) => first_step(params.num_inference_steps, s, sampler.order())?,
        None => 0,
    };
    let steps = (begin..sampler.len()).filter(|&i| sampler.step_needs_noise(i)).count();
    let mut out = vec![Draw::Init];
    if strength.is_some() {
        out.push(Draw::VaeSample);
    }
    if inpaint {
        // diffusers also encodes the masked image, which a 4-channel UNet never uses
        out.push(Draw::MaskedVaeSample);
    }
    out.extend((0..steps).map(Draw::Step));
    Ok(out)
}

impl SdxlPipeline {
    /// How many steps a job of `params` runs (`strength`: img2img or
    /// inpainting): what its progress counts to, on every rank.
    pub fn steps_to_run(&self, params: &DenoiseParams, strength: Option<f64>) -> Result<usize, ModelError> {
        let sampler = scheduler::build(params.sampler, &self.scheduler_config, params.num_inference_steps)?;
        let begin = match strength {
            Some(s) => first_step(params.num_inference_steps, s, sampler.order())?,
            None => 0,
        };
        Ok(sampler.len() - begin)
    }

    /// The denoising loop from `start` and each image's noise (`noise`: one
    /// source per image of the same prompt) to final latents `[k, c, h/f,
    /// w/f]`. `on_step` sees the latents before the first step and after
    /// each; returning `Break` stops early with `Ok(None)`.
    pub fn denoise(
        &self,
        embeds: &PromptEmbeds,
        noise: &[ImageNoise],
        params: &DenoiseParams,
        start: Start,
        on_step: &mut dyn FnMut(&StepState) -> ControlFlow<()>,
    ) -> Result<Option<Tensor>, ModelError> {
        let images: Vec<ImageJob> = noise
            .iter()
            .map(|noise| ImageJob {
                embeds,
                guidance_scale: params.guidance_scale,
                noise,
            })
            .collect();
        self.denoise_images(&images, params, start, on_step)
    }

    /// [`SdxlPipeline::denoise`] for images with their own conditioning and
    /// guidance (the jobs of a batch). Guidance must be on for all of them
    /// or for none (`params.guidance_scale` says which).
    pub fn denoise_images(
        &self,
        images: &[ImageJob],
        params: &DenoiseParams,
        start: Start,
        on_step: &mut dyn FnMut(&StepState) -> ControlFlow<()>,
    ) -> Result<Option<Tensor>, ModelError> {
        let k = images.len();
        if k == 0 {
            return Err(ModelError::Input("no image to denoise".into()));
        }
        let noise: Vec<ImageNoise> = images.iter().map(|i| i.noise.clone()).collect();
        let noise = noise.as_slice();
        let (_, c, h, w) = self.latent_shape(params.width, params.height);
        let chw = (c, h, w);
        let mut sampler = scheduler::build(params.sampler, &self.scheduler_config, params.num_inference_steps)?;
        let begin = match start.strength() {
            Some(s) => first_step(params.num_inference_steps, s, sampler.order())?,
            None => 0,
        };
        let do_cfg = params.do_cfg();
        let halves = if do_cfg { 2 } else { 1 };
        for image in images {
            if (image.guidance_scale > 1.0) != do_cfg || image.embeds.prompt_embeds.dim(0)? != halves {
                return Err(ModelError::Input(format!(
                    "an image has guidance {} and prompt embeddings of batch {}, but the batch's guidance is {}",
                    image.guidance_scale,
                    image.embeds.prompt_embeds.dim(0)?,
                    if do_cfg { "on (batch 2)" } else { "off (batch 1)" }
                )));
            }
        }
        let unet_images = if params.unet_images == 0 {
            k
        } else {
            params.unet_images.min(k)
        };
        let chunks: Vec<(usize, usize)> = (0..k)
            .step_by(unet_images)
            .map(|a| (a, (a + unet_images).min(k)))
            .collect();
        let unet = &self.active().unet;
        // each chunk's conditioning, made here once for every step
        let conditioning = chunks
            .iter()
            .map(|&(a, b)| {
                let (context, text_embeds, time_ids) = self.conditioning(&images[a..b], params, halves)?;
                Ok(unet.conditioning(&context, &text_embeds, &time_ids)?)
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let guidance = self.guidance(images)?;
        let init = draw_batch(noise, Draw::Init, chw)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        // The encoded image for every image of the job, in the run dtype.
        let image_latents = |latents: &Tensor| -> Result<Tensor, ModelError> {
            let latents = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
            let n = latents.dim(0)?;
            let latents = if n == k {
                latents
            } else {
                latents.repeat((k / n.max(1), 1, 1, 1))?
            };
            if latents.dims() != [k, c, h, w] {
                return Err(ModelError::Input(format!(
                    "the encoded image has shape {:?}, expected [{k}, {c}, {h}, {w}] for {}x{}",
                    latents.dims(),
                    params.width,
                    params.height
                )));
            }
            Ok(latents)
        };
        // What is kept of the image while inpainting, and where.
        let mut keep: Option<(Tensor, Tensor)> = None;
        if start.strength().is_some() {
            // diffusers sets it only for img2img and inpainting; text to image
            // leaves the sampler to find its first step
            sampler.set_begin_index(begin);
        }
        let mut latents = match start {
            Start::Noise => (&init * sampler.init_noise_sigma() as f64)?,
            Start::Image { latents, .. } => sampler.add_noise(&image_latents(latents)?, &init, begin)?,
            Start::Inpaint {
                latents,
                mask,
                strength,
            } => {
                let image = image_latents(latents)?;
                let mask = mask.to_device(&self.device)?.to_dtype(self.dtype)?;
                let start = if strength >= 1.0 {
                    // diffusers: pure noise when the strength is the maximum
                    (&init * sampler.init_noise_sigma() as f64)?
                } else {
                    sampler.add_noise(&image, &init, begin)?
                };
                keep = Some((image, mask));
                start
            }
        };
        let total = sampler.len();
        let first = StepState {
            step: 0,
            total_steps: total - begin,
            timestep: sampler.timesteps()[begin],
            latents: &latents,
        };
        if on_step(&first).is_break() {
            return Ok(None);
        }
        let mut drawn = 0;
        // The end of the step before the one just queued (see `Fence`).
        let mut in_flight: Option<Fence> = None;
        for i in begin..total {
            let t = sampler.timesteps()[i];
            // The UNet in chunks of images; guidance per image.
            let mut preds = Vec::with_capacity(chunks.len());
            for (&(a, b), conditioning) in chunks.iter().zip(&conditioning) {
                let part = latents.narrow(0, a, b - a)?;
                let input = if do_cfg { Tensor::cat(&[&part, &part], 0)? } else { part };
                let input = sampler.scale_model_input(&input, i)?;
                let pred = unet.forward_conditioned(&input, t, conditioning)?;
                preds.push(if do_cfg {
                    let n = b - a;
                    let uncond = pred.narrow(0, 0, n)?;
                    let text = pred.narrow(0, n, n)?;
                    let scaled = match &guidance {
                        Guidance::One(g) => ((text - &uncond)? * *g)?,
                        Guidance::Each(g) => (text - &uncond)?.broadcast_mul(&g.narrow(0, a, n)?)?,
                    };
                    (&uncond + scaled)?
                } else {
                    pred
                });
            }
            let noise_pred = if preds.len() == 1 {
                preds.pop().expect("one chunk")
            } else {
                Tensor::cat(&preds, 0)?
            };
            latents = step(sampler.as_mut(), &noise_pred, i, &latents, noise, &mut drawn, chw)?;
            if let Some((image, mask)) = &keep {
                // the kept region at the noise level of the next step (none after the last)
                let kept = if i + 1 < total {
                    sampler.add_noise(image, &init, i + 1)?
                } else {
                    image.clone()
                };
                latents = (kept.broadcast_mul(&(1.0 - mask)?)? + latents.broadcast_mul(mask)?)?;
            }
            // Nothing in a step waits for the device, so the host could queue
            // every step long before the device ran them, and the callback's
            // progress and cancels would mean nothing: the host stays one step
            // ahead, no more. The step before this one has finished on the
            // device when the callback hears of this one, which the device
            // runs meanwhile.
            if let Some(previous) = in_flight.replace(Fence::mark(&self.device)?) {
                previous.wait()?;
            }
            let state = StepState {
                step: i + 1 - begin,
                total_steps: total - begin,
                timestep: t,
                latents: &latents,
            };
            if on_step(&state).is_break() {
                return Ok(None);
            }
        }
        Ok(Some(latents))
    }

    /// The guidance of each image: one scale for all (a scalar product, as
    /// diffusers), or a `[k, 1, 1, 1]` tensor when the jobs of a batch differ.
    fn guidance(&self, images: &[ImageJob]) -> Result<Guidance, ModelError> {
        let first = images[0].guidance_scale;
        if images.iter().all(|i| i.guidance_scale == first) {
            return Ok(Guidance::One(first));
        }
        let g: Vec<f32> = images.iter().map(|i| i.guidance_scale as f32).collect();
        Ok(Guidance::Each(
            Tensor::from_vec(g, (images.len(), 1, 1, 1), &self.device)?.to_dtype(self.dtype)?,
        ))
    }

    /// The UNet's conditioning for a chunk of images: each image's
    /// negative row, then each image's positive row (guidance on), and
    /// SDXL's `time_ids` (original size, crop top-left (0, 0), target size).
    fn conditioning(
        &self,
        images: &[ImageJob],
        params: &DenoiseParams,
        halves: usize,
    ) -> Result<(Tensor, Tensor, Tensor), ModelError> {
        let k = images.len();
        let rows = |pick: fn(&PromptEmbeds) -> &Tensor| -> candle_core::Result<Tensor> {
            let rows = (0..halves)
                .flat_map(|half| images.iter().map(move |i| pick(i.embeds).narrow(0, half, 1)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?.to_dtype(self.dtype)
        };
        let (hf, wf) = (params.height as f32, params.width as f32);
        let time_ids = Tensor::from_vec(vec![hf, wf, 0.0, 0.0, hf, wf], (1, 6), &self.device)?
            .repeat((halves * k, 1))?
            .to_dtype(self.dtype)?;
        Ok((
            rows(|e| &e.prompt_embeds)?,
            rows(|e| &e.pooled_prompt_embeds)?,
            time_ids,
        ))
    }
}

/// The work queued on a device so far, to wait for later: a CUDA event on
/// the device's stream; nothing elsewhere, where work is done as it is
/// issued.
struct Fence {
    #[cfg(feature = "cuda")]
    event: Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
}

impl Fence {
    fn mark(device: &candle_core::Device) -> candle_core::Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let event = match device {
                candle_core::Device::Cuda(dev) => {
                    Some(dev.cuda_stream().record_event(None).map_err(candle_core::Error::wrap)?)
                }
                _ => None,
            };
            Ok(Self { event })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Ok(Self {})
        }
    }

    /// Blocks until the device has done the work queued before [`Self::mark`].
    fn wait(self) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(event) = self.event {
            event.synchronize().map_err(candle_core::Error::wrap)?;
        }
        Ok(())
    }
}

/// The guidance of the images of a loop.
enum Guidance {
    One(f64),
    Each(Tensor),
}

/// One sampler step, with the next of each image's step draws when the
/// sampler takes fresh noise at step `i`.
fn step(
    sampler: &mut dyn Sampler,
    noise_pred: &Tensor,
    i: usize,
    latents: &Tensor,
    noise: &[ImageNoise],
    drawn: &mut usize,
    chw: (usize, usize, usize),
) -> Result<Tensor, ModelError> {
    let fresh = if sampler.step_needs_noise(i) {
        let n = draw_batch(noise, Draw::Step(*drawn), chw)?.to_device(latents.device())?;
        *drawn += 1;
        Some(n.to_dtype(DType::F32)?)
    } else {
        None
    };
    Ok(sampler.step(noise_pred, i, latents, fresh.as_ref())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_step_follows_diffusers_get_timesteps() {
        assert_eq!(first_step(4, 0.6, 1).unwrap(), 2); // int(2.4) = 2 steps run
        assert_eq!(first_step(4, 0.75, 1).unwrap(), 1);
        assert_eq!(first_step(20, 0.6, 1).unwrap(), 8);
        assert_eq!(first_step(4, 1.0, 1).unwrap(), 0);
        let e = first_step(4, 0.2, 1).unwrap_err().to_string();
        assert!(e.contains("0 steps"), "{e}");
        assert!(first_step(4, 0.0, 1).is_err() && first_step(4, 1.5, 1).is_err());
    }
}
