//! `unipc`: diffusers' `UniPCMultistepScheduler`: at each step a corrector
//! (UniC) refines the sample the previous predictor produced, using the
//! model output just computed, then a predictor (UniP) takes the next step.
//!
//! Reads `num_train_timesteps`, the betas, `prediction_type`,
//! `timestep_spacing`, `steps_offset`, `rescale_betas_zero_snr`,
//! `solver_order` (default 2), `solver_type` (bh1, bh2; DPM's types map to
//! bh2), `predict_x0`, `lower_order_final`, `disable_corrector`,
//! `use_karras_sigmas`, `use_exponential_sigmas`, `sigma_min`, `sigma_max`
//! and `final_sigmas_type`. Thresholding, flow sigmas, dynamic shifting,
//! `shift_terminal` and beta sigmas are rejected.
//!
//! Orders: the predictor of step `i` has order `min(solver_order, len - i,
//! steps run so far + 1)` (without the `len - i` term when
//! `lower_order_final` is off); the corrector of step `i` reuses the
//! predictor order of step `i - 1`, and there is none on the first step
//! after the begin index or after a step listed in `disable_corrector`. The
//! last step's predictor output is returned uncorrected.

use candle_core::{Result, Tensor};

use super::config::{
    expect_false, expect_final_sigmas, expect_one_of, expect_sigma_ramp, expect_spacing, prediction, unsupported,
    Prediction, SchedulerConfig, UNIPC,
};
use super::dpm_solver::{alpha_sigma, alpha_sigma_add_noise, data_prediction, lambda};
use super::ops::{check_index, div, f32_copy, lin2, mul, step_noise, Progress};
use super::schedule::TrainSchedule;
use super::timesteps::{exponential_sigmas, interp, karras_sigmas, log_sigmas, multistep_spacing, sigma_to_t};
use super::{ModelError, Sampler};

/// One generation's UniPC schedule and solver history.
#[derive(Debug, Clone)]
pub struct UniPc {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    predict_x0: bool,
    bh2: bool,
    solver_order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// Converted model outputs of the last `solver_order` steps, newest last.
    history: Vec<Tensor>,
    /// The sample the last predictor started from (after its correction).
    last_sample: Option<Tensor>,
    this_order: usize,
    lower_order_nums: usize,
    progress: Progress,
}

impl UniPc {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> std::result::Result<Self, ModelError> {
        let c = config;
        let class = &UNIPC;
        let prediction = prediction(c, class, &["epsilon", "sample", "v_prediction"])?;
        expect_spacing(c, class)?;
        expect_final_sigmas(c, class)?;
        expect_sigma_ramp(c, class)?;
        expect_false(class, "thresholding", c.thresholding)?;
        expect_false(class, "use_flow_sigmas", c.use_flow_sigmas)?;
        expect_false(class, "use_dynamic_shifting", c.use_dynamic_shifting)?;
        if let Some(v) = c.shift_terminal {
            return Err(unsupported(class, "shift_terminal", v, "null"));
        }
        let solver_type = c.solver_type(class);
        expect_one_of(
            class,
            "solver_type",
            solver_type,
            &["bh1", "bh2", "midpoint", "heun", "logrho"],
        )?;
        if c.solver_order == 0 {
            return Err(unsupported(class, "solver_order", 0, "1 or more"));
        }
        // Toward a zero final sigma diffusers' last step is infinite (a
        // multistep predictor over an infinite log-SNR gap) or NaN (noise
        // prediction times that gap): refuse what it would run into garbage.
        if c.final_sigmas_type == "zero" {
            if !c.lower_order_final && c.solver_order > 1 {
                return Err(unsupported(
                    class,
                    "lower_order_final",
                    false,
                    "true, unless `final_sigmas_type` is \"sigma_min\" or `solver_order` is 1",
                ));
            }
            if !c.predict_x0 {
                return Err(unsupported(
                    class,
                    "predict_x0",
                    false,
                    "true, unless `final_sigmas_type` is \"sigma_min\"",
                ));
            }
        }

