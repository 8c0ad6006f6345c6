//! The inference timesteps and sigmas: each class family's `timestep_spacing`
//! rule, the Karras and exponential sigma ramps, and the numpy routines they
//! are written in (`linspace`, float `arange`, `interp`, `round`), reproduced
//! with numpy's own arithmetic so that integer timesteps come out identical.
//!
//! numpy rounds half to even (`np.round`), builds a float `arange` as
//! `start + i * delta`, and `np.log` of the float32 training sigmas stays in
//! float32; each of these shows up in some step count or config.

/// `numpy.linspace(start, end, n, endpoint)` in float64.
pub fn linspace_f64(start: f64, end: f64, n: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { n.saturating_sub(1) } else { n };
    if div == 0 {
        return vec![start; n];
    }
    let step = (end - start) / div as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    if endpoint && n > 1 {
        v[n - 1] = end;
    }
    v
}

/// `numpy.arange(start, stop, step)` for a float step: the length is
/// `ceil((stop - start) / step)`, and element `i` is `start + i * delta`
/// with `delta = (start + step) - start`, as numpy fills it.
pub fn arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `numpy.interp(t, arange(len(ys)), ys)` in float64.
pub fn interp(t: f64, ys: &[f32]) -> f64 {
    let last = ys.len() - 1;
    if t <= 0.0 {
        return ys[0] as f64;
    }
    if t >= last as f64 {
        return ys[last] as f64;
    }
    let lo = t.floor() as usize;
    if t == lo as f64 {
        return ys[lo] as f64;
    }
    let (a, b) = (ys[lo] as f64, ys[lo + 1] as f64);
    (b - a) * (t - lo as f64) + a
}

/// The discrete classes' `timestep_spacing` rule over `n` steps (Euler, Euler
/// a, DDIM), before any class-specific cast: "linspace" is
/// `linspace(0, n_train - 1, n)`, "leading" `arange(n) * (n_train // n) +
/// offset`, "trailing" `round(arange(n_train, 0, -n_train / n)) - 1`.
/// "linspace" is left unrounded (Euler keeps it fractional, DDIM rounds it).
pub fn single_step_spacing(spacing: &str, n_train: usize, n: usize, steps_offset: usize) -> Vec<f64> {
    match spacing {
        "linspace" => linspace_f64(0.0, (n_train - 1) as f64, n, true)
            .into_iter()
            .rev()
            .collect(),
        "leading" => {
            let ratio = n_train / n;
            (0..n).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
        }
        _ => arange_f64(n_train as f64, 0.0, -(n_train as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    }
}

/// The multistep solvers' spacing (DPM-Solver, UniPC): `n + 1` points with
/// the last dropped, up to `last_timestep` (below `n_train` only when
/// DPM-Solver's `lambda_min_clipped` cuts the schedule), as integers.
pub fn multistep_spacing(
    spacing: &str,
    n_train: usize,
    last_timestep: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<i64> {
    match spacing {
        "linspace" => {
            // `[::-1][:-1]`: reversed, then the zero at the end dropped.
            let v = linspace_f64(0.0, last_timestep as f64 - 1.0, n + 1, true);
            v.into_iter()
                .skip(1)
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect()
        }
        "leading" => {
            let ratio = last_timestep / (n + 1);
            (1..=n).rev().map(|i| (i * ratio + steps_offset) as i64).collect()
        }
        _ => arange_f64(last_timestep as f64, 0.0, -(n_train as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() as i64 - 1)
            .collect(),
    }
}

/// `_convert_to_karras`: `n` sigmas from `sigma_max` down to `sigma_min`,
/// evenly spaced in `sigma ** (1 / 7)` (float64).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace_f64(0.0, 1.0, n, true)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// `_convert_to_exponential`: `n` sigmas evenly spaced in log (float64).
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    linspace_f64(sigma_max.ln(), sigma_min.ln(), n, true)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// `np.log` of the float32 training sigmas: numpy keeps float32.
pub fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|&s| s.ln()).collect()
}

/// `_sigma_to_t`: the fractional train timestep of `sigma` (float64), by
/// linear interpolation in log sigma. As in numpy, `low - high` is a float32
/// difference and the rest is float64.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of the cumulative count of `log_sigma - log_sigmas >= 0`: the
    // first index where the count reaches its maximum.
    let (mut count, mut best, mut low_idx) = (0usize, 0usize, 0usize);
    for (j, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low_idx = j;
        }
    }
    let low_idx = low_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_rounds_half_to_even() {
        // 1000 / 16 = 62.5: trailing spacing for 16 steps has halves.
        let ts = single_step_spacing("trailing", 1000, 16, 0);
        assert_eq!(&ts[..4], &[999.0, 937.0, 874.0, 811.0]);
        assert_eq!(ts.len(), 16);
    }

    #[test]
    fn spacings_match_diffusers() {
        assert_eq!(
            single_step_spacing("leading", 1000, 4, 1),
            vec![751.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(
            single_step_spacing("trailing", 1000, 4, 1),
            vec![999.0, 749.0, 499.0, 249.0]
        );
        assert_eq!(
            single_step_spacing("linspace", 1000, 4, 1),
            vec![999.0, 666.0, 333.0, 0.0]
        );
        assert_eq!(multistep_spacing("leading", 1000, 1000, 4, 1), vec![801, 601, 401, 201]);
        assert_eq!(
            multistep_spacing("linspace", 1000, 1000, 4, 0),
            vec![999, 749, 500, 250]
        );
        assert_eq!(
            multistep_spacing("trailing", 1000, 1000, 4, 0),
            vec![999, 749, 499, 249]
        );
    }

    #[test]
    fn arange_matches_numpy_length_and_values() {
        assert_eq!(arange_f64(1000.0, 0.0, -250.0), vec![1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(arange_f64(0.0, 1.0, 0.5), vec![0.0, 0.5]);
        assert!(arange_f64(0.0, -1.0, 0.5).is_empty());
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let sigmas: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        let logs = log_sigmas(&sigmas);
        // Not exactly 2: numpy's float32 logs against a float64 log.
        assert!((sigma_to_t(3.0, &logs) - 2.0).abs() < 1e-6);
        assert_eq!(sigma_to_t(0.5, &logs), 0.0);
        assert_eq!(sigma_to_t(20.0, &logs), 9.0);
    }
}
