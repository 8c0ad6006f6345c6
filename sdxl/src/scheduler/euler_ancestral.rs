//! `euler_a`: diffusers' `EulerAncestralDiscreteScheduler`: an Euler step to
//! `sigma_down`, then fresh noise scaled by `sigma_up`, at every step (the
//! last one too, where `sigma_up` is zero but diffusers still draws).
//!
//! Reads `num_train_timesteps`, the betas, `prediction_type` (epsilon or
//! v_prediction: the class has no `sample` prediction), `timestep_spacing`,
//! `steps_offset` and `rescale_betas_zero_snr`. It has no Karras sigmas,
//! interpolation type or final sigma type: those keys are ignored, as
//! `from_config` drops them.

use candle_core::{Result, Tensor};

use super::config::{expect_spacing, prediction, Prediction, SchedulerConfig, EULER_ANCESTRAL};
use super::euler::sigma_add_noise;
use super::ops::{check_index, div, f32_copy, mul, step_noise};
use super::schedule::TrainSchedule;
use super::timesteps::{interp, single_step_spacing};
use super::{ModelError, Sampler};

/// The schedule for one generation, as [`super::EulerDiscrete`]'s.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    v_prediction: bool,
}

impl EulerAncestral {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> std::result::Result<Self, ModelError> {
        let c = config;
        let class = &EULER_ANCESTRAL;
        let prediction = prediction(c, class, &["epsilon", "v_prediction"])?;
        expect_spacing(c, class)?;
        let train_sigmas = TrainSchedule::new(c, class, true)?.sigmas();
        let spacing = c.timestep_spacing(class);
        let timesteps: Vec<f32> =
            single_step_spacing(spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset)
                .into_iter()
                .map(|t| t as f32)
                .collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| interp(t as f64, &train_sigmas) as f32)
            .collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(f32::MIN, f32::max);
        let init_noise_sigma = if matches!(spacing, "linspace" | "trailing") {
            max_sigma
        } else {
            (max_sigma * max_sigma + 1.0).sqrt()
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            v_prediction: prediction == Prediction::Velocity,
        })
    }
}

impl Sampler for EulerAncestral {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn order(&self) -> usize {
        1
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        let sigma = self.sigmas[i];
        div(sample, (sigma * sigma + 1.0).sqrt())
    }

    fn step_needs_noise(&self, i: usize) -> bool {
        i < self.timesteps.len()
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        let noise = step_noise(true, noise, i)?.expect("checked above");
        let dtype = sample.dtype();
        let sample = f32_copy(sample)?;
        let out = f32_copy(model_output)?;
        let sigma = self.sigmas[i];
        let pred_original = if self.v_prediction {
            let s2 = sigma * sigma + 1.0;
            (mul(&out, -sigma / s2.sqrt())? + div(&sample, s2)?)?
        } else {
            (&sample - mul(&out, sigma)?)?
        };
        let (from, to) = (sigma, self.sigmas[i + 1]);
        // Each a float32 0-d tensor expression in diffusers, evaluated left to right.
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = div(&(&sample - &pred_original)?, sigma)?;
        let prev = (&sample + mul(&derivative, sigma_down - sigma)?)?;
        (prev + mul(&noise, sigma_up)?)?.to_dtype(dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        sigma_add_noise(original, noise, self.sigmas[i])
    }

    fn set_begin_index(&mut self, _i: usize) {
        // Stateless: step `i` is read from the index itself.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_prediction_is_rejected() {
        let c: SchedulerConfig = serde_json::from_str(r#"{"prediction_type": "sample"}"#).unwrap();
        let err = EulerAncestral::new(&c, 4).unwrap_err().to_string();
        assert!(
            err.contains("prediction_type") && err.contains("EulerAncestralDiscreteScheduler"),
            "{err}"
        );
    }

    #[test]
    fn ignores_keys_the_class_does_not_read() {
        let c: SchedulerConfig =
            serde_json::from_str(r#"{"use_karras_sigmas": true, "final_sigmas_type": "sigma_min"}"#).unwrap();
        let s = EulerAncestral::new(&c, 4).unwrap();
        assert_eq!(*s.sigmas.last().unwrap(), 0.0);
    }
}
