//! `ddim`: diffusers' `DDIMScheduler` with `eta` = 0 (what the pipelines
//! pass), so deterministic: integer timesteps, alpha-based steps and
//! `add_noise`, no input scaling.
//!
//! Reads `num_train_timesteps`, the betas, `prediction_type`,
//! `timestep_spacing` (default "leading"), `steps_offset`,
//! `rescale_betas_zero_snr` (without the 2^-24 pin of the sigma classes),
//! `clip_sample` (default **true**: a model config without the key gets
//! `pred_original_sample` clamped), `clip_sample_range`, `set_alpha_to_one`
//! and `thresholding` (rejected when true).

use candle_core::{Result, Tensor};

use super::config::{expect_false, expect_spacing, prediction, Prediction, SchedulerConfig, DDIM};
use super::ops::{check_index, div, f32_copy, lin2, mul, scalar_in, step_noise};
use super::schedule::TrainSchedule;
use super::timesteps::single_step_spacing;
use super::{ModelError, Sampler};

/// The schedule for one generation: integer `timesteps` and the training
/// `alphas_cumprod` they index.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `num_train_timesteps // num_inference_steps`: DDIM's distance to the
    /// previous timestep, whatever the spacing.
    step_ratio: i64,
    prediction: Prediction,
    clip: Option<f32>,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> std::result::Result<Self, ModelError> {
        let c = config;
        let class = &DDIM;
        let prediction = prediction(c, class, &["epsilon", "sample", "v_prediction"])?;
        expect_spacing(c, class)?;
        expect_false(class, "thresholding", c.thresholding)?;
        let n_train = c.num_train_timesteps;
        if num_inference_steps > n_train {
            return Err(ModelError::Input(format!(
                "DDIM cannot run {num_inference_steps} steps: the schedule has {n_train} train timesteps"
            )));
        }
        let alphas_cumprod = TrainSchedule::new(c, class, false)?.alphas_cumprod;
        let spacing = c.timestep_spacing(class);
        let timesteps: Vec<i64> = single_step_spacing(spacing, n_train, num_inference_steps, c.steps_offset)
            .into_iter()
            .map(|t| t.round_ties_even() as i64)
            .collect();
        if let Some(&t) = timesteps.iter().find(|&&t| t < 0 || t as usize >= n_train) {
            return Err(ModelError::Config {
                file: super::config::FILE.into(),
                message: format!(
                    "`steps_offset` = {} puts timestep {t} outside 0..{n_train}",
                    c.steps_offset
                ),
            });
        }
        Ok(Self {
            timesteps_f32: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            final_alpha_cumprod: if c.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] },
            alphas_cumprod,
            step_ratio: (n_train / num_inference_steps) as i64,
            prediction,
            clip: c.clip_sample(class).then_some(c.clip_sample_range as f32),
        })
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn order(&self) -> usize {
        1
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step_needs_noise(&self, _i: usize) -> bool {
        false
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        step_noise(false, noise, i)?;
        let dtype = sample.dtype();
        let sample = f32_copy(sample)?;
        let out = f32_copy(model_output)?;
        let t = self.timesteps[i];
        let prev_t = t - self.step_ratio;
        let alpha_prod_t = self.alphas_cumprod[t as usize];
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let (mut pred_original, pred_epsilon) = match self.prediction {
            Prediction::Epsilon => (div(&(&sample - mul(&out, sqrt_b)?)?, sqrt_a)?, out),
            Prediction::Sample => {
                let eps = div(&(&sample - mul(&out, sqrt_a)?)?, sqrt_b)?;
                (out, eps)
            }
            Prediction::Velocity => (
                lin2(sqrt_a, &sample, -sqrt_b, &out)?,
                lin2(sqrt_a, &out, sqrt_b, &sample)?,
            ),
        };
        if let Some(range) = self.clip {
            pred_original = pred_original.clamp(-range, range)?;
        }
        // eta = 0: std_dev_t = 0 * variance ** 0.5 (NaN only if the variance is).
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = beta_prod_t_prev / beta_prod_t * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = 0.0 * variance.sqrt();
        let direction = mul(&pred_epsilon, (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt())?;
        (mul(&pred_original, alpha_prod_t_prev.sqrt())? + direction)?.to_dtype(dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        alpha_add_noise(original, noise, self.alphas_cumprod[self.timesteps[i] as usize])
    }

    fn set_begin_index(&mut self, _i: usize) {
        // DDIM has no begin index: each step is read from its timestep.
    }
}

/// The alpha-based `add_noise` of DDIM and LCM:
/// `alpha ** 0.5 * original + (1 - alpha) ** 0.5 * noise`, with
/// `alphas_cumprod` cast to the original's dtype first.
pub fn alpha_add_noise(original: &Tensor, noise: &Tensor, alpha_prod: f32) -> Result<Tensor> {
    let alpha = scalar_in(alpha_prod, original.dtype())?;
    let sqrt_alpha = alpha.sqrt()?;
    let sqrt_one_minus = alpha.affine(-1.0, 1.0)?.sqrt()?;
    super::ops::lin2_tensors(
        &sqrt_alpha,
        original,
        &sqrt_one_minus,
        &noise.to_dtype(original.dtype())?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_sample_defaults_on_and_thresholding_is_rejected() {
        let c: SchedulerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(Ddim::new(&c, 4).unwrap().clip, Some(1.0));
        let c: SchedulerConfig = serde_json::from_str(r#"{"thresholding": true}"#).unwrap();
        let err = Ddim::new(&c, 4).unwrap_err().to_string();
        assert!(
            err.contains("`thresholding` = true") && err.contains("DDIMScheduler"),
            "{err}"
        );
    }

    #[test]
    fn timesteps_are_integers() {
        let c: SchedulerConfig = serde_json::from_str(r#"{"timestep_spacing": "linspace"}"#).unwrap();
        assert_eq!(Ddim::new(&c, 4).unwrap().timesteps, vec![999, 666, 333, 0]);
        assert!(Ddim::new(&c, 1001).is_err());
    }
}
