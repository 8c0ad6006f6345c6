//! The block structure of diffusers' `UNet2DConditionModel` as its config
//! lays it out (resnets, attentions and samplers per block, with channel
//! counts), and the UNet's weight keys derived from that structure.
//!
//! The channel arithmetic follows diffusers' constructor (and the model
//! crate's `unet/mod.rs`) step for step: a block's first resnet takes the
//! previous block's width, an up block's resnets also take the skip
//! connections, and the last block of each side has no sampler.

use super::keys::ComponentKeys;
use crate::config::{expect_one_of, PerBlock, UNetConfig};
use crate::ModelError;

const FILE: &str = "unet/config.json";

/// One `ResnetBlock2D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResnetPlan {
    pub in_channels: usize,
    pub out_channels: usize,
}

/// A `ResnetBlock2D` (UNet and VAE alike): two norm + 3×3-conv stages, the
/// time-embedding projection when `temb` is given (the VAE has none), and a
/// 1×1 `conv_shortcut` when the width changes.
pub(crate) fn push_resnet(k: &mut ComponentKeys, prefix: &str, r: ResnetPlan, temb: Option<usize>) {
    let (i, o) = (r.in_channels, r.out_channels);
    k.push_norm(&format!("{prefix}.norm1"), i);
    k.push_wb(&format!("{prefix}.conv1"), vec![o, i, 3, 3], o);
    if let Some(t) = temb {
        k.push_wb(&format!("{prefix}.time_emb_proj"), vec![o, t], o);
    }
    k.push_norm(&format!("{prefix}.norm2"), o);
    k.push_wb(&format!("{prefix}.conv2"), vec![o, o, 3, 3], o);
    if i != o {
        k.push_wb(&format!("{prefix}.conv_shortcut"), vec![o, i, 1, 1], o);
    }
}

/// One `Transformer2DModel` (SGM's `SpatialTransformer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPlan {
    pub channels: usize,
    /// Number of `transformer_blocks`.
    pub layers: usize,
    pub context_dim: usize,
}

/// One down, mid or up block: its resnets, the attention after each resnet
/// (none in a plain block), and its down/upsampler's channels if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPlan {
    pub resnets: Vec<ResnetPlan>,
    pub attentions: Vec<AttentionPlan>,
    pub sampler: Option<usize>,
}

