//! `euler`: diffusers' `EulerDiscreteScheduler` (deterministic, `s_churn` = 0
//! as the pipelines call it): timesteps and sigmas for a number of steps,
//! input scaling, the Euler step and sigma-based `add_noise`.
//!
//! Reads `num_train_timesteps`, the betas, `prediction_type`,
//! `timestep_spacing`, `steps_offset`, `interpolation_type`,
//! `use_karras_sigmas`, `use_exponential_sigmas`, `sigma_min`, `sigma_max`,
//! `timestep_type`, `rescale_betas_zero_snr` and `final_sigmas_type`.

use candle_core::{Result, Tensor};

use super::config::{self, expect_final_sigmas, expect_one_of, expect_sigma_ramp, Prediction, SchedulerConfig, EULER};
use super::ops::{check_index, div, f32_copy, mul, scalar_in, step_noise};
use super::schedule::{linspace_f32, TrainSchedule};
use super::timesteps::{exponential_sigmas, interp, karras_sigmas, log_sigmas, sigma_to_t, single_step_spacing};
use super::{ModelError, Sampler};

/// The schedule for one generation: `timesteps[i]` is fed to the UNet at step
/// `i`, which moves the sample from `sigmas[i]` to `sigmas[i + 1]`.
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: Prediction,
}

impl EulerDiscrete {
    /// The schedule of `num_inference_steps` steps that `config` describes.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> std::result::Result<Self, ModelError> {
        let c = config;
        let prediction = validate(c)?;
        let train_sigmas = TrainSchedule::new(c, &EULER, true)?.sigmas();
        let n_train = c.num_train_timesteps;
        let n = num_inference_steps;
        // Euler keeps its timesteps as float32 (`dtype=np.float32`).
        let mut timesteps: Vec<f64> = single_step_spacing(c.timestep_spacing(&EULER), n_train, n, c.steps_offset)
            .into_iter()
            .map(|t| t as f32 as f64)
            .collect();
        let log_sigmas = log_sigmas(&train_sigmas);
        let mut sigmas: Vec<f64> = match c.interpolation_type.as_str() {
            "log_linear" => {
                // torch.linspace (float32) of the logs, then torch's float32 exp:
                // n + 1 sigmas, to which the final one is still appended.
                let (first, last) = (log_sigmas[n_train - 1], log_sigmas[0]);
                linspace_f32(first, last, n + 1)
                    .into_iter()
                    .map(|x| x.exp() as f64)
                    .collect()
            }
            _ => timesteps.iter().map(|&t| interp(t, &train_sigmas)).collect(),
        };
        if c.use_karras_sigmas || c.use_exponential_sigmas {
            // The ramp spans the inference sigmas (not the training range).
            let sigma_min = c.sigma_min.unwrap_or(*sigmas.last().unwrap_or(&0.0));
            let sigma_max = c.sigma_max.unwrap_or(sigmas[0]);
            sigmas = if c.use_karras_sigmas {
                karras_sigmas(sigma_min, sigma_max, n)
            } else {
                exponential_sigmas(sigma_min, sigma_max, n)
            };
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let sigma_last = if c.final_sigmas_type == "sigma_min" {
            train_sigmas[0] as f64
        } else {
            0.0
        };
        sigmas.push(sigma_last);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        let timesteps: Vec<f32> = if c.timestep_type == "continuous" && prediction == Prediction::Velocity {
            sigmas[..n].iter().map(|&s| 0.25 * s.ln()).collect()
        } else {
            timesteps.into_iter().map(|t| t as f32).collect()
        };
        // diffusers takes the max over the sigmas the pipeline reads it from,
        // the inference ones (after `set_timesteps`).
        let max_sigma = sigmas.iter().copied().fold(f32::MIN, f32::max);
        let init_noise_sigma = if matches!(c.timestep_spacing(&EULER), "linspace" | "trailing") {
            max_sigma
        } else {
            (max_sigma * max_sigma + 1.0).sqrt()
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction,
        })
    }
}

