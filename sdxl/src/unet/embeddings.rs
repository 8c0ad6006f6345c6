//! diffusers' `Timesteps` (sinusoidal projection) and `TimestepEmbedding`
//! (two linear layers), used for the denoising timestep and for SDXL's
//! `text_time` micro-conditioning.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{linear, Activation, Linear};

/// `get_timestep_embedding`: `[n]` values → `[n, dim]` sinusoids, in f32.
#[derive(Debug, Clone, Copy)]
pub struct Timesteps {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
}

impl Timesteps {
    pub fn forward(&self, values: &[f32], device: &Device) -> Result<Tensor> {
        let half = self.dim / 2;
        let max_period = 10000f64;
        let freqs: Vec<f32> = (0..half)
            .map(|i| {
                // float32 as torch computes it: -ln(10000) * i / (half - shift), then exp
                let exponent =
                    (-(max_period.ln() as f32) * i as f32) / (half as f64 - self.downscale_freq_shift) as f32;
                exponent.exp()
            })
            .collect();
        let n = values.len();
        let mut out = vec![0f32; n * self.dim];
        for (r, &t) in values.iter().enumerate() {
            let row = &mut out[r * self.dim..(r + 1) * self.dim];
            for (i, &f) in freqs.iter().enumerate() {
                let arg = t * f;
                let (first, second) = if self.flip_sin_to_cos {
                    (arg.cos(), arg.sin())
                } else {
                    (arg.sin(), arg.cos())
                };
                row[i] = first;
                row[half + i] = second;
            }
            // an odd dim leaves the last column zero, as diffusers pads it
        }
        Tensor::from_vec(out, (n, self.dim), device)
    }
}

/// `TimestepEmbedding`: `linear_1` → activation → `linear_2`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl TimestepEmbedding {
    pub fn new(in_dim: usize, time_embed_dim: usize, act: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
            act,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.act.forward(&self.linear_1.forward(xs)?)?)
    }
}
