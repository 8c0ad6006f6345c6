//! diffusers' `EulerDiscreteScheduler`: the noise schedule, the timesteps and
//! sigmas for a number of steps, input scaling and the Euler step.
//!
//! The schedule is computed with the precision diffusers uses (float32 betas
//! and sigmas, a float64 running product, float64 interpolation), so timesteps
//! and sigmas agree with the reference to float32 rounding.

use candle_core::{DType, Result, Tensor};

use super::config::{expect_one_of, SchedulerConfig};
use super::ModelError;

const FILE: &str = "scheduler/scheduler_config.json";

/// What the model predicts, from `prediction_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// The schedule for one generation: `timesteps[i]` is fed to the UNet at step
/// `i`, which moves the sample from `sigmas[i]` to `sigmas[i + 1]`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
    prediction: Prediction,
}

impl EulerDiscreteScheduler {
    /// The schedule of `num_inference_steps` steps that `config` describes.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> std::result::Result<Self, ModelError> {
        if num_inference_steps == 0 {
            return Err(ModelError::Input("steps must be at least 1".into()));
        }
        validate(config)?;
        let prediction = match config.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            _ => Prediction::Sample,
        };
        let train_sigmas = train_sigmas(config)?;
        let n_train = config.num_train_timesteps;
        let n = num_inference_steps;
        let mut timesteps: Vec<f64> = match config.timestep_spacing.as_str() {
            "linspace" => linspace_f64(0.0, (n_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t as f32 as f64)
                .collect(),
            "leading" => {
                let ratio = (n_train / n) as f64;
                (0..n)
                    .rev()
                    .map(|i| (i as f64 * ratio).round() + config.steps_offset as f64)
                    .collect()
            }
            _ => {
                // trailing
                let ratio = n_train as f64 / n as f64;
                let mut ts = Vec::new();
                let mut t = n_train as f64;
                while t > 0.0 {
                    ts.push(t.round() - 1.0);
                    t -= ratio;
                }
                ts
            }
        };
        let log_sigmas: Vec<f64> = train_sigmas.iter().map(|&s| (s as f64).ln()).collect();
        let mut sigmas: Vec<f64> = match config.interpolation_type.as_str() {
            "log_linear" => {
                let first = (train_sigmas[n_train - 1] as f64).ln();
                let last = (train_sigmas[0] as f64).ln();
                linspace_f32(first as f32, last as f32, n + 1)
                    .into_iter()
                    .map(|x| (x as f64).exp() as f32 as f64)
                    .collect()
            }
            _ => timesteps.iter().map(|&t| interp(t, &train_sigmas)).collect(),
        };
        if config.use_karras_sigmas || config.use_exponential_sigmas {
            let sigma_min = config.sigma_min.unwrap_or(*sigmas.last().unwrap_or(&0.0));
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = if config.use_karras_sigmas {
                let rho = 7.0;
                let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
                linspace_f64(0.0, 1.0, n)
                    .into_iter()
                    .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
                    .collect()
            } else {
                linspace_f64(sigma_max.ln(), sigma_min.ln(), n)
                    .into_iter()
                    .map(f64::exp)
                    .collect()
            };
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let sigma_last = if config.final_sigmas_type == "sigma_min" {
            train_sigmas[0] as f64
        } else {
            0.0
        };
        sigmas.push(sigma_last);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        let timesteps: Vec<f32> = if config.timestep_type == "continuous" && prediction == Prediction::VPrediction {
            sigmas[..n].iter().map(|&s| 0.25 * s.ln()).collect()
        } else {
            timesteps.into_iter().map(|t| t as f32).collect()
        };
        // diffusers takes the max over its full-train sigmas until set_timesteps,
        // and over the inference sigmas after: the pipeline reads it after.
        let max_sigma = sigmas.iter().copied().fold(f32::MIN, f32::max);
        let init_noise_sigma = if matches!(config.timestep_spacing.as_str(), "linspace" | "trailing") {
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

    /// `scale_model_input`: the sample the UNet sees at step `i`.
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        div_scalar(sample, (sigma * sigma + 1.0).sqrt())
    }

    /// One Euler step from `sigmas[i]` to `sigmas[i + 1]` (computed in f32,
    /// returned in the sample's dtype), and the predicted clean sample.
    pub fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let out = model_output.to_dtype(DType::F32)?;
        let sigma = self.sigmas[i];
        let pred_original = match self.prediction {
            Prediction::Epsilon => (&sample - (&out * sigma as f64)?)?,
            Prediction::VPrediction => {
                let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
                let c_skip = 1.0 / (sigma * sigma + 1.0);
                ((&out * c_out as f64)? + (&sample * c_skip as f64)?)?
            }
            Prediction::Sample => out.clone(),
        };
        let derivative = div_scalar(&(&sample - &pred_original)?, sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        (sample + (derivative * dt as f64)?)?.to_dtype(dtype)
    }

    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }
}

/// `t / s` as a true division (candle's `Tensor / f64` multiplies by the
/// reciprocal, one rounding more than torch).
fn div_scalar(t: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    t.broadcast_div(&s)
}

