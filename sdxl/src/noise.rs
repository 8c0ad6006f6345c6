//! The random draws of one image, drawn on the CPU with a fixed generator
//! (ChaCha8 + standard normal) from the image's own seed, so that one seed
//! gives the same image on any device, in any rank, at any batch position.
//!
//! Each kind of draw has its own ChaCha stream of the seed: the initial
//! latents (`init`, stream 0: the same noise as before samplers existed), the
//! VAE encoder's samples (`vae_sample`, `vae_sample.1`) and each noise a
//! stochastic sampler takes while denoising (`step.K`). Draws therefore do
//! not depend on one another's order or count. Any draw can instead be given
//! by name (`--init-noise FILE`), which is how the tests replay diffusers'
//! own draws.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::ModelError;

/// One random draw of an image, by the name the noise files use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Draw {
    /// txt2img: the initial latents; img2img and inpainting: the noise added
    /// to the encoded image.
    Init,
    /// The VAE encoder's latent sample: `mean + std · this`.
    VaeSample,
    /// Inpainting: the encode of the masked image (unused by a 4-channel UNet).
    MaskedVaeSample,
    /// The `K`-th noise a stochastic sampler draws while denoising (from 0).
    Step(usize),
}

impl Draw {
    pub fn name(self) -> String {
        match self {
            Draw::Init => "init".into(),
            Draw::VaeSample => "vae_sample".into(),
            Draw::MaskedVaeSample => "vae_sample.1".into(),
            Draw::Step(k) => format!("step.{k}"),
        }
    }

    pub fn parse(name: &str) -> Option<Draw> {
        match name {
            "init" => Some(Draw::Init),
            "vae_sample" => Some(Draw::VaeSample),
            "vae_sample.1" => Some(Draw::MaskedVaeSample),
            _ => name.strip_prefix("step.")?.parse().ok().map(Draw::Step),
        }
    }

    /// The seed's ChaCha stream this draw comes from.
    fn stream(self) -> u64 {
        match self {
            Draw::Init => 0,
            Draw::VaeSample => 1,
            Draw::MaskedVaeSample => 2,
            Draw::Step(k) => 3 + k as u64,
        }
    }
}

/// Where one image's draws come from: the seed, except those given by name.
#[derive(Debug, Clone)]
pub struct ImageNoise {
    seed: Option<u64>,
    given: HashMap<Draw, Tensor>,
}

impl ImageNoise {
    /// Every draw from `seed`.
    pub fn from_seed(seed: u64) -> Self {
        ImageNoise {
            seed: Some(seed),
            given: HashMap::new(),
        }
    }

    /// Only the initial noise, given (a job with more draws fails naming the
    /// missing one): the parity tests' `latents=`.
    pub fn from_init(init: Tensor) -> Self {
        ImageNoise {
            seed: None,
            given: HashMap::from([(Draw::Init, init)]),
        }
    }

    /// `self`, with `draws` replacing the seed's.
    pub fn with_given(mut self, draws: impl IntoIterator<Item = (Draw, Tensor)>) -> Self {
        self.given.extend(draws);
        self
    }

    /// The draws given by name (not from the seed).
    pub fn given(&self) -> impl Iterator<Item = Draw> + '_ {
        self.given.keys().copied()
    }

    /// `draw`, `[1, c, h, w]` f32 on the CPU: the given tensor (its shape
    /// checked) or the seed's.
    pub fn draw(&self, draw: Draw, (c, h, w): (usize, usize, usize)) -> std::result::Result<Tensor, ModelError> {
        if let Some(t) = self.given.get(&draw) {
            if t.dims() != [1, c, h, w] {
                return Err(ModelError::Input(format!(
                    "noise tensor `{}` has shape {:?}, expected [1, {c}, {h}, {w}] for this job",
                    draw.name(),
                    t.dims()
                )));
            }
            return Ok(t.to_dtype(DType::F32)?);
        }
        let Some(seed) = self.seed else {
            return Err(ModelError::Input(format!(
                "the job needs the noise tensor `{}`, which was not given",
                draw.name()
            )));
        };
        Ok(standard_normal(seed, draw.stream(), (c, h, w))?)
    }
}

