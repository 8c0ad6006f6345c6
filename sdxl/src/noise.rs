//! The initial latent noise for a seed, drawn on the CPU with a fixed
//! generator (ChaCha8 + standard normal), so one seed gives the same image on
//! any device, in any rank, with any number of ranks.

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// `[1, channels, height, width]` standard-normal noise for `seed`, on `device`.
pub fn initial_noise(seed: u64, channels: usize, height: usize, width: usize, device: &Device) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = channels * height * width;
    let values: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(values, (1, channels, height, width), &Device::Cpu)?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_other_seed_other_noise() {
        let a = initial_noise(7, 4, 8, 8, &Device::Cpu).unwrap();
        let b = initial_noise(7, 4, 8, 8, &Device::Cpu).unwrap();
        let c = initial_noise(8, 4, 8, 8, &Device::Cpu).unwrap();
        let diff = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(diff(&a, &b), 0.0);
        assert!(diff(&a, &c) > 0.1);
        let mean = a.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(mean.abs() < 0.3, "mean {mean}");
    }
}
