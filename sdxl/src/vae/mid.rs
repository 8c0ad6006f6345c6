//! What the VAE's encoder and decoder share: the single-head spatial
//! self-attention of their mid block (diffusers' `Attention` with a group
//! norm and a residual connection), the mid block itself
//! (`UNetMidBlock2D`: resnet, attention, resnet) and the resnet settings.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::VaeConfig;
use crate::nn::{attention, group_norm, linear, Activation, GroupNorm, Linear};
use crate::resnet::{ResnetBlock2D, ResnetConfig};
use crate::ModelError;

pub(super) const FILE: &str = "vae/config.json";

/// The activation the config names.
pub(super) fn activation(c: &VaeConfig) -> std::result::Result<Activation, ModelError> {
    Activation::from_name(&c.act_fn).ok_or_else(|| {
        ModelError::config(
            FILE,
            format!(
                "`act_fn` = {:?} is not supported (supported: silu, gelu, relu)",
                c.act_fn
            ),
        )
    })
}

/// A resnet of the VAE: no time embedding, eps 1e-6.
pub(super) fn resnet(
    c: &VaeConfig,
    act: Activation,
    c_in: usize,
    c_out: usize,
    vb: VarBuilder,
) -> Result<ResnetBlock2D> {
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
}

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

    /// On a channels-last input (see `nn::to_layer_layout`) the tokens are
    /// a view of the normed image and the residual is added by `to_out`;
    /// the output is channels-last too.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.group_norm.forward(xs)?;
        // [b, h, w, c] rows are contiguous exactly when the image is channels-last
        let rows = normed.permute((0, 2, 3, 1))?;
        let tokens = if rows.is_contiguous() {
            rows.reshape((b, h * w, c))?
        } else {
            normed.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?
        };
        drop(normed);
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        drop(tokens);
        let attended = attention(&q, &k, &v, 1)?;
        let residual_rows = xs.permute((0, 2, 3, 1))?;
        if residual_rows.is_contiguous() {
            let out = self
                .to_out
                .forward_add(&attended, &residual_rows.reshape((b, h * w, c))?)?;
            return out.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        }
        let out = self.to_out.forward(&attended)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

/// `UNetMidBlock2D` of the VAE: resnet, attention (when the config asks), resnet.
#[derive(Debug)]
pub(super) struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet_1: ResnetBlock2D,
}

impl MidBlock {
    pub(super) fn new(c: &VaeConfig, act: Activation, channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            resnet_0: resnet(c, act, channels, channels, vb.pp("resnets.0"))?,
            attention: if c.mid_block_add_attention {
                Some(VaeAttention::new(channels, c.norm_num_groups, vb.pp("attentions.0"))?)
            } else {
                None
            },
            resnet_1: resnet(c, act, channels, channels, vb.pp("resnets.1"))?,
        })
    }

    pub(super) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnet_0.forward(xs, None)?;
        if let Some(attn) = &self.attention {
            xs = attn.forward(&xs)?;
        }
        self.resnet_1.forward(&xs, None)
    }
}
