//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`, shared by the
//! UNet and the VAE decoder.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::nn::{
    add_channel_bias, conv2d, conv2d_same, defer_conv_bias, group_norm, linear, upsample_nearest, Activation, Conv2d,
    Conv2dConfig, GroupNorm, Linear,
};

/// Shape and numerics of one `ResnetBlock2D`.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` in the VAE (no `time_emb_proj`).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    pub output_scale_factor: f64,
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(c: ResnetConfig, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(conv2d(
                c.in_channels,
                c.out_channels,
                1,
                Conv2dConfig::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(linear(t, c.out_channels, vb.pp("time_emb_proj"))?),
            None => None,
        };
        Ok(Self {
            norm1: group_norm(c.groups, c.in_channels, c.eps, vb.pp("norm1"))?,
            conv1: conv2d_same(c.in_channels, c.out_channels, 3, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(c.groups, c.out_channels, c.eps, vb.pp("norm2"))?,
            conv2: conv2d_same(c.out_channels, c.out_channels, 3, vb.pp("conv2"))?,
            conv_shortcut,
            act: c.act,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// `temb` is the (not yet activated) time embedding `[batch, temb_channels]`.
    ///
    /// Each intermediate is dropped as soon as the next one exists (a
    /// shadowed binding would live to the end): at full resolution in the
    /// VAE decoder every one of them is hundreds of MB to GBs, and
    /// `vae::decode_bytes` counts on at most three at a time.
    ///
    /// On CUDA, conv1's bias (and the time embedding) is added by norm2's
    /// kernel as it reads conv1's output, which saves a pass over it.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let normed = self.norm1.forward_act(xs, Some(self.act))?;
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&self.act.forward(temb)?)?),
            _ => None,
        };
        let h = match self.conv1.bias() {
            Some(bias) if defer_conv_bias(&normed, Some(self.act)) => {
                let h = self.conv1.forward_without_bias(&{ normed })?;
                let pre = match &temb {
                    Some(t) => t.broadcast_add(bias)?,
                    None => bias.clone(),
                };
                self.norm2.forward_act_biased(&h, &pre, Some(self.act))?
            }
            _ => {
                let mut h = self.conv1.forward(&{ normed })?;
                if let Some(t) = &temb {
                    h = add_channel_bias(h, t)?;
                }
                self.norm2.forward_act(&{ h }, Some(self.act))?
            }
        };
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = self.conv2.forward_add(&h, &shortcut)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// A stride-2 3×3 convolution (`downsamplers.0.conv`).
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    /// diffusers pads right and bottom by one when `padding` is 0.
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, out_channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, out_channels, 3, cfg, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let xs = xs.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour upsampling, then a 3×3 convolution (`upsamplers.0.conv`).
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d_same(channels, out_channels, 3, vb.pp("conv"))?,
        })
    }

    /// Doubles height and width, or reaches `size` when given (the UNet asks
    /// for the skip connection's size when a latent side is odd).
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let xs = upsample_nearest(xs, th, tw)?;
        self.conv.forward(&xs)
    }
}
