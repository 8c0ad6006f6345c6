//! The UNet's down, mid and up blocks: `DownBlock2D`, `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D` and `CrossAttnUpBlock2D`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{KvIter, Transformer2DModel, TransformerConfig};
use crate::nn::cat_channels;
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
#[cfg(feature = "cuda")]
use crate::{
    accel::{on_cuda, Accel},
    cuda::kernels,
};

/// What every block of one UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct BlockCommon {
    pub temb_channels: usize,
    pub resnet: ResnetConfig,
    pub groups: usize,
    pub use_linear_projection: bool,
}

/// Cross-attention settings of a block (absent for plain blocks).
#[derive(Debug, Clone)]
pub struct CrossAttention {
    pub heads: usize,
    pub context_dim: usize,
    /// Transformer layers of each attention in the block.
    pub layers: Vec<usize>,
}

fn resnet(common: &BlockCommon, c_in: usize, c_out: usize, vb: VarBuilder) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        ResnetConfig {
            in_channels: c_in,
            out_channels: c_out,
            temb_channels: Some(common.temb_channels),
            ..common.resnet
        },
        vb,
    )
}

fn transformer(
    common: &BlockCommon,
    channels: usize,
    cross: &CrossAttention,
    layers: usize,
    vb: VarBuilder,
) -> Result<Transformer2DModel> {
    if !channels.is_multiple_of(cross.heads) {
        candle_core::bail!(
            "unet/config.json: {channels} channels do not split into {} attention heads",
            cross.heads
        );
    }
    Transformer2DModel::new(
        TransformerConfig {
            channels,
            heads: cross.heads,
            head_dim: channels / cross.heads,
            layers,
            context_dim: cross.context_dim,
            groups: common.groups,
            use_linear_projection: common.use_linear_projection,
        },
        vb,
    )
}

/// `DownBlock2D` or `CrossAttnDownBlock2D`.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        common: &BlockCommon,
        c_in: usize,
        c_out: usize,
        num_layers: usize,
        cross: Option<&CrossAttention>,
        add_downsample: bool,
        downsample_padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(num_layers);
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let input = if i == 0 { c_in } else { c_out };
            resnets.push(resnet(common, input, c_out, vb.pp(format!("resnets.{i}")))?);
            if let Some(cross) = cross {
                attentions.push(transformer(
                    common,
                    c_out,
                    cross,
                    cross.layers[i],
                    vb.pp(format!("attentions.{i}")),
                )?);
            }
        }
        let downsampler = if add_downsample {
            Some(Downsample2D::new(
                c_out,
                c_out,
                downsample_padding,
                vb.pp("downsamplers.0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// The block's transformers, in forward order.
    pub fn transformers(&self) -> impl Iterator<Item = &Transformer2DModel> {
        self.attentions.iter()
    }

    /// Returns the output and the states the up blocks will take as skips.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, kv: &mut KvIter) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, kv)?;
            }
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok((xs, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) per layer.
#[derive(Debug)]
pub struct MidBlock {
    first: ResnetBlock2D,
    layers: Vec<(Transformer2DModel, ResnetBlock2D)>,
}

impl MidBlock {
    pub fn new(common: &BlockCommon, channels: usize, cross: &CrossAttention, vb: VarBuilder) -> Result<Self> {
        let first = resnet(common, channels, channels, vb.pp("resnets.0"))?;
        let layers = cross
            .layers
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                Ok((
                    transformer(common, channels, cross, n, vb.pp(format!("attentions.{i}")))?,
                    resnet(common, channels, channels, vb.pp(format!("resnets.{}", i + 1)))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { first, layers })
    }

    /// The block's transformers, in forward order.
    pub fn transformers(&self) -> impl Iterator<Item = &Transformer2DModel> {
        self.layers.iter().map(|(attn, _)| attn)
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor, kv: &mut KvIter) -> Result<Tensor> {
        let mut xs = self.first.forward(xs, Some(temb))?;
        for (attn, resnet) in &self.layers {
            xs = attn.forward(&xs, kv)?;
            xs = resnet.forward(&xs, Some(temb))?;
        }
        Ok(xs)
    }
}

/// `UpBlock2D` or `CrossAttnUpBlock2D`.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// Channel counts of one up block, as diffusers derives them.
#[derive(Debug, Clone, Copy)]
pub struct UpChannels {
    /// Channels of the matching down block's input (its last skip).
    pub c_in: usize,
    pub c_out: usize,
    /// Channels coming from the block below.
    pub prev_out: usize,
}

impl UpBlock {
    pub fn new(
        common: &BlockCommon,
        ch: UpChannels,
        num_layers: usize,
        cross: Option<&CrossAttention>,
        add_upsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(num_layers);
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let skip = if i == num_layers - 1 { ch.c_in } else { ch.c_out };
            let input = if i == 0 { ch.prev_out } else { ch.c_out };
            resnets.push(resnet(common, input + skip, ch.c_out, vb.pp(format!("resnets.{i}")))?);
            if let Some(cross) = cross {
                attentions.push(transformer(
                    common,
                    ch.c_out,
                    cross,
                    cross.layers[i],
                    vb.pp(format!("attentions.{i}")),
                )?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(ch.c_out, ch.c_out, vb.pp("upsamplers.0"))?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// The block's transformers, in forward order.
    pub fn transformers(&self) -> impl Iterator<Item = &Transformer2DModel> {
        self.attentions.iter()
    }

    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's skip states, last one first consumed;
    /// `upsample_size` is the spatial size to upsample to, when it is not 2×.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        kv: &mut KvIter,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - i];
            xs = cat_skip(&xs, skip)?;
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, kv)?;
            }
        }
        if let Some(up) = &self.upsampler {
            xs = up.forward(&xs, upsample_size)?;
        }
        Ok(xs)
    }
}

/// An up block's input beside its skip connection, on the channels
/// (`nn::cat_channels`); two channels-last CUDA images by our kernel when
/// the `cat` path is on.
fn cat_skip(xs: &Tensor, skip: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_cuda(xs) && Accel::current().cat {
        if let Some(y) = kernels::cat_channels(xs, skip)? {
            return Ok(y);
        }
    }
    cat_channels(&[xs, skip])
}
