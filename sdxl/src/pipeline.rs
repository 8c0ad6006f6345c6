//! `StableDiffusionXLPipeline`: text encoding with both CLIP encoders,
//! classifier-free-guided Euler denoising with the `text_time` UNet, VAE
//! decode, and TAESD previews, loaded from a diffusers folder.
//!
//! Pure model code: it takes strings, noise and numbers and returns tensors;
//! what happens between steps (progress, previews, cancellation) is the
//! caller's, through a callback.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::accel::Accel;
use super::clip::ClipTextModel;
use super::config::{read_json, ClipTextConfig, ModelIndex, SchedulerConfig, TinyVaeConfig, UNetConfig, VaeConfig};
use super::scheduler::EulerDiscreteScheduler;
use super::source::{HubOptions, ModelSource};
use super::taesd::TinyDecoder;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKLDecoder;
use super::{ModelError, WeightsContext};

/// Where to load a pipeline from and how to run it.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A diffusers SDXL folder or a hub repo id.
    pub model: String,
    /// Another VAE (a folder with `config.json` and weights), e.g. an fp16-safe one.
    pub vae: Option<String>,
    /// A TAESD-XL folder or repo id for previews; `None` loads no preview decoder.
    pub taesd: Option<String>,
    /// Weight file variant, e.g. `fp16` for `*.fp16.safetensors`.
    pub variant: Option<String>,
    pub device: Device,
    pub dtype: DType,
    /// The CUDA fast paths to take (process-wide: installed at load).
    pub accel: Accel,
    /// How to reach the Hugging Face hub for repo ids.
    pub hub: HubOptions,
}

impl LoadOptions {
    /// `model` on `device` in `dtype`, with every fast path and default hub access.
    pub fn new(model: impl Into<String>, device: Device, dtype: DType) -> Self {
        LoadOptions {
            model: model.into(),
            vae: None,
            taesd: None,
            variant: None,
            device,
            dtype,
            accel: Accel::ALL,
            hub: HubOptions::default(),
        }
    }
}

/// The conditioning of one prompt for the UNet, unconditional half first
/// when guidance is on.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[2 or 1, 77, d1 + d2]`.
    pub prompt_embeds: Tensor,
    /// `[2 or 1, projection_dim]`.
    pub pooled_prompt_embeds: Tensor,
}

/// One generation's numbers.
#[derive(Debug, Clone, Copy)]
pub struct DenoiseParams {
    pub width: usize,
    pub height: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
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

/// A loaded SDXL pipeline on one device.
#[derive(Debug)]
pub struct SdxlPipeline {
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    text_encoder: ClipTextModel,
    text_encoder_2: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKLDecoder,
    taesd: Option<TinyDecoder>,
    scheduler_config: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
    latent_channels: usize,
    /// Pixels per latent pixel (2^(VAE blocks − 1)).
    vae_scale_factor: usize,
    device: Device,
    dtype: DType,
    vae_dtype: DType,
}

/// Memory-maps safetensors files, converting to `dtype` on `device` as tensors are read.
fn var_builder(
    files: &[std::path::PathBuf],
    dtype: DType,
    device: &Device,
    component: &str,
) -> Result<VarBuilder<'static>, ModelError> {
    // SAFETY: the files are mapped read-only and not modified while the
    // pipeline exists; this is how candle loads every checkpoint.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.component(component)
}

