//! The samplers the SDXL pipeline offers, each an exact port of one diffusers
//! scheduler class as `Class.from_config(model_scheduler_config, **overrides)`
//! builds it, behind one [`Sampler`] interface.
//!
//! | name | diffusers class | overrides |
//! | --- | --- | --- |
//! | `euler` | `EulerDiscreteScheduler` | |
//! | `euler_a` | `EulerAncestralDiscreteScheduler` | |
//! | `ddim` | `DDIMScheduler` | (`eta` = 0 in `step`) |
//! | `dpmpp_2m` | `DPMSolverMultistepScheduler` | `algorithm_type="dpmsolver++"`, `solver_order=2` |
//! | `dpmpp_2m_karras` | `DPMSolverMultistepScheduler` | as `dpmpp_2m`, `use_karras_sigmas=True` |
//! | `dpmpp_2m_sde_karras` | `DPMSolverMultistepScheduler` | `algorithm_type="sde-dpmsolver++"`, `solver_order=2`, `use_karras_sigmas=True` |
//! | `unipc` | `UniPCMultistepScheduler` | |
//! | `lcm` | `LCMScheduler` | |
//!
//! The DPM++ samplers force `solver_order` 2 whatever the file says (the
//! "2M" of their names); everything else comes from the file or the class
//! default, as `from_config` does.
//!
//! Per-step scalars are computed on the CPU with the precision diffusers and
//! torch use (float32 tensors, float64 numpy, the same operations in the same
//! order), so integer timesteps match exactly and everything else to about
//! an ulp (torch's own CPU `sqrt`/`exp`/`log` are not correctly rounded).
//!
//! # Driving a sampler (what diffusers' SDXL pipelines do)
//!
//! txt2img: `latents = randn * init_noise_sigma()`, then for `i in 0..len()`:
//! UNet on `scale_model_input(latents, i)` at `timesteps()[i]`, guidance, then
//! `latents = step(output, i, latents, noise)` with a fresh standard-normal
//! `noise` exactly when `step_needs_noise(i)`.
//!
//! img2img (`get_timesteps`): `init = min(int(steps * strength), steps)`,
//! `t_start = max(steps - init, 0) * order()` (`order()` is 1 for all eight,
//! it is diffusers' class attribute, not the solver order), then
//! `set_begin_index(t_start)`, `latents = add_noise(image_latents, noise,
//! t_start)` and the loop above for `i in t_start..len()`. The multistep
//! solvers (DPM++, UniPC) start their history afresh at the begin index, so
//! the first img2img step is first order and UniPC skips its corrector
//! there; they must be stepped in order. Inpainting re-noises the known
//! region with `add_noise(.., i + 1)` after step `i`.

mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod lcm;
mod ops;
mod schedule;
mod timesteps;
mod unipc;

use candle_core::Tensor;

use super::ModelError;

pub use config::SchedulerConfig;
pub use ddim::Ddim;
pub use dpm_solver::DpmSolver;
pub use euler::EulerDiscrete;
pub use euler_ancestral::EulerAncestral;
pub use lcm::Lcm;
pub use unipc::UniPc;

