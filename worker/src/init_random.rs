//! `worker init-random`: a diffusers folder with random weights, made from a
//! folder of configs (e.g. `bench/sdxl-base-configs`), for speed and memory
//! measurements of full-size SDXL where real weights cannot be downloaded.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};

use worker::sdxl::config::{read_json, ClipTextConfig, TinyVaeConfig, UNetConfig, VaeConfig};
use worker::sdxl::random;

#[derive(Debug, clap::Args)]
pub struct InitRandomArgs {
    /// A folder in diffusers layout holding configs (and tokenizer files), no weights.
    #[arg(long)]
    configs: PathBuf,
    /// Where to write the model folder (configs copied, weights added).
    #[arg(long)]
    output: PathBuf,
    /// Storage dtype of the weights.
    #[arg(long, value_enum, default_value_t = crate::cli::DTypeArg::F16)]
    dtype: crate::cli::DTypeArg,
    /// Where the random tensors are drawn (cuda is much faster for full size).
    #[arg(long, value_enum, default_value_t = crate::cli::DeviceArg::Cpu)]
    device: crate::cli::DeviceArg,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn copy_tree(src: &Path, dst: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let path = entry?.path();
        let target = dst.join(path.file_name().context("a file name")?);
        if path.is_dir() {
            copy_tree(&path, &target)?;
        } else if path.extension().is_none_or(|e| e != "safetensors") {
            std::fs::copy(&path, &target).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

fn save(weights: random::Weights, path: &Path) -> anyhow::Result<()> {
    let n: usize = weights.values().map(|t| t.elem_count()).sum();
    candle_core::safetensors::save(&weights, path).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "{}: {} tensors, {:.1} M parameters",
        path.display(),
        weights.len(),
        n as f64 / 1e6
    );
    Ok(())
}

pub fn run(args: InitRandomArgs) -> anyhow::Result<()> {
    let dtype = match args.dtype {
        crate::cli::DTypeArg::F32 => DType::F32,
        crate::cli::DTypeArg::F16 => DType::F16,
        crate::cli::DTypeArg::Bf16 => DType::BF16,
    };
    let device = match args.device {
        crate::cli::DeviceArg::Cpu => Device::Cpu,
        crate::cli::DeviceArg::Cuda => Device::new_cuda(0)?,
    };
    if device.is_cuda() {
        device.set_seed(args.seed)?;
    }
    let (src, out) = (&args.configs, &args.output);
    copy_tree(src, out)?;
    for (folder, projection) in [("text_encoder", false), ("text_encoder_2", true)] {
        let c: ClipTextConfig = read_json(&src.join(folder).join("config.json"))?;
        save(
            random::clip_text(&c, projection, dtype, &device)?,
            &out.join(folder).join("model.safetensors"),
        )?;
    }
    let c: UNetConfig = read_json(&src.join("unet/config.json"))?;
    save(
        random::unet(&c, dtype, &device)?,
        &out.join("unet/diffusion_pytorch_model.safetensors"),
    )?;
    let c: VaeConfig = read_json(&src.join("vae/config.json"))?;
    save(
        random::vae(&c, dtype, &device)?,
        &out.join("vae/diffusion_pytorch_model.safetensors"),
    )?;
    // A TAESD folder beside the pipeline's components, when the configs have one.
    for name in ["taesdxl", "taesd"] {
        let config = src.join(name).join("config.json");
        if config.is_file() {
            let c: TinyVaeConfig = read_json(&config)?;
            save(
                random::taesd(&c, dtype, &device)?,
                &out.join(name).join("diffusion_pytorch_model.safetensors"),
            )?;
        }
    }
    println!("{}", out.display());
    Ok(())
}
