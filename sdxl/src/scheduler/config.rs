//! `scheduler/scheduler_config.json` as a serde struct, with every key that
//! the eight sampler classes read, and the checks that name an unsupported
//! value.
//!
//! diffusers builds a sampler as `Class.from_config(model_config, **overrides)`:
//! a key present in the file is used by every class that accepts it, and a key
//! missing from the file gets *that class's* default. Most defaults agree
//! across the classes; where they differ (betas and `beta_schedule` for LCM,
//! `timestep_spacing` for DDIM and LCM, `clip_sample`, `solver_type`) the field
//! is an `Option` and [`ClassDefaults`] supplies the class's value.
//!
//! `sigma_min` / `sigma_max` are Euler keys that DPM-Solver does not accept,
//! yet `from_config` still registers them in its config and its Karras ramp
//! reads them from there, so one field serves all classes.

use serde::Deserialize;
use std::fmt::Display;

use super::ModelError;

/// The file every error names.
pub const FILE: &str = "scheduler/scheduler_config.json";

/// `scheduler/scheduler_config.json`: the keys any of the eight classes reads.
/// Keys the file has and no class reads (`_diffusers_version`, ...) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// The class the model shipped with; any class's config can build any
    /// sampler (as `from_config` allows), so this is informational only.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    /// Default 0.0001 (LCM: 0.00085).
    #[serde(default)]
    pub beta_start: Option<f64>,
    /// Default 0.02 (LCM: 0.012).
    #[serde(default)]
    pub beta_end: Option<f64>,
    /// Default "linear" (LCM: "scaled_linear").
    #[serde(default)]
    pub beta_schedule: Option<String>,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    /// Default "linspace" (DDIM, LCM: "leading"; LCM ignores it).
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,

    // Sigma schedules (Euler, DPM-Solver, UniPC).
    #[serde(default = "linear")]
    pub interpolation_type: String,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub sigma_min: Option<f64>,
    #[serde(default)]
    pub sigma_max: Option<f64>,
    #[serde(default = "discrete")]
    pub timestep_type: String,
    #[serde(default = "zero")]
    pub final_sigmas_type: String,

    // DDIM and LCM.
    /// Default true for DDIM, false for LCM.
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub thresholding: bool,

    // Multistep solvers (DPM-Solver, UniPC).
    /// UniPC's order (the DPM++ 2M samplers always use 2, as their name says).
    #[serde(default = "two")]
    pub solver_order: usize,
    /// Default "midpoint" for DPM-Solver, "bh2" for UniPC.
    #[serde(default)]
    pub solver_type: Option<String>,
    #[serde(default = "yes")]
    pub lower_order_final: bool,
    #[serde(default)]
    pub euler_at_final: bool,
    /// `None` is diffusers' default of minus infinity (no clipping).
    #[serde(default)]
    pub lambda_min_clipped: Option<f64>,
    #[serde(default)]
    pub variance_type: Option<String>,
    #[serde(default)]
    pub use_lu_lambdas: bool,
    #[serde(default)]
    pub use_flow_sigmas: bool,
    #[serde(default)]
    pub use_dynamic_shifting: bool,

    // UniPC.
    #[serde(default = "yes")]
    pub predict_x0: bool,
    #[serde(default)]
    pub disable_corrector: Vec<usize>,
    #[serde(default)]
    pub shift_terminal: Option<f64>,

    // LCM.
    #[serde(default = "fifty")]
    pub original_inference_steps: usize,
    #[serde(default = "ten")]
    pub timestep_scaling: f64,
}

/// What one diffusers class calls itself in errors, and the defaults it gives
/// the keys whose default differs between classes.
#[derive(Debug, Clone, Copy)]
pub struct ClassDefaults {
    pub name: &'static str,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
    pub timestep_spacing: &'static str,
    pub clip_sample: bool,
    pub solver_type: &'static str,
}

