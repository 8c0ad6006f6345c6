//! `worker generate`: images from a prompt on this machine's devices, with
//! no services — from text, from an image (`--image`, img2img), from an
//! image and a mask (`--mask`, inpainting), with LoRAs (`--lora`).
//!
//! - `args.rs`: the flags and what they resolve to;
//! - `replay.rs`: with `--init-noise`, one image on one device from given
//!   draws (how the tests reproduce diffusers);
//! - `on_ranks.rs`: otherwise through the rank group, as the service runs jobs.

mod args;
mod on_ranks;
mod replay;

pub use self::args::GenerateArgs;

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let resolved = args.resolve()?;
    if args.init_noise.is_some() {
        replay::run(args, resolved)
    } else {
        on_ranks::run(args, resolved)
    }
}
