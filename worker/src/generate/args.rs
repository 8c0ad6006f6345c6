//! `worker generate`'s flags, and what they resolve to before anything is
//! loaded: the checked numbers, the size (the image's when there is one),
//! the decoded image and mask, the strength, and the LoRA files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::rules;
use image::{GrayImage, RgbImage};
use sdxl::image_processor;
use sdxl::scheduler::SamplerKind;

use crate::args::{ModelArgs, UsageError};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from; `""` means none.
    #[arg(long, default_value = rules::DEFAULT_NEGATIVE_PROMPT)]
    pub negative_prompt: String,
    /// Image width in pixels, a multiple of 8 (default: the `--image`'s,
    /// rounded down to a multiple of 8, or 1024).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of 8 (default: the `--image`'s, or 1024).
    #[arg(long)]
    pub height: Option<usize>,
    /// Denoising steps.
    #[arg(long, alias = "num-inference-steps", default_value_t = rules::DEFAULT_STEPS as usize)]
    pub steps: usize,
    /// Classifier-free guidance scale (guidance is off at 1 or below).
    #[arg(long, default_value_t = rules::DEFAULT_GUIDANCE_SCALE)]
    pub guidance_scale: f64,
    /// The sampler (the diffusers class each one equals is in the README).
    #[arg(long, default_value = rules::DEFAULT_SCHEDULER, value_parser = crate::args::sampler_parser())]
    pub scheduler: SamplerKind,
    /// Noise seed; a random one is drawn and printed when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// A safetensors file of random draws `[1, 4, H/8, W/8]` used instead of
    /// the seed's: named `init`, `step.K` (the K-th noise a stochastic sampler
    /// takes), `vae_sample`; or one tensor of any name, the initial noise.
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
    /// img2img: the image to start from (PNG, JPEG or WebP).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Inpainting (with `--image`): where to repaint, white; the image's size.
    #[arg(long, requires = "image")]
    pub mask: Option<PathBuf>,
    /// How much of `--image` to repaint, 0 < S ≤ 1 (default 0.3, or 0.9999
    /// with a mask: diffusers' defaults); only the last int(steps · S) steps run.
    #[arg(long, requires = "image")]
    pub strength: Option<f64>,
    /// A LoRA file (kohya or diffusers/PEFT safetensors) and its scale
    /// (default 1); repeatable.
    #[arg(long = "lora", value_name = "PATH[:SCALE]", value_parser = parse_lora)]
    pub loras: Vec<(PathBuf, f64)>,
    /// Ranks (devices) to spread the images over; default: every visible
    /// CUDA device, or 1 on CPU.
    #[arg(long)]
    pub ranks: Option<usize>,
    /// Images of the prompt; image `i` uses seed `seed + i` (default: one per rank).
    #[arg(long)]
    pub num_images: Option<usize>,
    /// With a TAESD (`--taesd`): a preview grid at step 0 and every this many steps (0 = none).
    #[arg(long, default_value_t = rules::DEFAULT_PREVIEW_EVERY as usize)]
    pub preview_every: usize,
    /// Write each preview grid as `step_NNN.jpg` here.
    #[arg(long)]
    pub save_previews: Option<PathBuf>,
    /// Where to write the PNG (the grid when there are several images).
    #[arg(long)]
    pub output: PathBuf,
    /// Also write each image as `{index}.png` here.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
}

/// `PATH[:SCALE]`: the scale is what follows the last `:` when it reads as a
/// number (so that paths with colons still work).
fn parse_lora(value: &str) -> Result<(PathBuf, f64), String> {
    if let Some((path, scale)) = value.rsplit_once(':') {
        if let Ok(scale) = scale.parse::<f64>() {
            let (lo, hi) = rules::LORA_SCALE_RANGE;
            if !(lo..=hi).contains(&scale) {
                return Err(format!("the scale {scale} must be between {lo} and {hi}"));
            }
            return Ok((PathBuf::from(path), scale));
        }
    }
    Ok((PathBuf::from(value), rules::DEFAULT_LORA_SCALE))
}

/// The image a job starts from.
#[derive(Debug, Clone)]
pub struct InitImage {
    pub image: Arc<RgbImage>,
    pub mask: Option<Arc<GrayImage>>,
    pub strength: f64,
}