const BASE: ClassDefaults = ClassDefaults {
    name: "",
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: "linear",
    timestep_spacing: "linspace",
    clip_sample: false,
    solver_type: "",
};

pub const EULER: ClassDefaults = ClassDefaults {
    name: "EulerDiscreteScheduler",
    ..BASE
};
pub const EULER_ANCESTRAL: ClassDefaults = ClassDefaults {
    name: "EulerAncestralDiscreteScheduler",
    ..BASE
};
pub const DDIM: ClassDefaults = ClassDefaults {
    name: "DDIMScheduler",
    timestep_spacing: "leading",
    clip_sample: true,
    ..BASE
};
pub const DPM_SOLVER: ClassDefaults = ClassDefaults {
    name: "DPMSolverMultistepScheduler",
    solver_type: "midpoint",
    ..BASE
};
pub const UNIPC: ClassDefaults = ClassDefaults {
    name: "UniPCMultistepScheduler",
    solver_type: "bh2",
    ..BASE
};
pub const LCM: ClassDefaults = ClassDefaults {
    name: "LCMScheduler",
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: "scaled_linear",
    timestep_spacing: "leading",
    ..BASE
};

impl Default for SchedulerConfig {
    /// Every key missing: each class's own defaults.
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a serde default")
    }
}

impl SchedulerConfig {
    pub fn beta_start(&self, class: &ClassDefaults) -> f64 {
        self.beta_start.unwrap_or(class.beta_start)
    }

    pub fn beta_end(&self, class: &ClassDefaults) -> f64 {
        self.beta_end.unwrap_or(class.beta_end)
    }

    pub fn beta_schedule<'a>(&'a self, class: &ClassDefaults) -> &'a str {
        self.beta_schedule.as_deref().unwrap_or(class.beta_schedule)
    }

    pub fn timestep_spacing<'a>(&'a self, class: &ClassDefaults) -> &'a str {
        self.timestep_spacing.as_deref().unwrap_or(class.timestep_spacing)
    }

    pub fn clip_sample(&self, class: &ClassDefaults) -> bool {
        self.clip_sample.unwrap_or(class.clip_sample)
    }

    pub fn solver_type<'a>(&'a self, class: &ClassDefaults) -> &'a str {
        self.solver_type.as_deref().unwrap_or(class.solver_type)
    }
}

/// The config error for `key` = `value` that `class` cannot do here.
pub fn unsupported(class: &ClassDefaults, key: &str, value: impl Display, supported: &str) -> ModelError {
    ModelError::Config {
        file: FILE.to_string(),
        message: format!(
            "`{key}` = {value} is not supported by {} (supported: {supported})",
            class.name
        ),
    }
}

/// Fails with a config error unless `value` is one of `allowed`.
pub fn expect_one_of(class: &ClassDefaults, key: &str, value: &str, allowed: &[&str]) -> Result<(), ModelError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(unsupported(class, key, format!("{value:?}"), &allowed.join(", ")))
    }
}

/// Fails with a config error when a boolean option this port does not do is on.
pub fn expect_false(class: &ClassDefaults, key: &str, value: bool) -> Result<(), ModelError> {
    if value {
        Err(unsupported(class, key, true, "false"))
    } else {
        Ok(())
    }
}

/// What the model predicts, from `prediction_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// The noise ("epsilon").
    Epsilon,
    /// The clean sample ("sample"; Euler also says "original_sample").
    Sample,
    /// The velocity ("v_prediction").
    Velocity,
}

/// The prediction type, which must be one of `allowed` for `class`.
pub fn prediction(c: &SchedulerConfig, class: &ClassDefaults, allowed: &[&str]) -> Result<Prediction, ModelError> {
    expect_one_of(class, "prediction_type", &c.prediction_type, allowed)?;
    Ok(match c.prediction_type.as_str() {
        "epsilon" => Prediction::Epsilon,
        "v_prediction" => Prediction::Velocity,
        _ => Prediction::Sample,
    })
}

