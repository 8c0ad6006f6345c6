//! `dpmpp_2m`, `dpmpp_2m_karras`, `dpmpp_2m_sde_karras`: diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type` "dpmsolver++" or
//! "sde-dpmsolver++" and `solver_order` 2: a multistep solver on the data
//! prediction (`x0`) that keeps the previous step's `x0`.
//!
//! Reads `num_train_timesteps`, the betas, `prediction_type`,
//! `timestep_spacing`, `steps_offset`, `rescale_betas_zero_snr`,
//! `use_karras_sigmas` (forced on by the Karras samplers),
//! `use_exponential_sigmas`, `sigma_min` / `sigma_max` (which
//! `from_config` carries over from an Euler config), `final_sigmas_type`,
//! `solver_type` (midpoint, heun), `lower_order_final`, `euler_at_final` and
//! `lambda_min_clipped`. `thresholding`, `variance_type`, `use_lu_lambdas`,
//! flow sigmas, dynamic shifting and beta sigmas are rejected.
//!
//! The order of each step: first order on the first step after the begin
//! index, and on the last step when `final_sigmas_type` is "zero" (always
//! the case for the SDXL config), or `euler_at_final`, or
//! `lower_order_final` with fewer than 15 steps in the *whole* schedule;
//! second order otherwise.

use candle_core::{Result, Tensor};

use super::config::{
    expect_false, expect_final_sigmas, expect_one_of, expect_sigma_ramp, expect_spacing, prediction, unsupported,
    Prediction, SchedulerConfig, DPM_SOLVER, FILE,
};
use super::ops::{check_index, div, f32_copy, lin2, lin2_tensors, mul, scalar_in, step_noise, Progress};
use super::schedule::TrainSchedule;
use super::timesteps::{exponential_sigmas, interp, karras_sigmas, log_sigmas, multistep_spacing, sigma_to_t};
use super::{ModelError, Sampler};

/// One generation's DPM-Solver++ schedule and its one step of history.
#[derive(Debug, Clone)]
pub struct DpmSolver {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    sde: bool,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    /// The previous step's data prediction.
    previous_x0: Option<Tensor>,
    lower_order_nums: usize,
    progress: Progress,
}