/// The whole UNet, block by block.
#[derive(Debug, Clone)]
pub struct UNetPlan {
    pub in_channels: usize,
    pub out_channels: usize,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    /// `block_out_channels[0]`: conv_in's width and the sinusoid size.
    pub base_channels: usize,
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim` when SDXL's `text_time`
    /// conditioning (`add_embedding`) is present.
    pub add_embedding_in: Option<usize>,
    /// Linear (SDXL) or 1×1-conv `proj_in`/`proj_out`.
    pub use_linear_projection: bool,
    pub down: Vec<BlockPlan>,
    pub mid: Option<BlockPlan>,
    pub up: Vec<BlockPlan>,
}

fn unsupported(key: &str, value: impl std::fmt::Debug, supported: &str) -> ModelError {
    ModelError::config(
        FILE,
        format!("`{key}` = {value:?} is not supported (supported: {supported})"),
    )
}

/// Rejects the config values that would add or reshape weights in ways this
/// layout does not describe.
fn validate(c: &UNetConfig) -> Result<usize, ModelError> {
    let n = c.down_block_types.len();
    for t in &c.down_block_types {
        expect_one_of(FILE, "down_block_types", t, &["DownBlock2D", "CrossAttnDownBlock2D"])?;
    }
    for t in &c.up_block_types {
        expect_one_of(FILE, "up_block_types", t, &["UpBlock2D", "CrossAttnUpBlock2D"])?;
    }
    if let Some(mid) = &c.mid_block_type {
        expect_one_of(FILE, "mid_block_type", mid, &["UNetMidBlock2DCrossAttn"])?;
    }
    if n == 0 || c.up_block_types.len() != n || c.block_out_channels.len() != n {
        return Err(ModelError::config(
            FILE,
            format!(
                "`down_block_types` ({n}), `up_block_types` ({}) and `block_out_channels` ({}) must have the same, non-zero length",
                c.up_block_types.len(),
                c.block_out_channels.len()
            ),
        ));
    }
    if let Some(t) = &c.addition_embed_type {
        expect_one_of(FILE, "addition_embed_type", t, &["text_time"])?;
    }
    expect_one_of(FILE, "time_embedding_type", &c.time_embedding_type, &["positional"])?;
    expect_one_of(FILE, "attention_type", &c.attention_type, &["default"])?;
    if let Some(v) = &c.class_embed_type {
        return Err(unsupported("class_embed_type", v, "null"));
    }
    if let Some(v) = c.encoder_hid_dim {
        return Err(unsupported("encoder_hid_dim", v, "null"));
    }
    if let Some(v) = c.time_cond_proj_dim {
        return Err(unsupported("time_cond_proj_dim", v, "null"));
    }
    if c.dual_cross_attention {
        return Err(unsupported("dual_cross_attention", true, "false"));
    }
    Ok(n)
}

impl UNetPlan {
    pub fn new(c: &UNetConfig) -> Result<Self, ModelError> {
        let n = validate(c)?;
        let boc = &c.block_out_channels;
        let layers_per_block = c.layers_per_block.expand(n, FILE, "layers_per_block")?;
        // diffusers' historical naming: `attention_head_dim` is the head count
        // unless `num_attention_heads` is given.
        let heads =
            c.num_attention_heads
                .as_ref()
                .unwrap_or(&c.attention_head_dim)
                .expand(n, FILE, "num_attention_heads")?;
        let cross_dims = c.cross_attention_dim.expand(n, FILE, "cross_attention_dim")?;
        let tlpb = c
            .transformer_layers_per_block
            .per_block(n, FILE, "transformer_layers_per_block")?;
        let reversed_tlpb: Vec<PerBlock<usize>> = match &c.reverse_transformer_layers_per_block {
            Some(r) => r.per_block(n, FILE, "reverse_transformer_layers_per_block")?,
            None => tlpb.iter().rev().cloned().collect(),
        };
        let attention = |channels: usize, h: usize, layers: usize, context_dim: usize| {
            if h == 0 || !channels.is_multiple_of(h) {
                return Err(ModelError::config(
                    FILE,
                    format!("{channels} channels do not split into {h} attention heads"),
                ));
            }
            Ok(AttentionPlan {
                channels,
                layers,
                context_dim,
            })
        };

        let mut down = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let layers = tlpb[i].expand(layers_per_block[i], FILE, "transformer_layers_per_block")?;
            let resnets = (0..layers_per_block[i])
                .map(|j| ResnetPlan {
                    in_channels: if j == 0 { in_ch } else { out_ch },
                    out_channels: out_ch,
                })
                .collect();
            let attentions = if kind == "CrossAttnDownBlock2D" {
                layers
                    .iter()
                    .map(|&l| attention(out_ch, heads[i], l, cross_dims[i]))
                    .collect::<Result<_, _>>()?
            } else {
                Vec::new()
            };
            down.push(BlockPlan {
                resnets,
                attentions,
                sampler: (i + 1 < n).then_some(out_ch),
            });
        }

        let top = boc[n - 1];
        let mid = match c.mid_block_type {
            Some(_) => {
                let layers = tlpb[n - 1].expand(1, FILE, "transformer_layers_per_block")?;
                let resnet = ResnetPlan {
                    in_channels: top,
                    out_channels: top,
                };
                Some(BlockPlan {
                    resnets: vec![resnet; layers.len() + 1],
                    attentions: layers
                        .iter()
                        .map(|&l| attention(top, heads[n - 1], l, cross_dims[n - 1]))
                        .collect::<Result<_, _>>()?,
                    sampler: None,
                })
            }
            None => None,
        };

        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let (rboc, rheads, rlayers, rcross) = (rev(boc), rev(&heads), rev(&layers_per_block), rev(&cross_dims));
        let mut up = Vec::with_capacity(n);
        let mut out_ch = rboc[0];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let prev_out = out_ch;
            out_ch = rboc[i];
            let skip_in = rboc[(i + 1).min(n - 1)];
            let num = rlayers[i] + 1;
            let layers = reversed_tlpb[i].expand(num, FILE, "reverse_transformer_layers_per_block")?;
            let resnets = (0..num)
                .map(|j| {
                    let skip = if j == num - 1 { skip_in } else { out_ch };
                    let input = if j == 0 { prev_out } else { out_ch };
                    ResnetPlan {
                        in_channels: input + skip,
                        out_channels: out_ch,
                    }
                })
                .collect();
            let attentions = if kind == "CrossAttnUpBlock2D" {
                layers
                    .iter()
                    .map(|&l| attention(out_ch, rheads[i], l, rcross[i]))
                    .collect::<Result<_, _>>()?
            } else {
                Vec::new()
            };
            up.push(BlockPlan {
                resnets,
                attentions,
                sampler: (i + 1 < n).then_some(out_ch),
            });
        }

        let add_embedding_in = match c.addition_embed_type.as_deref() {
            Some(_) => Some(c.projection_class_embeddings_input_dim.ok_or_else(|| {
                ModelError::config(FILE, "`text_time` needs `projection_class_embeddings_input_dim`")
            })?),
            None => None,
        };
        Ok(Self {
            in_channels: c.in_channels,
            out_channels: c.out_channels,
            conv_in_kernel: c.conv_in_kernel,
            conv_out_kernel: c.conv_out_kernel,
            base_channels: boc[0],
            time_embed_dim: c.time_embedding_dim.unwrap_or(boc[0] * 4),
            add_embedding_in,
            use_linear_projection: c.use_linear_projection,
            down,
            mid,
            up,
        })
    }

    /// Every UNet weight with its shape.
    pub fn keys(&self) -> ComponentKeys {
        let mut k = ComponentKeys::default();
        let (b, t) = (self.base_channels, self.time_embed_dim);
        k.push_wb(
            "conv_in",
            vec![b, self.in_channels, self.conv_in_kernel, self.conv_in_kernel],
            b,
        );
        k.push_wb("time_embedding.linear_1", vec![t, b], t);
        k.push_wb("time_embedding.linear_2", vec![t, t], t);
        if let Some(add_in) = self.add_embedding_in {
            k.push_wb("add_embedding.linear_1", vec![t, add_in], t);
            k.push_wb("add_embedding.linear_2", vec![t, t], t);
        }
        let blocks = self
            .down
            .iter()
            .enumerate()
            .map(|(i, blk)| (format!("down_blocks.{i}"), blk, "downsamplers"))
            .chain(self.mid.iter().map(|blk| ("mid_block".to_string(), blk, "")))
            .chain(
                self.up
                    .iter()
                    .enumerate()
                    .map(|(i, blk)| (format!("up_blocks.{i}"), blk, "upsamplers")),
            );
        for (prefix, blk, sampler_name) in blocks {
            for (j, r) in blk.resnets.iter().enumerate() {
                push_resnet(&mut k, &format!("{prefix}.resnets.{j}"), *r, Some(t));
            }
            for (j, a) in blk.attentions.iter().enumerate() {
                self.push_transformer(&mut k, &format!("{prefix}.attentions.{j}"), a);
            }
            if let Some(ch) = blk.sampler {
                k.push_wb(&format!("{prefix}.{sampler_name}.0.conv"), vec![ch, ch, 3, 3], ch);
            }
        }
        k.push_norm("conv_norm_out", b);
        let oc = self.out_channels;
        k.push_wb("conv_out", vec![oc, b, self.conv_out_kernel, self.conv_out_kernel], oc);
        k
    }

    /// A `Transformer2DModel`: group norm, `proj_in`, the `BasicTransformerBlock`s
    /// (self-attention without q/k/v biases, cross-attention from the context,
    /// GEGLU feed-forward of 4× width), `proj_out`.
    fn push_transformer(&self, k: &mut ComponentKeys, prefix: &str, a: &AttentionPlan) {
        let (c, ctx) = (a.channels, a.context_dim);
        let proj = |inp: usize, out: usize| {
            if self.use_linear_projection {
                vec![out, inp]
            } else {
                vec![out, inp, 1, 1]
            }
        };
        k.push_norm(&format!("{prefix}.norm"), c);
        k.push_wb(&format!("{prefix}.proj_in"), proj(c, c), c);
        for t in 0..a.layers {
            let tb = format!("{prefix}.transformer_blocks.{t}");
            for (attn, kv_dim) in [("attn1", c), ("attn2", ctx)] {
                let norm = if attn == "attn1" { "norm1" } else { "norm2" };
                k.push_norm(&format!("{tb}.{norm}"), c);
                k.push(format!("{tb}.{attn}.to_q.weight"), vec![c, c]);
                k.push(format!("{tb}.{attn}.to_k.weight"), vec![c, kv_dim]);
                k.push(format!("{tb}.{attn}.to_v.weight"), vec![c, kv_dim]);
                k.push_wb(&format!("{tb}.{attn}.to_out.0"), vec![c, c], c);
            }
            k.push_norm(&format!("{tb}.norm3"), c);
            k.push_wb(&format!("{tb}.ff.net.0.proj"), vec![8 * c, c], 8 * c);
            k.push_wb(&format!("{tb}.ff.net.2"), vec![c, 4 * c], c);
        }
        k.push_wb(&format!("{prefix}.proj_out"), proj(c, c), c);
    }
}
