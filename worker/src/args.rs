//! The flags every model-running command shares (`generate`, `run`, `bench`,
//! `init-random`), their conversions to what the `sdxl` crate takes, the
//! usage error that exits with code 2, and the one progress-bar style.
//!
//! This is where the environment is read for the model: `SDXL_KERNELS`,
//! `SDXL_TF32`, `SDXL_CONV_ALGO` and the Hugging Face variables arrive here through clap and
//! leave as a [`LoadOptions`]; the model crate itself reads no variable.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::builder::BoolishValueParser;
use clap::builder::TypedValueParser as _;
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use sdxl::accel::{Accel, ConvAlgo, Precision};
use sdxl::pipeline::{LoadOptions, VaeTiling};
use sdxl::scheduler::SamplerKind;
use sdxl::source::{HubOptions, DEFAULT_MODEL};
use worker::ranks::DeviceKind;

/// A flag with a value the command cannot use: exit code 2, like clap's own
/// usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Where the model runs.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

impl DeviceArg {
    /// The kind of device each rank opens.
    pub fn kind(self) -> DeviceKind {
        match self {
            DeviceArg::Cpu => DeviceKind::Cpu,
            DeviceArg::Cuda => DeviceKind::Cuda,
        }
    }

    /// Opens device `ordinal` of this kind (the CPU has one).
    pub fn open(self, ordinal: usize) -> anyhow::Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda => {
                Device::new_cuda(ordinal).context("opening CUDA device (was the worker built with --features cuda?)")
            }
        }
    }
}

/// The dtype weights are converted to and the pipeline runs in.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl DTypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Model loading options, shared by every command that runs the pipeline.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// A diffusers SDXL folder, a Hugging Face repo id (`owner/name[@revision]`),
    /// or a single-file checkpoint (`*.safetensors`, as A1111, ComfyUI and Civitai use).
    #[arg(long, env = "SDXL_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// For a single-file `--model` (`*.safetensors`, the A1111/ComfyUI
    /// layout): the diffusers folder or repo whose configs and tokenizers
    /// describe it (no weights are read from it). Default: SDXL base's, built in.
    #[arg(long, env = "SDXL_CONFIG")]
    pub config: Option<String>,
    /// Another VAE: a folder or repo id (e.g. madebyollin/sdxl-vae-fp16-fix),
    /// or one VAE file (`*.safetensors`).
    #[arg(long, env = "SDXL_VAE")]
    pub vae: Option<String>,
    /// A TAESD-XL folder or repo id for previews (e.g. madebyollin/taesdxl).
    #[arg(long, env = "SDXL_TAESD")]
    pub taesd: Option<String>,
    /// Weight file variant, e.g. `fp16` for `*.fp16.safetensors`.
    #[arg(long, env = "SDXL_VARIANT")]
    pub variant: Option<String>,
    #[arg(long, value_enum, env = "SDXL_DEVICE", default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Run dtype (default: f16 on CUDA, f32 on CPU).
    #[arg(long, value_enum, env = "SDXL_DTYPE")]
    pub dtype: Option<DTypeArg>,
    /// `fp8`: the UNet's transformer linear layers in FP8 (e4m3, a scale per
    /// output channel and per token) on GPUs with FP8 tensor cores (compute
    /// capability 8.9+: Ada, Hopper), the rest in --dtype; the images change
    /// within FP8's precision, and it is not yet faster (BENCHMARKS.md).
    /// `dtype`: everything in --dtype.
    #[arg(long, env = "SDXL_PRECISION", default_value = "dtype", value_parser = precision_parser())]
    pub precision: Precision,
    #[command(flatten)]
    pub accel: AccelArgs,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub memory: MemoryArgs,
}

/// How a job is fitted into device memory.
#[derive(Debug, Clone, clap::Args)]
pub struct MemoryArgs {
    /// VAE decode in tiles (diffusers' `enable_tiling`): `auto` when a whole
    /// decode would not fit the free device memory, `on` for every image
    /// larger than one tile (1024² for SDXL), `off` never.
    #[arg(long, env = "SDXL_VAE_TILING", default_value = "auto", value_parser = vae_tiling_parser())]
    pub vae_tiling: VaeTiling,
    /// The most device memory one job may plan for on each rank (`generate`
    /// and `run`): bytes, or with a binary K, M, G or T suffix (`20G`,
    /// `1.5GiB`). Default: what the device reports free. Jobs that cannot fit
    /// in it fail at once with what they need.
    #[arg(long, env = "SDXL_MEMORY_BUDGET", value_parser = parse_bytes)]
    pub memory_budget: Option<u64>,
}

/// The `--vae-tiling` values.
fn vae_tiling_parser() -> impl clap::builder::TypedValueParser<Value = VaeTiling> {
    clap::builder::PossibleValuesParser::new(VaeTiling::ALL.map(VaeTiling::name))
        .map(|name| VaeTiling::from_name(&name).expect("a listed tiling name"))
}

