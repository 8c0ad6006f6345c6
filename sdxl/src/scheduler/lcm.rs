//! `lcm`: diffusers' `LCMScheduler` (latent consistency models): each step
//! predicts the clean sample with the consistency boundary conditions, and
//! every step but the last re-noises it to the next timestep with fresh noise.
//!
//! Reads `num_train_timesteps`, the betas (its own defaults: 0.00085, 0.012,
//! "scaled_linear"), `prediction_type`, `rescale_betas_zero_snr` (no 2^-24
//! pin), `original_inference_steps` (50), `timestep_scaling` (10),
//! `clip_sample` (default false), `clip_sample_range`, `set_alpha_to_one`
//! and `thresholding` (rejected when true). LCM's timesteps ignore
//! `timestep_spacing` and `steps_offset`: they are a subset of the
//! `original_inference_steps` distillation schedule, so at most that many
//! steps can run.

use candle_core::{Result, Tensor};

use super::config::{expect_false, prediction, Prediction, SchedulerConfig, FILE, LCM};
use super::ddim::alpha_add_noise;
use super::ops::{check_index, div, f32_copy, lin2, mul, step_noise};
use super::schedule::TrainSchedule;
use super::timesteps::linspace_f64;
use super::{ModelError, Sampler};

/// One generation's LCM schedule.
#[derive(Debug, Clone)]
pub struct Lcm {
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timestep_scaling: f32,
    prediction: Prediction,
    clip: Option<f32>,
}

impl Lcm {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> std::result::Result<Self, ModelError> {
        let c = config;
        let class = &LCM;
        let prediction = prediction(c, class, &["epsilon", "sample", "v_prediction"])?;
        expect_false(class, "thresholding", c.thresholding)?;
        let n_train = c.num_train_timesteps;
        let original = c.original_inference_steps;
        if original == 0 || original > n_train {
            return Err(ModelError::Config {
                file: FILE.into(),
                message: format!("`original_inference_steps` = {original} must be between 1 and {n_train}"),
            });
        }
        if num_inference_steps > original {
            return Err(ModelError::Input(format!(
                "LCM cannot run {num_inference_steps} steps: its schedule is a subset of the \
                 {original} steps it was distilled on (`original_inference_steps`)"
            )));
        }
        let alphas_cumprod = TrainSchedule::new(c, class, false)?.alphas_cumprod;
        // The distillation schedule k - 1, 2k - 1, ..., descending, and every
        // (original / n)-th of it by floored float64 positions.
        let k = (n_train / original) as i64;
        let origin: Vec<i64> = (1..=original as i64).rev().map(|j| j * k - 1).collect();
        let timesteps: Vec<i64> = linspace_f64(0.0, original as f64, num_inference_steps, false)
            .into_iter()
            .map(|x| origin[x.floor() as usize])
            .collect();
        Ok(Self {
            timesteps_f32: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            final_alpha_cumprod: if c.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] },
            alphas_cumprod,
            // torch multiplies the int64 timestep by the Python float in float32.
            timestep_scaling: c.timestep_scaling as f32,
            prediction,
            clip: c.clip_sample(class).then_some(c.clip_sample_range as f32),
        })
    }

    /// `get_scalings_for_boundary_condition_discrete` in float32.
    fn boundary_scalings(&self, t: i64) -> (f32, f32) {
        let sigma_data2 = 0.25f32;
        let scaled = t as f32 * self.timestep_scaling;
        let c_skip = sigma_data2 / (scaled * scaled + sigma_data2);
        let c_out = scaled / (scaled * scaled + sigma_data2).sqrt();
        (c_skip, c_out)
    }
}

impl Sampler for Lcm {
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

    /// Every step but the last re-noises the denoised sample.
    fn step_needs_noise(&self, i: usize) -> bool {
        i + 1 < self.timesteps.len()
    }

    /// Returns diffusers' `prev_sample` (what the pipeline carries on with),
    /// which on the last step is the `denoised` sample itself.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        let noise = step_noise(self.step_needs_noise(i), noise, i)?;
        let dtype = sample.dtype();
        let sample = f32_copy(sample)?;
        let out = f32_copy(model_output)?;
        let t = self.timesteps[i];
        let prev_t = self.timesteps.get(i + 1).copied().unwrap_or(t);
        let alpha_prod_t = self.alphas_cumprod[t as usize];
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
        let (c_skip, c_out) = self.boundary_scalings(t);
        let mut pred_original = match self.prediction {
            Prediction::Epsilon => div(&(&sample - mul(&out, sqrt_b)?)?, sqrt_a)?,
            Prediction::Sample => out,
            Prediction::Velocity => lin2(sqrt_a, &sample, -sqrt_b, &out)?,
        };
        if let Some(range) = self.clip {
            pred_original = pred_original.clamp(-range, range)?;
        }
        let denoised = lin2(c_out, &pred_original, c_skip, &sample)?;
        let prev = match noise {
            Some(noise) => lin2(
                alpha_prod_t_prev.sqrt(),
                &denoised,
                (1.0 - alpha_prod_t_prev).sqrt(),
                &noise,
            )?,
            None => denoised,
        };
        prev.to_dtype(dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        alpha_add_noise(original, noise, self.alphas_cumprod[self.timesteps[i] as usize])
    }

    fn set_begin_index(&mut self, _i: usize) {
        // Stateless: step `i` is read from the index itself.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_come_from_the_distillation_schedule() {
        let c: SchedulerConfig =
            serde_json::from_str(r#"{"timestep_spacing": "trailing", "steps_offset": 7}"#).unwrap();
        let s = Lcm::new(&c, 4).unwrap();
        assert_eq!(s.timesteps, vec![999, 759, 499, 259]);
        assert!(s.step_needs_noise(2) && !s.step_needs_noise(3));
        let err = Lcm::new(&c, 51).unwrap_err().to_string();
        assert!(err.contains("original_inference_steps"), "{err}");
    }
}