impl DpmSolver {
    /// `karras`: the `use_karras_sigmas=True` override; `sde`: the
    /// "sde-dpmsolver++" algorithm instead of "dpmsolver++".
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        karras: bool,
        sde: bool,
    ) -> std::result::Result<Self, ModelError> {
        let c = config;
        let class = &DPM_SOLVER;
        let prediction = prediction(c, class, &["epsilon", "sample", "v_prediction"])?;
        expect_spacing(c, class)?;
        expect_final_sigmas(c, class)?;
        let mut ramp_config = c.clone();
        ramp_config.use_karras_sigmas |= karras;
        expect_sigma_ramp(&ramp_config, class)?;
        expect_false(class, "thresholding", c.thresholding)?;
        expect_false(class, "use_lu_lambdas", c.use_lu_lambdas)?;
        expect_false(class, "use_flow_sigmas", c.use_flow_sigmas)?;
        expect_false(class, "use_dynamic_shifting", c.use_dynamic_shifting)?;
        if let Some(v) = &c.variance_type {
            return Err(unsupported(class, "variance_type", format!("{v:?}"), "null"));
        }
        // diffusers maps UniPC's and DEIS's solver types to midpoint.
        let solver_type = c.solver_type(class);
        expect_one_of(
            class,
            "solver_type",
            solver_type,
            &["midpoint", "heun", "logrho", "bh1", "bh2"],
        )?;

        let schedule = TrainSchedule::new(c, class, true)?;
        let train_sigmas = schedule.sigmas();
        let n_train = c.num_train_timesteps;
        let n = num_inference_steps;
        // `searchsorted(flip(lambda_t), lambda_min_clipped)`, compared in float64.
        let clipped = c.lambda_min_clipped.map_or(0, |min| {
            schedule.lambdas().iter().filter(|&&l| (l as f64) < min).count()
        });
        let last_timestep = n_train - clipped;
        if last_timestep == 0 {
            return Err(ModelError::Config {
                file: FILE.into(),
                message: format!(
                    "`lambda_min_clipped` = {} clips away the whole schedule",
                    c.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY)
                ),
            });
        }
        let mut timesteps = multistep_spacing(c.timestep_spacing(class), n_train, last_timestep, n, c.steps_offset);
        let mut sigmas: Vec<f64> = if ramp_config.use_karras_sigmas || c.use_exponential_sigmas {
            let logs = log_sigmas(&train_sigmas);
            let sigma_min = c.sigma_min.unwrap_or(train_sigmas[0] as f64);
            let sigma_max = c.sigma_max.unwrap_or(train_sigmas[n_train - 1] as f64);
            let sigmas = if ramp_config.use_karras_sigmas {
                karras_sigmas(sigma_min, sigma_max, n)
            } else {
                exponential_sigmas(sigma_min, sigma_max, n)
            };
            // Karras timesteps are rounded (except for the cosine schedule);
            // exponential ones are truncated by the cast to int64.
            let round = ramp_config.use_karras_sigmas && c.beta_schedule(class) != "squaredcos_cap_v2";
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &logs);
                    (if round { t.round_ties_even() } else { t }) as i64
                })
                .collect();
            sigmas
        } else {
            timesteps.iter().map(|&t| interp(t as f64, &train_sigmas)).collect()
        };
        let final_zero = c.final_sigmas_type == "zero";
        sigmas.push(if final_zero { 0.0 } else { train_sigmas[0] as f64 });
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction,
            sde,
            heun: solver_type == "heun",
            lower_order_final: c.lower_order_final,
            euler_at_final: c.euler_at_final,
            final_zero,
            previous_x0: None,
            lower_order_nums: 0,
            progress: Progress::default(),
        })
    }

    /// First-order (DDIM-like) update from `sigmas[i]` to `sigmas[i + 1]`.
    fn first_order(&self, i: usize, x0: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match noise {
            None => lin2(sigma_t / sigma_s, sample, -(alpha_t * ((-h).exp() - 1.0)), x0),
            Some(noise) => {
                let x = lin2(
                    sigma_t / sigma_s * (-h).exp(),
                    sample,
                    alpha_t * (1.0 - (-2.0 * h).exp()),
                    x0,
                )?;
                x + mul(noise, sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())?
            }
        }
    }

    /// Second-order multistep update, with the previous step's `x0` as `m1`.
    fn second_order(
        &self,
        i: usize,
        m0: &Tensor,
        m1: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (lambda_t, lambda_s0) = (lambda(alpha_t, sigma_t), lambda(alpha_s0, sigma_s0));
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        match noise {
            None => {
                let phi = alpha_t * ((-h).exp() - 1.0);
                let x = lin2(sigma_t / sigma_s0, sample, -phi, m0)?;
                if self.heun {
                    x + mul(&d1, alpha_t * (((-h).exp() - 1.0) / h + 1.0))?
                } else {
                    x - mul(&d1, 0.5 * phi)?
                }
            }
            Some(noise) => {
                let phi = alpha_t * (1.0 - (-2.0 * h).exp());
                let x = lin2(sigma_t / sigma_s0 * (-h).exp(), sample, phi, m0)?;
                let x = if self.heun {
                    (x + mul(&d1, alpha_t * ((1.0 - (-2.0 * h).exp()) / (-2.0 * h) + 1.0))?)?
                } else {
                    (x + mul(&d1, 0.5 * phi)?)?
                };
                x + mul(noise, sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())?
            }
        }
    }
}