impl Sampler for EulerDiscrete {
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

    /// `sample / (sigma ** 2 + 1) ** 0.5`, in the sample's dtype.
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        let sigma = self.sigmas[i];
        div(sample, (sigma * sigma + 1.0).sqrt())
    }

    fn step_needs_noise(&self, _i: usize) -> bool {
        false
    }

    /// One Euler step from `sigmas[i]` to `sigmas[i + 1]`.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        step_noise(false, noise, i)?;
        let dtype = sample.dtype();
        let sample = f32_copy(sample)?;
        let out = f32_copy(model_output)?;
        let sigma = self.sigmas[i];
        let pred_original = match self.prediction {
            Prediction::Epsilon => (&sample - mul(&out, sigma)?)?,
            Prediction::Velocity => {
                let s2 = sigma * sigma + 1.0;
                (mul(&out, -sigma / s2.sqrt())? + div(&sample, s2)?)?
            }
            Prediction::Sample => out,
        };
        let derivative = div(&(&sample - &pred_original)?, sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        (sample + mul(&derivative, dt)?)?.to_dtype(dtype)
    }

    /// `original + noise * sigmas[i]`, in the original's dtype.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        sigma_add_noise(original, noise, self.sigmas[i])
    }

    fn set_begin_index(&mut self, _i: usize) {
        // Stateless: step `i` is read from the index itself.
    }
}

/// The Euler classes' `add_noise`: `original + noise * sigma`, with sigma
/// cast to the original's dtype first.
pub fn sigma_add_noise(original: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    let sigma = scalar_in(sigma, original.dtype())?.to_device(original.device())?;
    let noise = noise.to_dtype(original.dtype())?;
    original + noise.broadcast_mul(&sigma)?
}

fn validate(c: &SchedulerConfig) -> std::result::Result<Prediction, ModelError> {
    let class = &EULER;
    let prediction = config::prediction(c, class, &["epsilon", "v_prediction", "sample", "original_sample"])?;
    config::expect_spacing(c, class)?;
    expect_one_of(
        class,
        "interpolation_type",
        &c.interpolation_type,
        &["linear", "log_linear"],
    )?;
    expect_final_sigmas(c, class)?;
    expect_one_of(class, "timestep_type", &c.timestep_type, &["discrete", "continuous"])?;
    expect_sigma_ramp(c, class)?;
    Ok(prediction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(spacing: &str) -> SchedulerConfig {
        serde_json::from_value(serde_json::json!({
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "timestep_spacing": spacing, "steps_offset": 1
        }))
        .unwrap()
    }

    #[test]
    fn spacings_give_the_reference_timesteps() {
        let s = EulerDiscrete::new(&config("leading"), 4).unwrap();
        assert_eq!(s.timesteps, vec![751.0, 501.0, 251.0, 1.0]);
        let s = EulerDiscrete::new(&config("linspace"), 4).unwrap();
        assert_eq!(s.timesteps, vec![999.0, 666.0, 333.0, 0.0]);
        assert_eq!(s.sigmas.len(), 5);
        assert_eq!(*s.sigmas.last().unwrap(), 0.0);
        // linspace/trailing start from the largest sigma itself
        assert_eq!(s.init_noise_sigma, s.sigmas[0]);
    }

    #[test]
    fn karras_sigmas_fall_monotonically_and_map_back_to_timesteps() {
        let mut c = config("leading");
        c.use_karras_sigmas = true;
        let s = EulerDiscrete::new(&c, 10).unwrap();
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
        assert!(s.timesteps.windows(2).all(|w| w[0] > w[1]));
        assert!(s.timesteps[0] <= 1000.0 && s.timesteps[9] >= 0.0);
    }

    #[test]
    fn unsupported_values_are_named() {
        let mut c = config("leading");
        c.interpolation_type = "cubic".into();
        let err = EulerDiscrete::new(&c, 4).unwrap_err().to_string();
        assert!(
            err.contains("interpolation_type") && err.contains("log_linear"),
            "{err}"
        );
    }
}
