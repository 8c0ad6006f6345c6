//! diffusers' `Transformer2DModel` with its `BasicTransformerBlock`s: self- and
//! cross-attention and a GEGLU feed-forward, between group-norm and projections.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::nn::{
    attention, conv2d, group_norm, layer_norm, layers_keep_channels_last, linear, linear_no_bias, Conv2d, Conv2dConfig,
    GroupNorm, LayerNorm, Linear,
};

/// The keys and values of the UNet's cross-attentions over one context, in
/// the order the forward meets them (`UNet2DConditionModel::conditioning`).
pub type KvIter<'a> = std::slice::Iter<'a, Tensor>;

/// diffusers' `Attention` as the UNet uses it: no biases on q/k/v, a biased `to_out.0`.
/// The projections that read the same input run as one product (q, k, v for
/// self-attention; k, v for cross-attention); checkpoint keys stay `to_q`, `to_k`, `to_v`.
#[derive(Debug)]
pub struct Attention {
    projections: Projections,
    to_out: Linear,
    heads: usize,
    inner: usize,
}

#[derive(Debug)]
enum Projections {
    /// `[to_q; to_k; to_v]` over the hidden states.
    SelfAttention(Linear),
    /// `to_q` over the hidden states, `[to_k; to_v]` over the context.
    Cross { to_q: Linear, to_kv: Linear },
}

impl Attention {
    /// `context_dim` is `None` for self-attention.
    pub fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        let to_q = linear_no_bias(query_dim, inner, vb.pp("to_q"))?;
        let to_k = linear_no_bias(kv_dim, inner, vb.pp("to_k"))?;
        let to_v = linear_no_bias(kv_dim, inner, vb.pp("to_v"))?;
        // FP8 (when on) for the products over the image's tokens; the
        // cross-attention's k/v read the 77 text tokens and stay as they are.
        let projections = match context_dim {
            None => Projections::SelfAttention(Linear::fuse(&[to_q, to_k, to_v])?.with_fp8()?),
            Some(_) => Projections::Cross {
                to_q: to_q.with_fp8()?,
                to_kv: Linear::fuse(&[to_k, to_v])?,
            },
        };
        Ok(Self {
            projections,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?.with_fp8()?,
            heads,
            inner,
        })
    }

    /// The cross-attention's keys and values over `context`
    /// (`[b, tokens, context_dim]`): `[b, tokens, 2·inner]`, keys first.
    /// They depend on the context alone, so a denoising loop makes them
    /// once for all its steps.
    fn context_kv(&self, context: &Tensor) -> Result<Tensor> {
        match &self.projections {
            Projections::Cross { to_kv, .. } => to_kv.forward(context),
            Projections::SelfAttention(_) => candle_core::bail!("a self-attention has no context keys and values"),
        }
    }

    /// The width of [`Self::context_kv`]'s rows (0 for a self-attention).
    fn context_kv_width(&self) -> usize {
        match &self.projections {
            Projections::Cross { to_kv, .. } => to_kv.out_features(),
            Projections::SelfAttention(_) => 0,
        }
    }

    /// `forward(norm(xs), kv) + residual`, the residual added with `to_out`'s
    /// bias. `kv` is the cross-attention's [`Self::context_kv`]; without it
    /// (and for self-attention) keys and values come from `norm(xs)`. The
    /// norm is the projections' to apply, so that with FP8 it can quantize
    /// its output for them (`Linear::forward_normed`).
    pub fn forward_add(&self, norm: &LayerNorm, xs: &Tensor, kv: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
        self.to_out.forward_add(&self.attend(norm, xs, kv)?, residual)
    }

    /// Everything before `to_out`.
    fn attend(&self, norm: &LayerNorm, xs: &Tensor, kv: Option<&Tensor>) -> Result<Tensor> {
        let n = self.inner;
        let (q, k, v) = match &self.projections {
            Projections::SelfAttention(qkv) => {
                let qkv = qkv.forward_normed(norm, xs)?;
                (
                    qkv.narrow(D::Minus1, 0, n)?,
                    qkv.narrow(D::Minus1, n, n)?,
                    qkv.narrow(D::Minus1, 2 * n, n)?,
                )
            }
            Projections::Cross { to_q, to_kv } => {
                let kv = match kv {
                    Some(kv) => kv.clone(),
                    None => to_kv.forward(&norm.forward(xs)?)?,
                };
                (
                    to_q.forward_normed(norm, xs)?,
                    kv.narrow(D::Minus1, 0, n)?,
                    kv.narrow(D::Minus1, n, n)?,
                )
            }
        };
        attention(&q, &k, &v, self.heads)
    }
}