        let train_sigmas = TrainSchedule::new(c, class, true)?.sigmas();
        let n_train = c.num_train_timesteps;
        let n = num_inference_steps;
        let mut timesteps = multistep_spacing(c.timestep_spacing(class), n_train, n_train, n, c.steps_offset);
        let sigma_last;
        let mut sigmas: Vec<f64> = if c.use_karras_sigmas || c.use_exponential_sigmas {
            let logs = log_sigmas(&train_sigmas);
            let sigma_min = c.sigma_min.unwrap_or(train_sigmas[0] as f64);
            let sigma_max = c.sigma_max.unwrap_or(train_sigmas[n_train - 1] as f64);
            let sigmas = if c.use_karras_sigmas {
                karras_sigmas(sigma_min, sigma_max, n)
            } else {
                exponential_sigmas(sigma_min, sigma_max, n)
            };
            // Karras timesteps are rounded; exponential ones truncated by the cast.
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &logs);
                    (if c.use_karras_sigmas { t.round_ties_even() } else { t }) as i64
                })
                .collect();
            // Here "sigma_min" ends on the ramp's own last sigma.
            sigma_last = sigmas[n - 1];
            sigmas
        } else {
            sigma_last = train_sigmas[0] as f64;
            timesteps.iter().map(|&t| interp(t as f64, &train_sigmas)).collect()
        };
        sigmas.push(if c.final_sigmas_type == "sigma_min" {
            sigma_last
        } else {
            0.0
        });
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction,
            predict_x0: c.predict_x0,
            bh2: solver_type != "bh1",
            solver_order: c.solver_order,
            lower_order_final: c.lower_order_final,
            disable_corrector: c.disable_corrector.clone(),
            history: Vec::new(),
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
            progress: Progress::default(),
        })
    }

    /// `convert_model_output`: the data prediction, or with `predict_x0`
    /// off, the noise prediction.
    fn convert(&self, i: usize, out: &Tensor, sample: &Tensor) -> Result<Tensor> {
        if self.predict_x0 {
            return data_prediction(self.prediction, self.sigmas[i], out, sample);
        }
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        match self.prediction {
            Prediction::Epsilon => Ok(out.clone()),
            Prediction::Sample => div(&(sample - mul(out, alpha_t)?)?, sigma_t),
            Prediction::Velocity => lin2(alpha_t, out, sigma_t, sample),
        }
    }

    /// The coefficients shared by UniP and UniC for a step from sigma `s0`
    /// to sigma `t`, with earlier points at `earlier` (sigma indices, each
    /// paired with the history entry `-(k + 1)`), and the `D1` differences.
    fn coefficients(&self, t: usize, s0: usize, earlier: &[usize], m0: &Tensor) -> Result<Coefficients> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[s0]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let mut rks = Vec::with_capacity(earlier.len() + 1);
        let mut d1s = Vec::with_capacity(earlier.len());
        for (k, &si) in earlier.iter().enumerate() {
            let mi = &self.history[self.history.len() - (k + 2)];
            let (alpha_si, sigma_si) = alpha_sigma(self.sigmas[si]);
            let rk = (lambda(alpha_si, sigma_si) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div(&(mi - m0)?, rk)?);
        }
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let order = rks.len();
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        let mut factorial: u64 = 1;
        for k in 1..=order {
            r.push(rks.iter().map(|&x| pow_int(x, k - 1)).collect::<Vec<f32>>());
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= k as u64 + 1;
            // `1 / factorial_i` is a Python float, rounded to float32 by torch.
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        // x_t_ = ratio * x - phi * m0, with the ratio and phi of x0 or eps mode.
        let (ratio, phi, scale) = if self.predict_x0 {
            (sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h)
        } else {
            (alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * b_h)
        };
        Ok(Coefficients {
            r,
            b,
            d1s,
            ratio,
            phi,
            scale,
        })
    }

    /// UniP: the predictor from step `i` with `order`, from `x` (history
    /// already holds step `i`'s converted output).
    fn predict(&self, i: usize, x: &Tensor, order: usize) -> Result<Tensor> {
        let m0 = &self.history[self.history.len() - 1];
        let earlier: Vec<usize> = (1..order).map(|k| i - k).collect();
        let co = self.coefficients(i + 1, i, &earlier, m0)?;
        let x_t = lin2(co.ratio, x, -co.phi, m0)?;
        if co.d1s.is_empty() {
            return Ok(x_t);
        }
        let rhos: Vec<f32> = if order == 2 {
            vec![0.5]
        } else {
            let n = order - 1;
            let r: Vec<Vec<f32>> = co.r[..n].iter().map(|row| row[..n].to_vec()).collect();
            solve(r, co.b[..n].to_vec())
        };
        x_t - mul(&weighted_sum(&rhos, &co.d1s)?, co.scale)?
    }

    /// UniC: the corrected sample at step `i`, in place of the previous
    /// predictor's output: recomputed from `last_sample` (where that
    /// predictor started) with step `i`'s converted output `model_t` added to
    /// the history it used (`model_t` joins the history only afterwards).
    fn correct(&self, i: usize, model_t: &Tensor, last_sample: &Tensor, order: usize) -> Result<Tensor> {
        let m0 = &self.history[self.history.len() - 1];
        let earlier: Vec<usize> = (1..order).map(|k| i - (k + 1)).collect();
        let co = self.coefficients(i, i - 1, &earlier, m0)?;
        let rhos = if order == 1 { vec![0.5] } else { solve(co.r, co.b) };
        let x_t = lin2(co.ratio, last_sample, -co.phi, m0)?;
        let d1_t = (model_t - m0)?;
        let last = mul(&d1_t, rhos[rhos.len() - 1])?;
        let res = if co.d1s.is_empty() {
            last
        } else {
            (weighted_sum(&rhos[..rhos.len() - 1], &co.d1s)? + last)?
        };
        x_t - mul(&res, co.scale)?
    }
}