/// `_sigma_to_alpha_sigma_t` in float32: `alpha_t = 1 / (sigma ** 2 + 1) ** 0.5`,
/// `sigma_t = sigma * alpha_t`.
pub fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `log(alpha_t) - log(sigma_t)` (infinite at sigma 0, as in torch).
pub fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// The data prediction `x0` from the model output at sigma (`convert_model_output`).
pub fn data_prediction(prediction: Prediction, sigma: f32, out: &Tensor, sample: &Tensor) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    match prediction {
        Prediction::Epsilon => div(&(sample - mul(out, sigma_t)?)?, alpha_t),
        Prediction::Sample => Ok(out.clone()),
        Prediction::Velocity => lin2(alpha_t, sample, -sigma_t, out),
    }
}

/// The sigma classes' `add_noise` (DPM-Solver, UniPC): `alpha_t * original +
/// sigma_t * noise`, with the scalars computed in the original's dtype as
/// diffusers casts the sigmas to it.
pub fn alpha_sigma_add_noise(original: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    let sigma = scalar_in(sigma, original.dtype())?;
    let alpha = (sigma.sqr()? + 1.0)?.sqrt()?.recip()?;
    let sigma_t = (&sigma * &alpha)?;
    lin2_tensors(&alpha, original, &sigma_t, &noise.to_dtype(original.dtype())?)
}

impl Sampler for DpmSolver {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn order(&self) -> usize {
        1
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step_needs_noise(&self, i: usize) -> bool {
        self.sde && i < self.timesteps.len()
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let len = self.timesteps.len();
        check_index(i, len)?;
        let noise = step_noise(self.step_needs_noise(i), noise, i)?;
        self.progress.advance(i)?;
        let dtype = sample.dtype();
        let sample = f32_copy(sample)?;
        let x0 = data_prediction(self.prediction, self.sigmas[i], &f32_copy(model_output)?, &sample)?;
        // The rules use the length of the whole schedule, not of the steps left.
        let lower_order_final =
            i == len - 1 && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_zero);
        let previous = self.previous_x0.replace(x0.clone());
        let prev_sample = match previous {
            Some(m1) if self.lower_order_nums >= 1 && !lower_order_final => {
                self.second_order(i, &x0, &m1, &sample, noise.as_ref())?
            }
            _ => self.first_order(i, &x0, &sample, noise.as_ref())?,
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        prev_sample.to_dtype(dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        alpha_sigma_add_noise(original, noise, self.sigmas[i])
    }

    fn set_begin_index(&mut self, i: usize) {
        self.progress.set_begin(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl() -> SchedulerConfig {
        serde_json::from_value(serde_json::json!({
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "timestep_spacing": "leading", "steps_offset": 1, "sigma_min": null
        }))
        .unwrap()
    }

    #[test]
    fn leading_spacing_splits_into_n_plus_one() {
        let s = DpmSolver::new(&sdxl(), 20, false, false).unwrap();
        assert_eq!(s.timesteps[0], 941.0);
        assert_eq!(s.timesteps[19], 48.0);
        assert_eq!(s.sigmas.len(), 21);
    }

    #[test]
    fn karras_uses_a_configured_sigma_min() {
        let mut c = sdxl();
        c.sigma_min = Some(0.1);
        let s = DpmSolver::new(&c, 10, true, false).unwrap();
        assert!((s.sigmas[9] - 0.1).abs() < 1e-7);
    }

    #[test]
    fn karras_with_exponential_is_rejected() {
        let mut c = sdxl();
        c.use_exponential_sigmas = true;
        let err = DpmSolver::new(&c, 10, true, false).unwrap_err().to_string();
        assert!(err.contains("use_exponential_sigmas"), "{err}");
        c.use_exponential_sigmas = false;
        c.variance_type = Some("learned_range".into());
        let err = DpmSolver::new(&c, 10, true, false).unwrap_err().to_string();
        assert!(err.contains("variance_type") && err.contains("learned_range"), "{err}");
    }
}