fn validate(c: &SchedulerConfig) -> std::result::Result<(), ModelError> {
    if let Some(class) = &c.class_name {
        expect_one_of(FILE, "_class_name", class, &["EulerDiscreteScheduler"])?;
    }
    expect_one_of(
        FILE,
        "beta_schedule",
        &c.beta_schedule,
        &["linear", "scaled_linear", "squaredcos_cap_v2"],
    )?;
    expect_one_of(
        FILE,
        "prediction_type",
        &c.prediction_type,
        &["epsilon", "v_prediction", "sample"],
    )?;
    expect_one_of(
        FILE,
        "timestep_spacing",
        &c.timestep_spacing,
        &["linspace", "leading", "trailing"],
    )?;
    expect_one_of(
        FILE,
        "interpolation_type",
        &c.interpolation_type,
        &["linear", "log_linear"],
    )?;
    expect_one_of(FILE, "final_sigmas_type", &c.final_sigmas_type, &["zero", "sigma_min"])?;
    expect_one_of(FILE, "timestep_type", &c.timestep_type, &["discrete", "continuous"])?;
    if c.use_beta_sigmas {
        return Err(ModelError::Config {
            file: FILE.into(),
            message: "`use_beta_sigmas` = true is not supported (supported: false)".into(),
        });
    }
    if c.num_train_timesteps < 2 {
        return Err(ModelError::Config {
            file: FILE.into(),
            message: format!("`num_train_timesteps` = {} must be at least 2", c.num_train_timesteps),
        });
    }
    Ok(())
}

/// The training schedule's sigmas, one per train timestep (float32, as diffusers).
fn train_sigmas(c: &SchedulerConfig) -> std::result::Result<Vec<f32>, ModelError> {
    let n = c.num_train_timesteps;
    let mut betas: Vec<f32> = if let Some(trained) = &c.trained_betas {
        if trained.len() != n {
            return Err(ModelError::Config {
                file: FILE.into(),
                message: format!("`trained_betas` has {} values, expected {n}", trained.len()),
            });
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match c.beta_schedule.as_str() {
            "linear" => linspace_f32(c.beta_start as f32, c.beta_end as f32, n),
            "scaled_linear" => linspace_f32(c.beta_start.sqrt() as f32, c.beta_end.sqrt() as f32, n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            _ => {
                let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        }
    };
    if c.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let mut alphas_cumprod = cumprod_f32(betas.iter().map(|b| 1.0 - b));
    if c.rescale_betas_zero_snr {
        if let Some(last) = alphas_cumprod.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect())
}

/// torch's cumprod on float32: accumulated in float64, stored as float32.
fn cumprod_f32(xs: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1.0f64;
    xs.map(|x| {
        acc *= x as f64;
        acc as f32
    })
    .collect()
}

fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = cumprod_f32(betas.iter().map(|b| 1.0 - b));
    let mut sqrt: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let (a0, at) = (sqrt[0], sqrt[sqrt.len() - 1]);
    for s in &mut sqrt {
        *s = (*s - at) * (a0 / (a0 - at));
    }
    let bar: Vec<f32> = sqrt.iter().map(|s| s * s).collect();
    let mut alphas = vec![bar[0]];
    alphas.extend(bar.windows(2).map(|w| w[1] / w[0]));
    alphas.iter().map(|a| 1.0 - a).collect()
}

/// `torch.linspace` in float32: the first half counted up from `start`, the
/// second half down from `end`, in float32 arithmetic.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// `numpy.linspace` (float64).
fn linspace_f64(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| start + step * i as f64).collect();
    v[n - 1] = end;
    v
}

/// `numpy.interp(t, arange(len(ys)), ys)`.
fn interp(t: f64, ys: &[f32]) -> f64 {
    let last = ys.len() - 1;
    if t <= 0.0 {
        return ys[0] as f64;
    }
    if t >= last as f64 {
        return ys[last] as f64;
    }
    let lo = t.floor() as usize;
    let w = t - lo as f64;
    let (a, b) = (ys[lo] as f64, ys[lo + 1] as f64);
    a + (b - a) * w
}

/// diffusers' `_sigma_to_t`: the fractional train timestep of `sigma`.
fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let count = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let last_ge = log_sigmas.iter().rposition(|&l| log_sigma - l >= 0.0);
    let low_idx = if count == 0 { 0 } else { last_ge.unwrap_or(0) }.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
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
        let s = EulerDiscreteScheduler::new(&config("leading"), 4).unwrap();
        assert_eq!(s.timesteps, vec![751.0, 501.0, 251.0, 1.0]);
        let s = EulerDiscreteScheduler::new(&config("trailing"), 4).unwrap();
        assert_eq!(s.timesteps, vec![999.0, 749.0, 499.0, 249.0]);
        let s = EulerDiscreteScheduler::new(&config("linspace"), 4).unwrap();
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
        let s = EulerDiscreteScheduler::new(&c, 10).unwrap();
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
        assert!(s.timesteps.windows(2).all(|w| w[0] > w[1]));
        assert!(s.timesteps[0] <= 1000.0 && s.timesteps[9] >= 0.0);
    }

    #[test]
    fn unsupported_values_are_named() {
        let mut c = config("leading");
        c.timestep_spacing = "sideways".into();
        let err = EulerDiscreteScheduler::new(&c, 4).unwrap_err().to_string();
        assert!(err.contains("timestep_spacing") && err.contains("trailing"), "{err}");
    }

    #[test]
    fn torch_linspace_is_symmetric() {
        let v = linspace_f32(0.0, 1.0, 5);
        assert_eq!(v, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }
}
