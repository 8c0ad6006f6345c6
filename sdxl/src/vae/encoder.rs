//! The encoder half of diffusers' `AutoencoderKL` (`encoder.*` and
//! `quant_conv`): an image in [-1, 1] to the moments of the latent
//! distribution, and `DiagonalGaussianDistribution.sample`: `mean + std ·
//! noise`, the noise being the image's `vae_sample` draw.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::mid::{activation, resnet, MidBlock, FILE};
use crate::config::{expect_one_of, VaeConfig};
use crate::nn::{conv2d, conv2d_same, group_norm, Activation, Conv2d, Conv2dConfig, GroupNorm};
use crate::resnet::{Downsample2D, ResnetBlock2D};
use crate::ModelError;

#[derive(Debug)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

/// `AutoencoderKL`'s encoding path.
#[derive(Debug)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    act: Activation,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl Encoder {
    /// `vb` is the VAE's root (`encoder.*`, `quant_conv`).
    pub fn new(c: &VaeConfig, vb: VarBuilder) -> std::result::Result<Self, ModelError> {
        for t in &c.down_block_types {
            expect_one_of(FILE, "down_block_types", t, &["DownEncoderBlock2D"])?;
        }
        let act = activation(c)?;
        let build = || -> Result<Self> {
            let boc = &c.block_out_channels;
            let top = *boc.last().unwrap_or(&0);
            let enc = vb.pp("encoder");
            let mut down_blocks = Vec::with_capacity(boc.len());
            let mut out_ch = boc[0];
            for (i, &ch) in boc.iter().enumerate() {
                let prev = out_ch;
                out_ch = ch;
                let db = enc.pp(format!("down_blocks.{i}"));
                let resnets = (0..c.layers_per_block)
                    .map(|j| {
                        resnet(
                            c,
                            act,
                            if j == 0 { prev } else { out_ch },
                            out_ch,
                            db.pp(format!("resnets.{j}")),
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                // diffusers' encoder downsamples with padding 0: one row and
                // column of zeros on the right and bottom, then a stride-2 conv
                let downsampler = if i + 1 < boc.len() {
                    Some(Downsample2D::new(out_ch, out_ch, 0, db.pp("downsamplers.0"))?)
                } else {
                    None
                };
                down_blocks.push(DownEncoderBlock { resnets, downsampler });
            }
            let moments = 2 * c.latent_channels;
            let quant_conv = if c.use_quant_conv {
                Some(conv2d(
                    moments,
                    moments,
                    1,
                    Conv2dConfig::default(),
                    vb.pp("quant_conv"),
                )?)
            } else {
                None
            };
            Ok(Self {
                conv_in: conv2d_same(c.in_channels, boc[0], 3, enc.pp("conv_in"))?,
                down_blocks,
                mid_block: MidBlock::new(c, act, top, enc.pp("mid_block"))?,
                conv_norm_out: group_norm(c.norm_num_groups, top, 1e-6, enc.pp("conv_norm_out"))?,
                act,
                conv_out: conv2d_same(top, moments, 3, enc.pp("conv_out"))?,
                quant_conv,
            })
        };
        build().map_err(|error| ModelError::Weights {
            component: "vae encoder".into(),
            error: crate::without_backtrace(error),
        })
    }

    /// The latent distribution's moments `[b, 2·latent_channels, h/f, w/f]`
    /// of images `[b, 3, h, w]` in [-1, 1].
    pub fn moments(&self, images: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(images)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(down) = &block.downsampler {
                xs = down.forward(&xs)?;
            }
        }
        xs = self.mid_block.forward(&xs)?;
        let xs = self.conv_norm_out.forward_act(&xs, Some(self.act))?;
        let xs = self.conv_out.forward(&xs)?;
        match &self.quant_conv {
            Some(conv) => conv.forward(&xs),
            None => Ok(xs),
        }
    }
}

/// `DiagonalGaussianDistribution(moments).sample()` with the given standard
/// normal `noise` (the moments' dtype): `mean + exp(0.5 · clamp(logvar,
/// -30, 20)) · noise`.
pub fn sample(moments: &Tensor, noise: &Tensor) -> Result<Tensor> {
    let c = moments.dim(1)? / 2;
    let mean = moments.narrow(1, 0, c)?;
    let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
    let std = (logvar * 0.5)?.exp()?;
    mean + std.broadcast_mul(&noise.to_dtype(moments.dtype())?)?
}

/// The distribution's mean (diffusers' `latent_dist.mode()`).
pub fn mode(moments: &Tensor) -> Result<Tensor> {
    let c = moments.dim(D::Minus(3))? / 2;
    moments.narrow(1, 0, c)
}