/// The draws of several images side by side (a rank's share of a job).
pub fn draw_batch(
    images: &[ImageNoise],
    draw: Draw,
    chw: (usize, usize, usize),
) -> std::result::Result<Tensor, ModelError> {
    let draws = images
        .iter()
        .map(|n| n.draw(draw, chw))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Tensor::cat(&draws, 0)?)
}

/// `[1, c, h, w]` standard-normal values of `seed`'s stream `stream`.
fn standard_normal(seed: u64, stream: u64, (c, h, w): (usize, usize, usize)) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let values: Vec<f32> = (0..c * h * w).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(values, (1, c, h, w), &Device::Cpu)
}

/// The initial latent noise for a seed, `[1, channels, height, width]` on `device`.
pub fn initial_noise(seed: u64, channels: usize, height: usize, width: usize, device: &Device) -> Result<Tensor> {
    standard_normal(seed, Draw::Init.stream(), (channels, height, width))?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(x: &Tensor, y: &Tensor) -> f32 {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn same_seed_same_noise_other_seed_other_noise() {
        let a = initial_noise(7, 4, 8, 8, &Device::Cpu).unwrap();
        let b = initial_noise(7, 4, 8, 8, &Device::Cpu).unwrap();
        let c = initial_noise(8, 4, 8, 8, &Device::Cpu).unwrap();
        assert_eq!(diff(&a, &b), 0.0);
        assert!(diff(&a, &c) > 0.1);
        let mean = a.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(mean.abs() < 0.3, "mean {mean}");
    }

    /// The initial noise of a seed is what it was before samplers had draws
    /// of their own (ChaCha8's default stream), so old seeds keep their images.
    #[test]
    fn init_is_the_seeds_first_stream_and_other_draws_differ() {
        let chw = (4, 8, 8);
        let n = ImageNoise::from_seed(7);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let first: f32 = StandardNormal.sample(&mut rng);
        let init = n.draw(Draw::Init, chw).unwrap();
        assert_eq!(init.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0], first);
        let s0 = n.draw(Draw::Step(0), chw).unwrap();
        let s1 = n.draw(Draw::Step(1), chw).unwrap();
        let v = n.draw(Draw::VaeSample, chw).unwrap();
        assert!(diff(&init, &s0) > 0.1 && diff(&s0, &s1) > 0.1 && diff(&init, &v) > 0.1);
        // the same draw twice is the same tensor: order does not matter
        assert_eq!(diff(&s1, &n.draw(Draw::Step(1), chw).unwrap()), 0.0);
    }

    #[test]
    fn given_draws_replace_the_seeds_and_are_checked() {
        let chw = (4, 2, 2);
        let given = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let n = ImageNoise::from_seed(1).with_given([(Draw::Step(2), given.clone())]);
        assert_eq!(diff(&n.draw(Draw::Step(2), chw).unwrap(), &given), 0.0);
        let err = n.draw(Draw::Step(2), (4, 4, 4)).unwrap_err().to_string();
        assert!(err.contains("`step.2`") && err.contains("[1, 4, 4, 4]"), "{err}");
        let only = ImageNoise::from_init(given);
        let err = only.draw(Draw::Step(0), chw).unwrap_err().to_string();
        assert!(err.contains("`step.0`"), "{err}");
    }

    #[test]
    fn names_round_trip() {
        for d in [
            Draw::Init,
            Draw::VaeSample,
            Draw::MaskedVaeSample,
            Draw::Step(0),
            Draw::Step(12),
        ] {
            assert_eq!(Draw::parse(&d.name()), Some(d));
        }
        assert_eq!(Draw::parse("step.x"), None);
        assert_eq!(Draw::parse("latents"), None);
    }
}