/// The per-step scalars and differences UniP and UniC share.
struct Coefficients {
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
    d1s: Vec<Tensor>,
    ratio: f32,
    phi: f32,
    scale: f32,
}

/// `torch.pow(x, k)` for the small integer powers UniPC uses.
fn pow_int(x: f32, k: usize) -> f32 {
    match k {
        0 => 1.0,
        1 => x,
        2 => x * x,
        3 => x * x * x,
        _ => x.powi(k as i32),
    }
}

/// `einsum('k,bkc...->bc...', rhos, D1s)`: the weighted sum, in order.
fn weighted_sum(rhos: &[f32], d1s: &[Tensor]) -> Result<Tensor> {
    let mut acc = mul(&d1s[0], rhos[0])?;
    for (rho, d) in rhos.iter().zip(d1s).skip(1) {
        acc = (acc + mul(d, *rho)?)?;
    }
    Ok(acc)
}

/// `torch.linalg.solve` on a small float32 system: LU with partial pivoting
/// (LAPACK's getrf/getrs order: the column scaled by the pivot's reciprocal,
/// then forward and back substitution).
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for j in 0..n {
        let p = (j..n).fold(j, |p, r| if a[r][j].abs() > a[p][j].abs() { r } else { p });
        a.swap(j, p);
        b.swap(j, p);
        let inv = 1.0 / a[j][j];
        for r in j + 1..n {
            a[r][j] *= inv;
            for col in j + 1..n {
                a[r][col] -= a[r][j] * a[j][col];
            }
        }
    }
    for j in 0..n {
        for r in j + 1..n {
            b[r] -= b[j] * a[r][j];
        }
    }
    for k in (0..n).rev() {
        b[k] /= a[k][k];
        for r in 0..k {
            b[r] -= b[k] * a[r][k];
        }
    }
    b
}

impl Sampler for UniPc {
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

    fn step_needs_noise(&self, _i: usize) -> bool {
        false
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let len = self.timesteps.len();
        check_index(i, len)?;
        step_noise(false, noise, i)?;
        self.progress.advance(i)?;
        let dtype = sample.dtype();
        let mut sample = f32_copy(sample)?;
        let converted = self.convert(i, &f32_copy(model_output)?, &sample)?;
        if let Some(last) = &self.last_sample {
            if i > 0 && !self.disable_corrector.contains(&(i - 1)) {
                sample = self.correct(i, &converted, last, self.this_order)?;
            }
        }
        self.history.push(converted);
        if self.history.len() > self.solver_order {
            self.history.remove(0);
        }
        let order = if self.lower_order_final {
            self.solver_order.min(len - i)
        } else {
            self.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predict(i, &sample, self.this_order)?;
        self.last_sample = Some(sample);
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
        prev.to_dtype(dtype)
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

    #[test]
    fn solve_pivots() {
        let x = solve(vec![vec![1.0, 1.0], vec![-2.0, 1.0]], vec![3.0, 0.0]);
        assert!((x[0] - 1.0).abs() < 1e-6 && (x[1] - 2.0).abs() < 1e-6, "{x:?}");
        let x = solve(
            vec![vec![2.0, 1.0, 1.0], vec![4.0, -6.0, 0.0], vec![-2.0, 7.0, 2.0]],
            vec![5.0, -2.0, 9.0],
        );
        assert!(
            x.iter().zip([1.0, 1.0, 2.0]).all(|(a, b)| (a - b).abs() < 1e-5),
            "{x:?}"
        );
    }

    #[test]
    fn rejects_flow_and_unknown_solver_types() {
        let c: SchedulerConfig = serde_json::from_str(r#"{"solver_type": "bh3"}"#).unwrap();
        let err = UniPc::new(&c, 4).unwrap_err().to_string();
        assert!(err.contains("solver_type") && err.contains("bh2"), "{err}");
        let c: SchedulerConfig = serde_json::from_str(r#"{"use_flow_sigmas": true}"#).unwrap();
        assert!(UniPc::new(&c, 4).is_err());
    }

    #[test]
    fn refuses_last_steps_diffusers_makes_infinite() {
        let c: SchedulerConfig = serde_json::from_str(r#"{"lower_order_final": false}"#).unwrap();
        let err = UniPc::new(&c, 4).unwrap_err().to_string();
        assert!(err.contains("`lower_order_final` = false"), "{err}");
        let c: SchedulerConfig = serde_json::from_str(r#"{"predict_x0": false}"#).unwrap();
        assert!(UniPc::new(&c, 4).unwrap_err().to_string().contains("predict_x0"));
        let c: SchedulerConfig = serde_json::from_str(
            r#"{"predict_x0": false, "lower_order_final": false, "final_sigmas_type": "sigma_min"}"#,
        )
        .unwrap();
        assert!(UniPc::new(&c, 4).is_ok());
    }
}