/// `20G`, `1.5GiB`, `512M`, `1073741824`: a size in bytes (binary suffixes).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => {
            return Err(format!(
                "`{text}`: the unit must be K, M, G or T (binary), or none for bytes"
            ))
        }
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 20G, 1.5GiB or 1073741824"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("`{text}` is not a size such as 20G, 1.5GiB or 1073741824"));
    }
    Ok((value * (1u64 << shift) as f64) as u64)
}

fn precision_parser() -> impl clap::builder::TypedValueParser<Value = Precision> {
    clap::builder::PossibleValuesParser::new(Precision::NAMES)
        .map(|name| Precision::from_name(&name).expect("a listed precision"))
}

/// The CUDA fast paths (A/B runs and bisection; CPU runs ignore them).
#[derive(Debug, Clone, clap::Args)]
pub struct AccelArgs {
    /// Kernel paths to take: `all`, `none`, or a list of attention, conv, norm, geglu, bias, lt,
    /// nhwc (channels-last activations), graphs (CUDA graphs of the UNet, the TAESD decode and
    /// the text encoders).
    #[arg(long, env = "SDXL_KERNELS", default_value = "all", value_parser = Accel::parse)]
    pub kernels: Accel,
    /// TF32 for f32 convolutions and matrix products (the VAE under `force_upcast`); 0 turns it off.
    #[arg(long, env = "SDXL_TF32", default_value = "1", value_parser = BoolishValueParser::new())]
    pub tf32: bool,
    /// How cuDNN's algorithm for each new convolution shape is chosen: `find` times the
    /// candidates once (fastest steps, each new shape's first use costs more), `heuristic`
    /// takes cuDNN's ranking (no first-use cost).
    #[arg(long, env = "SDXL_CONV_ALGO", default_value = "find", value_parser = conv_algo_parser())]
    pub conv_algo: ConvAlgo,
}

fn conv_algo_parser() -> impl clap::builder::TypedValueParser<Value = ConvAlgo> {
    clap::builder::PossibleValuesParser::new(ConvAlgo::NAMES)
        .map(|name| ConvAlgo::from_name(&name).expect("a listed algorithm choice"))
}

impl AccelArgs {
    pub fn accel(&self) -> Accel {
        Accel {
            tf32: self.tf32,
            conv_algo: self.conv_algo,
            ..self.kernels
        }
    }
}

/// How repo ids reach the Hugging Face hub.
#[derive(Debug, Clone, clap::Args)]
pub struct HubArgs {
    /// Use only what the Hugging Face cache already holds.
    #[arg(long, env = "HF_HUB_OFFLINE", default_value = "0", value_parser = BoolishValueParser::new())]
    pub hf_hub_offline: bool,
    /// A token for gated repos (default: the token file in the cache).
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,
    /// The Hugging Face home; the cache is its `hub/` (default ~/.cache/huggingface).
    #[arg(long, env = "HF_HOME")]
    pub hf_home: Option<PathBuf>,
}

impl HubArgs {
    pub fn hub(&self) -> HubOptions {
        HubOptions {
            offline: self.hf_hub_offline,
            token: self.hf_token.clone(),
            cache_dir: self.hf_home.as_ref().map(|home| home.join("hub")),
        }
    }
}

impl ModelArgs {
    /// The run dtype: the flag, or f16 on CUDA and f32 on the CPU.
    pub fn dtype(&self) -> DType {
        match (self.dtype, self.device) {
            (Some(d), _) => d.dtype(),
            (None, DeviceArg::Cpu) => DType::F32,
            (None, DeviceArg::Cuda) => DType::F16,
        }
    }

    /// The options on device `ordinal` of `--device`.
    pub fn load_options(&self, ordinal: usize) -> anyhow::Result<LoadOptions> {
        Ok(self.load_options_on(self.device.open(ordinal)?))
    }

    /// The options with `device` (rank groups put each rank on its own device).
    pub fn load_options_on(&self, device: Device) -> LoadOptions {
        LoadOptions {
            config: self.config.clone(),
            vae: self.vae.clone(),
            taesd: self.taesd.clone(),
            variant: self.variant.clone(),
            accel: self.accel.accel(),
            precision: self.precision,
            hub: self.hub.hub(),
            vae_tiling: self.memory.vae_tiling,
            ..LoadOptions::new(self.model.clone(), device, self.dtype())
        }
    }
}

/// The progress bar of a denoising loop, on stderr.
pub fn denoise_progress(steps: usize) -> ProgressBar {
    ProgressBar::new(steps as u64).with_style(
        ProgressStyle::with_template("{spinner} denoising [{bar:30}] {pos}/{len} {elapsed_precise} ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

/// The `--scheduler` values: the sampler names.
pub fn sampler_parser() -> impl clap::builder::TypedValueParser<Value = SamplerKind> {
    clap::builder::PossibleValuesParser::new(SamplerKind::ALL.map(SamplerKind::name))
        .map(|name| SamplerKind::from_name(&name).expect("a listed sampler name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_bytes("1073741824"), Ok(1 << 30));
        assert_eq!(parse_bytes("20G"), Ok(20 << 30));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("512 MB"), Ok(512 << 20));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert!(parse_bytes("20X").is_err());
        assert!(parse_bytes("-1G").is_err());
        assert!(parse_bytes("G").is_err());
    }
}