/// The samplers a job can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Euler,
    EulerAncestral,
    Ddim,
    DpmPp2m,
    DpmPp2mKarras,
    DpmPp2mSdeKarras,
    UniPc,
    Lcm,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 8] = [
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::Ddim,
        SamplerKind::DpmPp2m,
        SamplerKind::DpmPp2mKarras,
        SamplerKind::DpmPp2mSdeKarras,
        SamplerKind::UniPc,
        SamplerKind::Lcm,
    ];

    /// The name jobs use.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_a",
            SamplerKind::Ddim => "ddim",
            SamplerKind::DpmPp2m => "dpmpp_2m",
            SamplerKind::DpmPp2mKarras => "dpmpp_2m_karras",
            SamplerKind::DpmPp2mSdeKarras => "dpmpp_2m_sde_karras",
            SamplerKind::UniPc => "unipc",
            SamplerKind::Lcm => "lcm",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The diffusers class this sampler is a port of.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SamplerKind::Euler => "EulerDiscreteScheduler",
            SamplerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SamplerKind::Ddim => "DDIMScheduler",
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras | SamplerKind::DpmPp2mSdeKarras => {
                "DPMSolverMultistepScheduler"
            }
            SamplerKind::UniPc => "UniPCMultistepScheduler",
            SamplerKind::Lcm => "LCMScheduler",
        }
    }

    /// Whether some of its steps draw fresh noise (see [`Sampler::step_needs_noise`]).
    pub fn is_stochastic(self) -> bool {
        matches!(
            self,
            SamplerKind::EulerAncestral | SamplerKind::DpmPp2mSdeKarras | SamplerKind::Lcm
        )
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = ModelError;

    /// [`SamplerKind::from_name`], with an error that lists the names.
    fn from_str(s: &str) -> Result<Self, ModelError> {
        Self::from_name(s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            ModelError::Input(format!("unknown sampler {s:?} (supported: {})", names.join(", ")))
        })
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One generation's schedule and solver state. Step indices are absolute:
/// 0..len() over the full schedule of `num_inference_steps`.
pub trait Sampler: Send {
    /// The value fed to the UNet at each step index.
    fn timesteps(&self) -> &[f32];
    /// The scale of the initial noise: txt2img latents are `randn * init_noise_sigma`.
    fn init_noise_sigma(&self) -> f32;
    /// diffusers' `scheduler.order` (1 for all eight classes).
    fn order(&self) -> usize;
    /// The sample the UNet sees at step `i` (in the sample's dtype).
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> candle_core::Result<Tensor>;
    /// Whether step `i` consumes a fresh standard-normal noise tensor (the shape of the sample).
    fn step_needs_noise(&self, i: usize) -> bool;
    /// One step from index `i`; `noise` is Some exactly when step_needs_noise(i).
    /// Multistep solvers keep history in self. Computed in float32, returned
    /// in the sample's dtype.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor>;
    /// diffusers' `scheduler.add_noise(original, noise, timesteps[i])` (img2img start and inpainting's known region).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> candle_core::Result<Tensor>;
    /// img2img: diffusers' `set_begin_index(i)`: the first step that will run is `i`
    /// (matters for multistep state and for how step indices map to sigmas).
    fn set_begin_index(&mut self, i: usize);

    /// The number of steps in the schedule.
    fn len(&self) -> usize {
        self.timesteps().len()
    }
    fn is_empty(&self) -> bool {
        self.timesteps().is_empty()
    }
    /// The sigma schedule (one more than the steps, or two more for Euler's
    /// `log_linear` interpolation), for the classes that have one.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
}

/// The sampler `kind` over `num_inference_steps` steps of the schedule that
/// `config` describes.
pub fn build(
    kind: SamplerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Sampler>, ModelError> {
    if num_inference_steps == 0 {
        return Err(ModelError::Input("steps must be at least 1".into()));
    }
    Ok(match kind {
        SamplerKind::Euler => Box::new(EulerDiscrete::new(config, num_inference_steps)?),
        SamplerKind::EulerAncestral => Box::new(EulerAncestral::new(config, num_inference_steps)?),
        SamplerKind::Ddim => Box::new(Ddim::new(config, num_inference_steps)?),
        SamplerKind::DpmPp2m => Box::new(DpmSolver::new(config, num_inference_steps, false, false)?),
        SamplerKind::DpmPp2mKarras => Box::new(DpmSolver::new(config, num_inference_steps, true, false)?),
        SamplerKind::DpmPp2mSdeKarras => Box::new(DpmSolver::new(config, num_inference_steps, true, true)?),
        SamplerKind::UniPc => Box::new(UniPc::new(config, num_inference_steps)?),
        SamplerKind::Lcm => Box::new(Lcm::new(config, num_inference_steps)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in SamplerKind::ALL {
            assert_eq!(SamplerKind::from_name(kind.name()), Some(kind));
            assert_eq!(kind.name().parse::<SamplerKind>().unwrap(), kind);
        }
        assert_eq!(SamplerKind::from_name("Euler"), None);
    }

    #[test]
    fn unknown_name_lists_the_allowed_ones() {
        let err = "heun".parse::<SamplerKind>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown sampler \"heun\" (supported: euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras, \
             dpmpp_2m_sde_karras, unipc, lcm)"
        );
    }

    #[test]
    fn stochastic_ones_draw_noise() {
        let config: SchedulerConfig = serde_json::from_str("{}").unwrap();
        for kind in SamplerKind::ALL {
            let s = build(kind, &config, 4).unwrap();
            let draws = (0..s.len()).any(|i| s.step_needs_noise(i));
            assert_eq!(draws, kind.is_stochastic(), "{kind}");
            assert_eq!(s.order(), 1);
        }
    }

    /// Half-precision inputs: the step runs in float32 and returns the
    /// sample's dtype; input scaling and `add_noise` stay in it.
    #[test]
    fn half_precision_in_half_precision_out() {
        use candle_core::{DType, Device};
        let config: SchedulerConfig = serde_json::from_str(r#"{"beta_schedule": "scaled_linear"}"#).unwrap();
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 2, 2), &dev).unwrap();
        let out = Tensor::randn(0f32, 1.0, (1, 4, 2, 2), &dev).unwrap();
        let noise = Tensor::randn(0f32, 1.0, (1, 4, 2, 2), &dev).unwrap();
        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        for kind in SamplerKind::ALL {
            let mut full = build(kind, &config, 4).unwrap();
            let mut reduced = build(kind, &config, 4).unwrap();
            let (mut a, mut b) = (x.clone(), half(&x));
            for i in 0..2 {
                assert_eq!(reduced.scale_model_input(&b, i).unwrap().dtype(), DType::F16, "{kind}");
                let n = full.step_needs_noise(i).then_some(&noise);
                a = full.step(&out, i, &a, n).unwrap();
                let n = n.map(half);
                b = reduced.step(&half(&out), i, &b, n.as_ref()).unwrap();
                assert_eq!(b.dtype(), DType::F16, "{kind}");
            }
            let max_abs = |t: &Tensor| {
                t.abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
            };
            let worst = max_abs(&(&a - b.to_dtype(DType::F32).unwrap()).unwrap()).unwrap();
            // Half precision holds about three digits of the inputs and of each step's sample.
            assert!(worst <= 4e-3 * max_abs(&a).unwrap().max(1.0), "{kind}: {worst}");
            let noisy = reduced.add_noise(&half(&x), &half(&noise), 1).unwrap();
            assert_eq!(noisy.dtype(), DType::F16, "{kind}");
        }
    }

    #[test]
    fn multistep_solvers_insist_on_order() {
        let config: SchedulerConfig = serde_json::from_str("{}").unwrap();
        let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut s = build(SamplerKind::UniPc, &config, 10).unwrap();
        s.set_begin_index(4);
        assert!(s.step(&x, 3, &x, None).is_err());
        s.step(&x, 4, &x, None).unwrap();
        assert!(s.step(&x, 6, &x, None).is_err());
        assert!(s.step(&x, 10, &x, None).is_err());
    }

    #[test]
    fn zero_steps_is_an_input_error() {
        let config: SchedulerConfig = serde_json::from_str("{}").unwrap();
        let err = build(SamplerKind::Euler, &config, 0).err().unwrap();
        assert!(matches!(err, ModelError::Input(_)));
    }
}