impl SdxlPipeline {
    /// Loads every component; errors name the missing file, key or config value.
    pub fn load(opts: &LoadOptions) -> Result<Self, ModelError> {
        opts.accel.install();
        let source = ModelSource::resolve(&opts.model, &opts.hub)?;
        let variant = opts.variant.as_deref();
        let index: ModelIndex = read_json(&source.file("model_index.json")?)?;
        let scheduler_config: SchedulerConfig = read_json(&source.file("scheduler/scheduler_config.json")?)?;
        // Fail early on a scheduler config this port cannot run.
        EulerDiscreteScheduler::new(&scheduler_config, 1)?;

        let tokenizer = ClipTokenizer::load(&source, "tokenizer")?;
        let tokenizer_2 = ClipTokenizer::load(&source, "tokenizer_2")?;

        let te_config: ClipTextConfig = read_json(&source.file("text_encoder/config.json")?)?;
        let te_files = source.safetensors("text_encoder", "model", variant)?;
        let text_encoder = ClipTextModel::new(
            &te_config,
            false,
            var_builder(&te_files, opts.dtype, &opts.device, "text_encoder")?,
        )
        .component("text_encoder")?;
        let te2_config: ClipTextConfig = read_json(&source.file("text_encoder_2/config.json")?)?;
        let te2_files = source.safetensors("text_encoder_2", "model", variant)?;
        let text_encoder_2 = ClipTextModel::new(
            &te2_config,
            true,
            var_builder(&te2_files, opts.dtype, &opts.device, "text_encoder_2")?,
        )
        .component("text_encoder_2")?;

        let unet_config: UNetConfig = read_json(&source.file("unet/config.json")?)?;
        check_added_embedding(&unet_config, &te2_config)?;
        let unet_files = source.safetensors("unet", "diffusion_pytorch_model", variant)?;
        let unet = UNet2DConditionModel::new(
            &unet_config,
            var_builder(&unet_files, opts.dtype, &opts.device, "unet")?,
        )?;

        let (vae_config, vae_files) = match &opts.vae {
            Some(name) => {
                let vae_source = ModelSource::resolve(name, &opts.hub)?;
                let config: VaeConfig = read_json(&vae_source.file("config.json")?)?;
                (config, vae_source.safetensors("", "diffusion_pytorch_model", None)?)
            }
            None => (
                read_json(&source.file("vae/config.json")?)?,
                source.safetensors("vae", "diffusion_pytorch_model", variant)?,
            ),
        };
        // The SDXL VAE overflows in f16 (black images): diffusers decodes in f32
        // when the VAE's own config says so.
        let vae_dtype = if opts.dtype == DType::F16 && vae_config.force_upcast {
            DType::F32
        } else {
            opts.dtype
        };
        let vae = AutoencoderKLDecoder::new(&vae_config, var_builder(&vae_files, vae_dtype, &opts.device, "vae")?)?;

        let taesd = match &opts.taesd {
            Some(name) => {
                let taesd_source = ModelSource::resolve(name, &opts.hub)?;
                let config: TinyVaeConfig = read_json(&taesd_source.file("config.json")?)?;
                let files = taesd_source.safetensors("", "diffusion_pytorch_model", None)?;
                Some(TinyDecoder::new(
                    &config,
                    var_builder(&files, opts.dtype, &opts.device, "taesd")?,
                )?)
            }
            None => None,
        };

        Ok(Self {
            tokenizer,
            tokenizer_2,
            text_encoder,
            text_encoder_2,
            unet,
            latent_channels: unet_config.in_channels,
            vae_scale_factor: 1 << vae_config.block_out_channels.len().saturating_sub(1),
            vae,
            taesd,
            scheduler_config,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            device: opts.device.clone(),
            dtype: opts.dtype,
            vae_dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn has_previews(&self) -> bool {
        self.taesd.is_some()
    }

    /// The latent shape `[1, c, h/f, w/f]` for an image of `width`×`height`.
    pub fn latent_shape(&self, width: usize, height: usize) -> (usize, usize, usize, usize) {
        (
            1,
            self.latent_channels,
            height / self.vae_scale_factor,
            width / self.vae_scale_factor,
        )
    }

    /// `(height, width)` of the decoded image for a `width`×`height` request.
    pub fn image_size(&self, width: usize, height: usize) -> (usize, usize) {
        let (_, _, h, w) = self.latent_shape(width, height);
        (h * self.vae_scale_factor, w * self.vae_scale_factor)
    }

    /// `(height, width)` of a preview, or `None` without a preview decoder.
    pub fn preview_size(&self, width: usize, height: usize) -> Option<(usize, usize)> {
        let (_, _, h, w) = self.latent_shape(width, height);
        self.taesd.as_ref().map(|t| {
            let pool = preview_pool(h.max(w) * t.upscale());
            (h / pool * t.upscale(), w / pool * t.upscale())
        })
    }

    pub fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    /// Token ids of `text` for both tokenizers (exposed for tests).
    pub fn tokenize(&self, text: &str) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
        Ok((self.tokenizer.encode(text)?, self.tokenizer_2.encode(text)?))
    }

    /// `encode_prompt` for one text: the concatenated penultimate states of
    /// both encoders `[1, 77, d1+d2]` and the projected pooled output `[1, p]`.
    pub fn encode_text(&self, text: &str) -> Result<(Tensor, Tensor), ModelError> {
        let (ids_1, ids_2) = self.tokenize(text)?;
        let out_1 = self.text_encoder.forward(&[ids_1], &self.device, false)?;
        let out_2 = self.text_encoder_2.forward(&[ids_2], &self.device, true)?;
        let embeds = Tensor::cat(&[&out_1.penultimate, &out_2.penultimate], 2)?;
        let pooled = out_2
            .pooled
            .ok_or_else(|| ModelError::Input("text_encoder_2 returned no pooled output".into()))?;
        Ok((embeds, pooled))
    }

    /// The conditioning the UNet gets: with guidance, the negative prompt's
    /// (zeros when it is empty and `force_zeros_for_empty_prompt`) then the prompt's.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        do_cfg: bool,
    ) -> Result<PromptEmbeds, ModelError> {
        let (embeds, pooled) = self.encode_text(prompt)?;
        if !do_cfg {
            return Ok(PromptEmbeds {
                prompt_embeds: embeds,
                pooled_prompt_embeds: pooled,
            });
        }
        let negative = negative_prompt.filter(|n| !n.is_empty());
        let (neg_embeds, neg_pooled) = match negative {
            None if self.force_zeros_for_empty_prompt => (embeds.zeros_like()?, pooled.zeros_like()?),
            _ => self.encode_text(negative.unwrap_or(""))?,
        };
        Ok(PromptEmbeds {
            prompt_embeds: Tensor::cat(&[&neg_embeds, &embeds], 0)?,
            pooled_prompt_embeds: Tensor::cat(&[&neg_pooled, &pooled], 0)?,
        })
    }

    /// The denoising loop from `noise` (`[k, c, h/f, w/f]`, unit variance: k
    /// images of the same prompt) to final latents. `on_step` sees the latents
    /// before the first step and after each; returning `Break` stops early
    /// with `Ok(None)`.
    pub fn denoise(
        &self,
        embeds: &PromptEmbeds,
        noise: &Tensor,
        params: &DenoiseParams,
        on_step: &mut dyn FnMut(&StepState) -> ControlFlow<()>,
    ) -> Result<Option<Tensor>, ModelError> {
        let (k, c, h, w) = noise.dims4()?;
        let (_, ec, eh, ew) = self.latent_shape(params.width, params.height);
        if k == 0 || (c, h, w) != (ec, eh, ew) {
            return Err(ModelError::Input(format!(
                "init noise has shape {:?}, expected [k >= 1, {ec}, {eh}, {ew}] for {}x{}",
                noise.dims(),
                params.width,
                params.height
            )));
        }
        let scheduler = EulerDiscreteScheduler::new(&self.scheduler_config, params.num_inference_steps)?;
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
        let mut latents = (noise.to_device(&self.device)?.to_dtype(self.dtype)? * scheduler.init_noise_sigma as f64)?;
        let total = scheduler.len();
        let first = StepState {
            step: 0,
            total_steps: total,
            timestep: scheduler.timesteps[0],
            latents: &latents,
        };
        if on_step(&first).is_break() {
            return Ok(None);
        }
        for (i, &t) in scheduler.timesteps.iter().enumerate() {
            let input = if do_cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let noise_pred = self.unet.forward(&input, t, &context, &text_embeds, &time_ids)?;
            let noise_pred = if do_cfg {
                let uncond = noise_pred.narrow(0, 0, k)?;
                let text = noise_pred.narrow(0, k, k)?;
                (&uncond + ((text - &uncond)? * params.guidance_scale)?)?
            } else {
                noise_pred
            };
            latents = scheduler.step(&noise_pred, i, &latents)?;
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

    /// VAE decode of final latents to images `[b, 3, H, W]` in [-1, 1] (f32).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        let latents = latents.to_dtype(self.vae_dtype)?;
        let z = self.vae.unscale_latents(&latents)?;
        Ok(self.vae.decode(&z)?.to_dtype(DType::F32)?)
    }

    /// `AutoencoderTiny.decode` of latents at full resolution, in [-1, 1]
    /// (f32); `None` when no TAESD was loaded.
    pub fn tiny_decode(&self, latents: &Tensor) -> Result<Option<Tensor>, ModelError> {
        match &self.taesd {
            Some(taesd) => Ok(Some(
                taesd.decode(&latents.to_dtype(self.dtype)?)?.to_dtype(DType::F32)?,
            )),
            None => Ok(None),
        }
    }

    /// TAESD decode of (intermediate) latents to images in [-1, 1] (f32);
    /// `None` when no preview decoder was loaded. Latents are average-pooled
    /// by [`preview_pool`] first, so a preview is at most
    /// [`PREVIEW_MAX_SIDE`] pixels on its long side.
    pub fn preview(&self, latents: &Tensor) -> Result<Option<Tensor>, ModelError> {
        let Some(taesd) = &self.taesd else {
            return Ok(None);
        };
        let (_, _, h, w) = latents.dims4()?;
        let pool = preview_pool(h.max(w) * taesd.upscale());
        let latents = latents.to_dtype(self.dtype)?;
        let latents = if pool > 1 { latents.avg_pool2d(pool)? } else { latents };
        Ok(Some(taesd.decode(&latents)?.to_dtype(DType::F32)?))
    }

    /// The UNet alone (for parity tests and benchmarks).
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// The VAE decoder alone (for parity tests and benchmarks).
    pub fn vae(&self) -> &AutoencoderKLDecoder {
        &self.vae
    }
}

/// Previews are for watching an image form, not for keeping: at most this
/// many pixels on the long side. Full-size TAESD decodes of two 1024² images
/// took 490 ms on an H100 in candle; a 512² preview is a quarter of the work
/// and of the bytes sent to every subscriber.
pub const PREVIEW_MAX_SIDE: usize = 512;

/// The power-of-two pooling of latents that brings a preview whose long side
/// would be `side` pixels to at most [`PREVIEW_MAX_SIDE`].
pub fn preview_pool(side: usize) -> usize {
    let mut pool = 1;
    while side / pool > PREVIEW_MAX_SIDE {
        pool *= 2;
    }
    pool
}

/// SDXL's `_get_add_time_ids` check: six time ids times `addition_time_embed_dim`
/// plus the pooled width must be what `add_embedding` takes.
fn check_added_embedding(unet: &UNetConfig, te2: &ClipTextConfig) -> Result<(), ModelError> {
    if unet.addition_embed_type.as_deref() != Some("text_time") {
        return Err(ModelError::Config {
            file: "unet/config.json".into(),
            message: format!(
                "`addition_embed_type` = {:?}: an SDXL UNet needs \"text_time\"",
                unet.addition_embed_type
            ),
        });
    }
    let pooled = te2.projection_dim.unwrap_or(te2.hidden_size);
    let time_dim = unet.addition_time_embed_dim.unwrap_or(0);
    let expected = unet.projection_class_embeddings_input_dim.unwrap_or(0);
    if 6 * time_dim + pooled != expected {
        return Err(ModelError::Config {
            file: "unet/config.json".into(),
            message: format!(
                "`projection_class_embeddings_input_dim` = {expected}, but 6 time ids × `addition_time_embed_dim` {time_dim} + text_encoder_2 `projection_dim` {pooled} = {}",
                6 * time_dim + pooled
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_pooled_to_at_most_512_pixels() {
        assert_eq!(preview_pool(128), 1);
        assert_eq!(preview_pool(512), 1);
        assert_eq!(preview_pool(1024), 2);
        assert_eq!(preview_pool(2048), 4);
        assert_eq!(preview_pool(1000), 2);
    }
}
