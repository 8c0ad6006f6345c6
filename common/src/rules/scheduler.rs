//! The samplers a job can ask for, by the names the API, the CLI and the
//! web page use. The model crate (`sdxl::scheduler::SamplerKind`) has the
//! same eight under the same names; the worker maps one to the other by name
//! and its tests check that the two lists agree.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A sampler, as diffusers' scheduler classes (see the README's table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum Scheduler {
    /// `EulerDiscreteScheduler`, SDXL base's own.
    #[default]
    #[serde(rename = "euler")]
    Euler,
    /// `EulerAncestralDiscreteScheduler`.
    #[serde(rename = "euler_a")]
    EulerA,
    /// `DDIMScheduler` (eta 0).
    #[serde(rename = "ddim")]
    Ddim,
    /// `DPMSolverMultistepScheduler`, DPM++ 2M.
    #[serde(rename = "dpmpp_2m")]
    DpmPp2m,
    /// DPM++ 2M with Karras sigmas.
    #[serde(rename = "dpmpp_2m_karras")]
    DpmPp2mKarras,
    /// DPM++ 2M SDE with Karras sigmas.
    #[serde(rename = "dpmpp_2m_sde_karras")]
    DpmPp2mSdeKarras,
    /// `UniPCMultistepScheduler`.
    #[serde(rename = "unipc")]
    UniPc,
    /// `LCMScheduler` (for LCM-distilled models and LoRAs: few steps, low guidance).
    #[serde(rename = "lcm")]
    Lcm,
}

impl Scheduler {
    pub const ALL: [Scheduler; 8] = [
        Scheduler::Euler,
        Scheduler::EulerA,
        Scheduler::Ddim,
        Scheduler::DpmPp2m,
        Scheduler::DpmPp2mKarras,
        Scheduler::DpmPp2mSdeKarras,
        Scheduler::UniPc,
        Scheduler::Lcm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Euler => "euler",
            Scheduler::EulerA => "euler_a",
            Scheduler::Ddim => "ddim",
            Scheduler::DpmPp2m => "dpmpp_2m",
            Scheduler::DpmPp2mKarras => "dpmpp_2m_karras",
            Scheduler::DpmPp2mSdeKarras => "dpmpp_2m_sde_karras",
            Scheduler::UniPc => "unipc",
            Scheduler::Lcm => "lcm",
        }
    }

    /// Every name, comma-separated (for messages).
    pub fn names() -> String {
        Self::ALL.map(Scheduler::name).join(", ")
    }
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Scheduler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown scheduler `{s}` (allowed: {})", Self::names()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_serde_agree() {
        for s in Scheduler::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
            assert_eq!(s.name().parse::<Scheduler>().unwrap(), s);
        }
        assert!("heun".parse::<Scheduler>().unwrap_err().contains("euler_a"));
    }
}