/// The flags resolved: what the two ways of running need.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub width: usize,
    pub height: usize,
    pub init: Option<InitImage>,
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, UsageError> {
    std::fs::read(path).map_err(|e| UsageError(format!("{flag} {}: {e}", path.display())))
}

impl GenerateArgs {
    /// Checks the numbers, reads and decodes the image and the mask, and
    /// settles the size, naming the flag and the rule in every error.
    pub fn resolve(&self) -> Result<Resolved, UsageError> {
        let init = match &self.image {
            None => None,
            Some(path) => {
                let image = image_processor::decode_rgb(&read(path, "--image")?)
                    .map_err(|e| UsageError(format!("--image {}: {e}", path.display())))?;
                let mask = match &self.mask {
                    None => None,
                    Some(mpath) => {
                        let mask = image_processor::decode_mask(&read(mpath, "--mask")?)
                            .map_err(|e| UsageError(format!("--mask {}: {e}", mpath.display())))?;
                        if mask.dimensions() != image.dimensions() {
                            return Err(UsageError(format!(
                                "--mask {} is {}x{}, but the image is {}x{}: they must be the same size",
                                mpath.display(),
                                mask.width(),
                                mask.height(),
                                image.width(),
                                image.height()
                            )));
                        }
                        Some(Arc::new(mask))
                    }
                };
                let default = if mask.is_some() {
                    rules::DEFAULT_INPAINT_STRENGTH
                } else {
                    rules::DEFAULT_STRENGTH
                };
                let strength = self.strength.unwrap_or(default);
                let (lo, hi) = rules::STRENGTH_RANGE;
                if !(strength > lo && strength <= hi) {
                    return Err(UsageError(format!(
                        "--strength {strength} must be above {lo} and at most {hi}"
                    )));
                }
                Some(InitImage {
                    image: Arc::new(image),
                    mask,
                    strength,
                })
            }
        };
        let multiple = rules::SIZE_MULTIPLE as usize;
        let (width, height) = match &init {
            Some(i) => {
                let (w, h) = image_processor::default_size(i.image.width(), i.image.height(), multiple);
                (self.width.unwrap_or(w), self.height.unwrap_or(h))
            }
            None => (
                self.width.unwrap_or(rules::DEFAULT_SIZE as usize),
                self.height.unwrap_or(rules::DEFAULT_SIZE as usize),
            ),
        };
        // Any positive multiple of 8, not the service's size range: small and
        // custom models run at other sizes on one machine.
        for (name, v) in [("--width", width), ("--height", height)] {
            if v == 0 || !v.is_multiple_of(multiple) {
                return Err(UsageError(format!(
                    "{name} {v} must be a positive multiple of {multiple}"
                )));
            }
        }
        let (lo, hi) = rules::STEPS_RANGE;
        if (self.steps as i64) < lo {
            return Err(UsageError(format!("--steps {} must be at least {lo}", self.steps)));
        }
        if self.steps as i64 > hi {
            return Err(UsageError(format!("--steps {} must be at most {hi}", self.steps)));
        }
        if let Some(i) = &init {
            let run = (self.steps as f64 * i.strength) as usize;
            if run == 0 {
                return Err(UsageError(format!(
                    "--strength {} of {} steps runs int({} × {}) = 0 steps: raise --strength or --steps",
                    i.strength, self.steps, self.steps, i.strength
                )));
            }
        }
        if self.ranks == Some(0) {
            return Err(UsageError("--ranks 0 must be at least 1".into()));
        }
        if self.num_images == Some(0) {
            return Err(UsageError("--num-images 0 must be at least 1".into()));
        }
        let (lo, hi) = rules::GUIDANCE_RANGE;
        if !(lo..=hi).contains(&self.guidance_scale) {
            return Err(UsageError(format!(
                "--guidance-scale {} must be a number between {lo} and {hi}",
                self.guidance_scale
            )));
        }
        Ok(Resolved { width, height, init })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_flags_take_an_optional_scale() {
        assert_eq!(
            parse_lora("style.safetensors").unwrap(),
            ("style.safetensors".into(), 1.0)
        );
        assert_eq!(
            parse_lora("a/b.safetensors:0.8").unwrap(),
            ("a/b.safetensors".into(), 0.8)
        );
        assert_eq!(
            parse_lora("c:/x:y.safetensors").unwrap(),
            ("c:/x:y.safetensors".into(), 1.0)
        );
        assert!(parse_lora("x.safetensors:9").unwrap_err().contains("between -4 and 4"));
    }
}
