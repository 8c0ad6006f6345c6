//! The decoder half of diffusers' `AutoencoderKL` (`post_quant_conv` and
//! `decoder.*`): latents to an image in [-1, 1].

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::mid::{activation, resnet, MidBlock, FILE};
use crate::config::{expect_one_of, VaeConfig};
use crate::nn::{conv2d, conv2d_same, group_norm, Activation, Conv2d, Conv2dConfig, GroupNorm};
use crate::resnet::{ResnetBlock2D, Upsample2D};
use crate::ModelError;

#[derive(Debug)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

/// `AutoencoderKL`'s decoding path.
#[derive(Debug)]
pub struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    act: Activation,
    conv_out: Conv2d,
}

impl Decoder {
    /// `vb` is the VAE's root (`post_quant_conv`, `decoder.*`).
    pub fn new(c: &VaeConfig, vb: VarBuilder) -> std::result::Result<Self, ModelError> {
        for t in &c.up_block_types {
            expect_one_of(FILE, "up_block_types", t, &["UpDecoderBlock2D"])?;
        }
        let act = activation(c)?;
        let build = || -> Result<Self> {
            let boc = &c.block_out_channels;
            let top = *boc.last().unwrap_or(&0);
            let post_quant_conv = if c.use_post_quant_conv {
                Some(conv2d(
                    c.latent_channels,
                    c.latent_channels,
                    1,
                    Conv2dConfig::default(),
                    vb.pp("post_quant_conv"),
                )?)
            } else {
                None
            };
            let dec = vb.pp("decoder");
            let reversed: Vec<usize> = boc.iter().rev().copied().collect();
            let mut up_blocks = Vec::with_capacity(reversed.len());
            let mut out_ch = reversed[0];
            for i in 0..reversed.len() {
                let prev = out_ch;
                out_ch = reversed[i];
                let ub = dec.pp(format!("up_blocks.{i}"));
                let resnets = (0..c.layers_per_block + 1)
                    .map(|j| {
                        resnet(
                            c,
                            act,
                            if j == 0 { prev } else { out_ch },
                            out_ch,
                            ub.pp(format!("resnets.{j}")),
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                let upsampler = if i + 1 < reversed.len() {
                    Some(Upsample2D::new(out_ch, out_ch, ub.pp("upsamplers.0"))?)
                } else {
                    None
                };
                up_blocks.push(UpDecoderBlock { resnets, upsampler });
            }
            Ok(Self {
                post_quant_conv,
                conv_in: conv2d_same(c.latent_channels, top, 3, dec.pp("conv_in"))?,
                mid_block: MidBlock::new(c, act, top, dec.pp("mid_block"))?,
                up_blocks,
                conv_norm_out: group_norm(c.norm_num_groups, boc[0], 1e-6, dec.pp("conv_norm_out"))?,
                act,
                conv_out: conv2d_same(boc[0], c.out_channels, 3, dec.pp("conv_out"))?,
            })
        };
        build().map_err(|error| ModelError::Weights {
            component: "vae".into(),
            error: crate::without_backtrace(error),
        })
    }

    /// `vae.decode(z)`: `z` are latents already divided by the scaling factor.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        // channels-last from here on, where the CUDA path keeps it (a no-op elsewhere)
        let mut xs = self.conv_in.forward_into_layer_layout(&z)?;
        xs = self.mid_block.forward(&xs)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(up) = &block.upsampler {
                xs = up.forward(&xs, None)?;
            }
        }
        let xs = self.conv_norm_out.forward_act(&xs, Some(self.act))?;
        self.conv_out.forward(&xs)?.contiguous()
    }
}
