//! `worker init-random`: a diffusers folder with random weights, made from a
//! folder of configs (e.g. `sdxl/configs/sdxl-base-1.0`), for speed and memory
//! measurements of full-size SDXL where real weights cannot be downloaded.
//! The writing is `sdxl::random::write_model`; this is its command line.

use std::path::PathBuf;

use sdxl::random;

use crate::args::{DTypeArg, DeviceArg};

#[derive(Debug, clap::Args)]
pub struct InitRandomArgs {
    /// A folder in diffusers layout holding configs (and tokenizer files), no weights.
    #[arg(long)]
    configs: PathBuf,
    /// Where to write the model folder (configs copied, weights added).
    #[arg(long)]
    output: PathBuf,
    /// Storage dtype of the weights.
    #[arg(long, value_enum, default_value_t = DTypeArg::F16)]
    dtype: DTypeArg,
    /// Where the random tensors are drawn (cuda is much faster for full size).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: InitRandomArgs) -> anyhow::Result<()> {
    let device = args.device.open(0)?;
    if device.is_cuda() {
        device.set_seed(args.seed)?;
    }
    let written = random::write_model(&args.configs, &args.output, args.dtype.dtype(), &device)?;
    for file in written {
        eprintln!(
            "{}: {} tensors, {:.1} M parameters",
            file.path.display(),
            file.tensors,
            file.parameters as f64 / 1e6
        );
    }
    println!("{}", args.output.display());
    Ok(())
}
