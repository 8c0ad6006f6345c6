//! The training noise schedule every sampler starts from: betas, the running
//! product of alphas, and the training sigmas.
//!
//! Computed with torch's precision, as diffusers does in `__init__`: betas
//! from `torch.linspace` in float32 (or from float64 Python maths for
//! `squaredcos_cap_v2`, then stored as float32), `torch.cumprod` on float32
//! (accumulated in float64, stored as float32), sigmas in float32.

use super::config::{expect_one_of, ClassDefaults, SchedulerConfig, FILE};
use super::ModelError;

/// `alphas_cumprod` of the training schedule, one per train timestep.
#[derive(Debug, Clone)]
pub struct TrainSchedule {
    pub alphas_cumprod: Vec<f32>,
}

impl TrainSchedule {
    /// The schedule `c` describes, with `class`'s defaults for missing keys.
    /// `pin_terminal`: under `rescale_betas_zero_snr` the sigma-based classes
    /// (Euler, Euler a, DPM-Solver, UniPC) set the last `alphas_cumprod` to
    /// 2^-24 so that the last sigma stays finite; DDIM and LCM keep it zero.
    pub fn new(c: &SchedulerConfig, class: &ClassDefaults, pin_terminal: bool) -> Result<Self, ModelError> {
        let n = c.num_train_timesteps;
        if n < 2 {
            return Err(ModelError::Config {
                file: FILE.into(),
                message: format!("`num_train_timesteps` = {n} must be at least 2"),
            });
        }
        let mut betas: Vec<f32> = if let Some(trained) = &c.trained_betas {
            // diffusers looks at `trained_betas` first and `beta_schedule` not at all.
            if trained.len() != n {
                return Err(ModelError::Config {
                    file: FILE.into(),
                    message: format!("`trained_betas` has {} values, expected {n}", trained.len()),
                });
            }
            trained.iter().map(|&b| b as f32).collect()
        } else {
            let schedule = c.beta_schedule(class);
            expect_one_of(
                class,
                "beta_schedule",
                schedule,
                &["linear", "scaled_linear", "squaredcos_cap_v2"],
            )?;
            let (start, end) = (c.beta_start(class), c.beta_end(class));
            match schedule {
                "linear" => linspace_f32(start as f32, end as f32, n),
                "scaled_linear" => linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                _ => squaredcos_cap_v2(n),
            }
        };
        if c.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = cumprod_f32(betas.iter().map(|b| 1.0 - b));
        if c.rescale_betas_zero_snr && pin_terminal {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        Ok(Self { alphas_cumprod })
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32: the
    /// training sigma of each train timestep (increasing with the timestep).
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
    }

    /// `torch.log(alpha_t) - torch.log(sigma_t)` per train timestep (float32),
    /// which DPM-Solver's `lambda_min_clipped` searches.
    pub fn lambdas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .collect()
    }
}

/// `betas_for_alpha_bar` with the cosine transform: float64 maths, float32 betas.
fn squaredcos_cap_v2(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
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

/// `rescale_zero_terminal_snr`, step by step in float32 as torch runs it.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let cumprod = cumprod_f32(betas.iter().map(|b| 1.0 - b));
    let mut sqrt: Vec<f32> = cumprod.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    // The scale is one float32 scalar, computed before the in-place multiply.
    let scale = first / (first - last);
    for s in &mut sqrt {
        *s = (*s - last) * scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|s| s * s).collect();
    let mut alphas = vec![bar[0]];
    alphas.extend(bar.windows(2).map(|w| w[1] / w[0]));
    alphas.iter().map(|a| 1.0 - a).collect()
}

/// `torch.linspace` in float32: a float32 step, the first half counted up
/// from `start`, the second half down from `end`, each element with one
/// rounding (torch's CPU kernel is built with fused multiply-add; a plain
/// `start + step * i` is off by one ulp in about a fifth of the betas).
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - i - 1) as f32, end)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::config::EULER;

    #[test]
    fn torch_linspace_is_symmetric() {
        assert_eq!(linspace_f32(0.0, 1.0, 5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(linspace_f32(3.0, 7.0, 1), vec![3.0]);
    }

    #[test]
    fn zero_snr_ends_at_zero_or_pinned() {
        let c: SchedulerConfig = serde_json::from_str(r#"{"rescale_betas_zero_snr": true}"#).unwrap();
        let free = TrainSchedule::new(&c, &EULER, false).unwrap();
        assert_eq!(*free.alphas_cumprod.last().unwrap(), 0.0);
        let pinned = TrainSchedule::new(&c, &EULER, true).unwrap();
        assert_eq!(*pinned.alphas_cumprod.last().unwrap(), 2f32.powi(-24));
        assert!(pinned.sigmas().last().unwrap().is_finite());
    }

    #[test]
    fn bad_trained_betas_length_is_named() {
        let c: SchedulerConfig = serde_json::from_str(r#"{"trained_betas": [0.1, 0.2]}"#).unwrap();
        let err = TrainSchedule::new(&c, &EULER, true).unwrap_err().to_string();
        assert!(err.contains("trained_betas"), "{err}");
    }
}