/// `timestep_spacing` must be one diffusers implements.
pub fn expect_spacing(c: &SchedulerConfig, class: &ClassDefaults) -> Result<(), ModelError> {
    expect_one_of(
        class,
        "timestep_spacing",
        c.timestep_spacing(class),
        &["linspace", "leading", "trailing"],
    )
}

/// `final_sigmas_type` must be "zero" or "sigma_min".
pub fn expect_final_sigmas(c: &SchedulerConfig, class: &ClassDefaults) -> Result<(), ModelError> {
    expect_one_of(class, "final_sigmas_type", &c.final_sigmas_type, &["zero", "sigma_min"])
}

/// diffusers allows at most one of the three sigma ramps; beta sigmas need
/// scipy's beta quantiles, which this port does not have.
pub fn expect_sigma_ramp(c: &SchedulerConfig, class: &ClassDefaults) -> Result<(), ModelError> {
    expect_false(class, "use_beta_sigmas", c.use_beta_sigmas)?;
    if c.use_karras_sigmas && c.use_exponential_sigmas {
        return Err(ModelError::Config {
            file: FILE.to_string(),
            message: format!(
                "`use_karras_sigmas` and `use_exponential_sigmas` are both true; {} allows only one",
                class.name
            ),
        });
    }
    Ok(())
}

fn default_train_steps() -> usize {
    1000
}
fn epsilon() -> String {
    "epsilon".into()
}
fn linear() -> String {
    "linear".into()
}
fn discrete() -> String {
    "discrete".into()
}
fn zero() -> String {
    "zero".into()
}
fn one() -> f64 {
    1.0
}
fn ten() -> f64 {
    10.0
}
fn two() -> usize {
    2
}
fn fifty() -> usize {
    50
}
fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_get_each_class_default() {
        let c = SchedulerConfig::default();
        assert_eq!(c.beta_schedule(&EULER), "linear");
        assert_eq!(c.beta_schedule(&LCM), "scaled_linear");
        assert_eq!(c.beta_start(&LCM), 0.00085);
        assert_eq!(c.timestep_spacing(&DPM_SOLVER), "linspace");
        assert_eq!(c.timestep_spacing(&DDIM), "leading");
        assert!(c.clip_sample(&DDIM) && !c.clip_sample(&LCM));
        assert_eq!(c.solver_type(&DPM_SOLVER), "midpoint");
        assert_eq!(c.solver_type(&UNIPC), "bh2");
        assert!(c.lower_order_final && c.predict_x0 && c.set_alpha_to_one);
        assert_eq!(c.solver_order, 2);
        assert_eq!(c.original_inference_steps, 50);
    }

    #[test]
    fn present_keys_win_over_class_defaults() {
        let c: SchedulerConfig =
            serde_json::from_str(r#"{"beta_schedule": "linear", "timestep_spacing": "trailing", "sigma_min": null}"#)
                .unwrap();
        assert_eq!(c.beta_schedule(&LCM), "linear");
        assert_eq!(c.timestep_spacing(&DDIM), "trailing");
        assert_eq!(c.sigma_min, None);
    }

    #[test]
    fn errors_name_key_value_class_and_choices() {
        let c: SchedulerConfig = serde_json::from_str(r#"{"timestep_spacing": "sideways"}"#).unwrap();
        let err = expect_spacing(&c, &DDIM).unwrap_err().to_string();
        assert_eq!(
            err,
            "scheduler/scheduler_config.json: `timestep_spacing` = \"sideways\" is not supported by \
             DDIMScheduler (supported: linspace, leading, trailing)"
        );
        let err = expect_false(&UNIPC, "thresholding", true).unwrap_err().to_string();
        assert!(
            err.contains("`thresholding` = true") && err.contains("supported: false"),
            "{err}"
        );
    }
}
