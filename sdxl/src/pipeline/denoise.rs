//! The denoising loop of diffusers' SDXL pipelines: the job's sampler built
//! from the model's scheduler config, classifier-free guidance over a batch
//! of the negative and positive halves, SDXL's `time_ids`, and each random
//! draw taken from the image's own noise source.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};

use super::model::{PromptEmbeds, SdxlPipeline};
use crate::noise::{draw_batch, Draw, ImageNoise};
use crate::scheduler::{self, Sampler, SamplerKind};
use crate::ModelError;

/// One generation's numbers.
#[derive(Debug, Clone, Copy)]
pub struct DenoiseParams {
    pub width: usize,
    pub height: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub sampler: SamplerKind,
}

impl DenoiseParams {
    /// Classifier-free guidance runs only above 1, as in diffusers.
    pub fn do_cfg(&self) -> bool {
        self.guidance_scale > 1.0
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

/// The draws a job of `params` takes from each image's noise: what a noise
/// file may name (in the order they are drawn).
pub fn draws(config: &scheduler::SchedulerConfig, params: &DenoiseParams) -> Result<Vec<Draw>, ModelError> {
    let sampler = scheduler::build(params.sampler, config, params.num_inference_steps)?;
    let steps = (0..sampler.len()).filter(|&i| sampler.step_needs_noise(i)).count();
    Ok(std::iter::once(Draw::Init).chain((0..steps).map(Draw::Step)).collect())
}

impl SdxlPipeline {
    /// The denoising loop from each image's noise (`noise`: one source per
    /// image of the same prompt) to final latents `[k, c, h/f, w/f]`.
    /// `on_step` sees the latents before the first step and after each;
    /// returning `Break` stops early with `Ok(None)`.
    pub fn denoise(
        &self,
        embeds: &PromptEmbeds,
        noise: &[ImageNoise],
        params: &DenoiseParams,
        on_step: &mut dyn FnMut(&StepState) -> ControlFlow<()>,
    ) -> Result<Option<Tensor>, ModelError> {
        let k = noise.len();
        if k == 0 {
            return Err(ModelError::Input("no image to denoise".into()));
        }
        let (_, c, h, w) = self.latent_shape(params.width, params.height);
        let chw = (c, h, w);
        let mut sampler = scheduler::build(params.sampler, &self.scheduler_config, params.num_inference_steps)?;
        let do_cfg = params.do_cfg();
        let halves = if do_cfg { 2 } else { 1 };
        if embeds.prompt_embeds.dim(0)? != halves {
            return Err(ModelError::Input(format!(
                "prompt embeddings have batch {}, expected {halves} (guidance {})",
                embeds.prompt_embeds.dim(0)?,
                if do_cfg { "on" } else { "off" }
            )));
        }
        // Each conditioning row (negative, then positive) repeated for the k images.
        let per_image = |t: &Tensor| -> candle_core::Result<Tensor> {
            let rows = (0..halves)
                .map(|i| {
                    let row = t.narrow(0, i, 1)?;
                    let mut reps = vec![1; row.rank()];
                    reps[0] = k;
                    row.repeat(reps)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?.to_dtype(self.dtype)
        };
        let context = per_image(&embeds.prompt_embeds)?;
        let text_embeds = per_image(&embeds.pooled_prompt_embeds)?;
        let (hf, wf) = (params.height as f32, params.width as f32);
        // original size, crop top-left (0, 0), target size
        let time_ids = Tensor::from_vec(vec![hf, wf, 0.0, 0.0, hf, wf], (1, 6), &self.device)?
            .repeat((halves * k, 1))?
            .to_dtype(self.dtype)?;
        let init = draw_batch(noise, Draw::Init, chw)?;
        let mut latents = (init.to_device(&self.device)?.to_dtype(self.dtype)? * sampler.init_noise_sigma() as f64)?;
        let total = sampler.len();
        let first = StepState {
            step: 0,
            total_steps: total,
            timestep: sampler.timesteps()[0],
            latents: &latents,
        };
        if on_step(&first).is_break() {
            return Ok(None);
        }
        let mut drawn = 0;
        for i in 0..total {
            let t = sampler.timesteps()[i];
            let input = if do_cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = sampler.scale_model_input(&input, i)?;
            let noise_pred = self.unet.forward(&input, t, &context, &text_embeds, &time_ids)?;
            let noise_pred = if do_cfg {
                let uncond = noise_pred.narrow(0, 0, k)?;
                let text = noise_pred.narrow(0, k, k)?;
                (&uncond + ((text - &uncond)? * params.guidance_scale)?)?
            } else {
                noise_pred
            };
            latents = step(sampler.as_mut(), &noise_pred, i, &latents, noise, &mut drawn, chw)?;
            let state = StepState {
                step: i + 1,
                total_steps: total,
                timestep: t,
                latents: &latents,
            };
            if on_step(&state).is_break() {
                return Ok(None);
            }
        }
        Ok(Some(latents))
    }
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
