//! The decoder half of diffusers' `AutoencoderKL` (`post_quant_conv` and
//! `decoder.*`): latents to an image in [-1, 1].

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{expect_one_of, VaeConfig};
use super::nn::{
    attention, conv2d, conv2d_same, group_norm, linear, Activation, Conv2d, Conv2dConfig, GroupNorm, Linear,
};
use super::resnet::{ResnetBlock2D, ResnetConfig, Upsample2D};
use super::ModelError;

const FILE: &str = "vae/config.json";

/// The VAE's single-head spatial self-attention (diffusers' `Attention` with a
/// group norm and a residual connection).
#[derive(Debug)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.group_norm.forward(xs)?;
        let tokens = normed.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = self.to_out.forward(&attention(&q, &k, &v, 1)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

#[derive(Debug)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

/// `AutoencoderKL`'s decoding path.
#[derive(Debug)]
pub struct AutoencoderKLDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnet_0: ResnetBlock2D,
    mid_attention: Option<VaeAttention>,
    mid_resnet_1: ResnetBlock2D,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    act: Activation,
    conv_out: Conv2d,
    config: VaeConfig,
}

impl AutoencoderKLDecoder {
    pub fn new(c: &VaeConfig, vb: VarBuilder) -> std::result::Result<Self, ModelError> {
        for t in &c.up_block_types {
            expect_one_of(FILE, "up_block_types", t, &["UpDecoderBlock2D"])?;
        }
        let act = Activation::from_name(&c.act_fn).ok_or_else(|| ModelError::Config {
            file: FILE.into(),
            message: format!(
                "`act_fn` = {:?} is not supported (supported: silu, gelu, relu)",
                c.act_fn
            ),
        })?;
        if c.block_out_channels.is_empty() {
            return Err(ModelError::Config {
                file: FILE.into(),
                message: "`block_out_channels` is empty".into(),
            });
        }
        for (key, v) in [("latents_mean", &c.latents_mean), ("latents_std", &c.latents_std)] {
            if let Some(v) = v {
                if v.len() != c.latent_channels {
                    return Err(ModelError::Config {
                        file: FILE.into(),
                        message: format!(
                            "`{key}` has {} values, expected `latent_channels` = {}",
                            v.len(),
                            c.latent_channels
                        ),
                    });
                }
            }
        }
        let build = || -> Result<Self> {
            let boc = &c.block_out_channels;
            let top = *boc.last().unwrap_or(&0);
            let resnet = |c_in: usize, c_out: usize, vb: VarBuilder| {
                ResnetBlock2D::new(
                    ResnetConfig {
                        in_channels: c_in,
                        out_channels: c_out,
                        temb_channels: None,
                        groups: c.norm_num_groups,
                        eps: 1e-6,
                        act,
                        output_scale_factor: 1.0,
                    },
                    vb,
                )
            };
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
            let mid = dec.pp("mid_block");
            let mid_attention = if c.mid_block_add_attention {
                Some(VaeAttention::new(top, c.norm_num_groups, mid.pp("attentions.0"))?)
            } else {
                None
            };
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
                mid_resnet_0: resnet(top, top, mid.pp("resnets.0"))?,
                mid_attention,
                mid_resnet_1: resnet(top, top, mid.pp("resnets.1"))?,
                up_blocks,
                conv_norm_out: group_norm(c.norm_num_groups, boc[0], 1e-6, dec.pp("conv_norm_out"))?,
                act,
                conv_out: conv2d_same(boc[0], c.out_channels, 3, dec.pp("conv_out"))?,
                config: c.clone(),
            })
        };
        build().map_err(|error| ModelError::Weights {
            component: "vae".into(),
            error: super::without_backtrace(error),
        })
    }

    /// `vae.decode(z)`: `z` are latents already divided by the scaling factor.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        let mut xs = self.conv_in.forward(&z)?;
        xs = self.mid_resnet_0.forward(&xs, None)?;
        if let Some(attn) = &self.mid_attention {
            xs = attn.forward(&xs)?;
        }
        xs = self.mid_resnet_1.forward(&xs, None)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(up) = &block.upsampler {
                xs = up.forward(&xs, None)?;
            }
        }
        let xs = self.conv_norm_out.forward_act(&xs, Some(self.act))?;
        self.conv_out.forward(&xs)
    }

    /// What the SDXL pipeline does before `decode`: undo `latents_mean`/`latents_std`
    /// when the config has them, and the `scaling_factor`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        match (&c.latents_mean, &c.latents_std) {
            (Some(mean), Some(std)) => {
                let shape = (1, mean.len(), 1, 1);
                let dev = latents.device();
                let mean = Tensor::from_vec(mean.iter().map(|&v| v as f32).collect(), shape, dev)?
                    .to_dtype(latents.dtype())?;
                let std =
                    Tensor::from_vec(std.iter().map(|&v| v as f32).collect(), shape, dev)?.to_dtype(latents.dtype())?;
                (latents.broadcast_mul(&std)? / c.scaling_factor)?.broadcast_add(&mean)
            }
            _ => latents / c.scaling_factor,
        }
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }
}