/// `FeedForward` with `activation_fn="geglu"`: `net.0.proj` → x·gelu(gate) → `net.2`.
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: linear(dim, inner * 2, vb.pp("net.0.proj"))?.with_fp8()?,
            out: linear(inner, dim, vb.pp("net.2"))?.with_fp8()?,
        })
    }

    /// `forward(norm(xs)) + residual`.
    fn forward_add(&self, norm: &LayerNorm, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.out
            .forward_geglu_add(&self.proj.forward_normed(norm, xs)?, residual)
    }
}

#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(dim: usize, heads: usize, head_dim: usize, context_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(dim, None, heads, head_dim, vb.pp("attn1"))?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(dim, Some(context_dim), heads, head_dim, vb.pp("attn2"))?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    /// `kv`: the cross-attention's keys and values of the context.
    fn forward(&self, xs: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let xs = self.attn1.forward_add(&self.norm1, xs, None, xs)?;
        let xs = self.attn2.forward_add(&self.norm2, &xs, Some(kv), &xs)?;
        self.ff.forward_add(&self.norm3, &xs, &xs)
    }
}

/// Shape of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

#[derive(Debug)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// `Transformer2DModel` on continuous input (`[b, c, h, w]` in and out).
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(c: TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let inner = c.heads * c.head_dim;
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Projection::Linear(linear(c.channels, inner, vb.pp("proj_in"))?.with_fp8()?),
                Projection::Linear(linear(inner, c.channels, vb.pp("proj_out"))?.with_fp8()?),
            )
        } else {
            let cfg = Conv2dConfig::default();
            (
                Projection::Conv(conv2d(c.channels, inner, 1, cfg, vb.pp("proj_in"))?),
                Projection::Conv(conv2d(inner, c.channels, 1, cfg, vb.pp("proj_out"))?),
            )
        };
        let transformer_blocks = (0..c.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    inner,
                    c.heads,
                    c.head_dim,
                    c.context_dim,
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            // diffusers fixes this group norm's eps at 1e-6
            norm: group_norm(c.groups, c.channels, 1e-6, vb.pp("norm"))?,
            proj_in,
            transformer_blocks,
            proj_out,
        })
    }

    /// The keys and values over `context` of each block's cross-attention,
    /// in the order [`Self::forward`] takes them.
    pub fn context_kv(&self, context: &Tensor) -> Result<Vec<Tensor>> {
        self.transformer_blocks
            .iter()
            .map(|block| block.attn2.context_kv(context))
            .collect()
    }

    /// The summed row widths of [`Self::context_kv`]'s tensors.
    pub fn context_kv_width(&self) -> usize {
        self.transformer_blocks.iter().map(|b| b.attn2.context_kv_width()).sum()
    }

    /// `kv` yields the keys and values of each block's cross-attention
    /// ([`Self::context_kv`]), one a block.
    ///
    /// On channels-last input (see `nn::to_layer_layout`) the tokens
    /// `[b, h·w, c]` are a view of the image, not a copy, and the residual
    /// is added in `proj_out`'s epilogue; the output is channels-last too.
    pub fn forward(&self, xs: &Tensor, kv: &mut KvIter) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let mut xs = match &self.proj_in {
            Projection::Linear(l) => l.forward(&xs.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)?,
            Projection::Conv(conv) => {
                let y = conv.forward(&xs)?;
                let inner = y.dim(1)?;
                y.permute((0, 2, 3, 1))?.reshape((b, h * w, inner))?
            }
        };
        for block in &self.transformer_blocks {
            let Some(kv) = kv.next() else {
                candle_core::bail!("the context's keys and values ran out before the cross-attentions did")
            };
            xs = block.forward(&xs, kv)?;
        }
        match &self.proj_out {
            Projection::Linear(l) => {
                // a contiguous [b, h, w, c] is the residual's storage when it is channels-last
                let residual_rows = residual.permute((0, 2, 3, 1))?;
                if residual_rows.is_contiguous() {
                    let residual_tokens = residual_rows.reshape((b, h * w, c))?;
                    l.forward_add(&xs, &residual_tokens)?
                        .reshape((b, h, w, c))?
                        .permute((0, 3, 1, 2))
                } else {
                    l.forward(&xs)?.reshape((b, h, w, c))?.permute((0, 3, 1, 2))? + residual
                }
            }
            Projection::Conv(conv) => {
                let inner = xs.dim(2)?;
                // a channels-last view of the tokens, which the CUDA path convolves as it is
                let image = xs.reshape((b, h, w, inner))?.permute((0, 3, 1, 2))?;
                let image = if layers_keep_channels_last(&image) {
                    image
                } else {
                    image.contiguous()?
                };
                conv.forward_add(&image, residual)
            }
        }
    }
}
