//! diffusers' `UNet2DConditionModel` with SDXL's `text_time` added
//! conditioning, built from `unet/config.json` and the checkpoint's own keys.

mod attention;
mod blocks;
mod embeddings;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use self::blocks::{BlockCommon, CrossAttention, DownBlock, MidBlock, UpBlock, UpChannels};
use self::embeddings::{TimestepEmbedding, Timesteps};
use super::config::{expect_one_of, PerBlock, UNetConfig};
use super::nn::{conv2d_same, group_norm, Activation, Conv2d, GroupNorm};
use super::resnet::ResnetConfig;
use super::ModelError;

const FILE: &str = "unet/config.json";

/// SDXL's micro-conditioning: the pooled text embedding and six `time_ids`
/// (original size, crop top-left, target size) through `add_time_proj` and
/// `add_embedding`.
#[derive(Debug)]
struct TextTimeEmbedding {
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
}

/// The UNet.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    center_input_sample: bool,
    dtype: DType,
    /// The forward's CUDA graphs, one per input shape (the `graphs` path).
    #[cfg(feature = "cuda")]
    graphs: crate::cuda::graph::Graphs,
}

fn unsupported(key: &str, value: impl std::fmt::Debug, supported: &str) -> ModelError {
    ModelError::Config {
        file: FILE.into(),
        message: format!("`{key}` = {value:?} is not supported (supported: {supported})"),
    }
}

/// Checks the config keys this port does not implement, naming each.
fn validate(c: &UNetConfig, n: usize) -> std::result::Result<(), ModelError> {
    for t in &c.down_block_types {
        expect_one_of(FILE, "down_block_types", t, &["DownBlock2D", "CrossAttnDownBlock2D"])?;
    }
    for t in &c.up_block_types {
        expect_one_of(FILE, "up_block_types", t, &["UpBlock2D", "CrossAttnUpBlock2D"])?;
    }
    if let Some(mid) = &c.mid_block_type {
        expect_one_of(FILE, "mid_block_type", mid, &["UNetMidBlock2DCrossAttn"])?;
    }
    if c.up_block_types.len() != n || c.block_out_channels.len() != n || n == 0 {
        return Err(ModelError::Config {
            file: FILE.into(),
            message: format!(
                "`down_block_types` ({n}), `up_block_types` ({}) and `block_out_channels` ({}) must have the same, non-zero length",
                c.up_block_types.len(),
                c.block_out_channels.len()
            ),
        });
    }
    if let Some(t) = &c.addition_embed_type {
        expect_one_of(FILE, "addition_embed_type", t, &["text_time"])?;
    }
    expect_one_of(FILE, "time_embedding_type", &c.time_embedding_type, &["positional"])?;
    expect_one_of(
        FILE,
        "resnet_time_scale_shift",
        &c.resnet_time_scale_shift,
        &["default"],
    )?;
    expect_one_of(FILE, "attention_type", &c.attention_type, &["default"])?;
    let nulls: [(&str, bool, String); 6] = [
        (
            "class_embed_type",
            c.class_embed_type.is_none(),
            format!("{:?}", c.class_embed_type),
        ),
        (
            "encoder_hid_dim",
            c.encoder_hid_dim.is_none(),
            format!("{:?}", c.encoder_hid_dim),
        ),
        (
            "time_cond_proj_dim",
            c.time_cond_proj_dim.is_none(),
            format!("{:?}", c.time_cond_proj_dim),
        ),
        (
            "time_embedding_act_fn",
            c.time_embedding_act_fn.is_none(),
            format!("{:?}", c.time_embedding_act_fn),
        ),
        (
            "timestep_post_act",
            c.timestep_post_act.is_none(),
            format!("{:?}", c.timestep_post_act),
        ),
        (
            "cross_attention_norm",
            c.cross_attention_norm.is_none(),
            format!("{:?}", c.cross_attention_norm),
        ),
    ];
    for (key, ok, value) in nulls {
        if !ok {
            return Err(unsupported(key, value, "null"));
        }
    }
    if c.dual_cross_attention {
        return Err(unsupported("dual_cross_attention", true, "false"));
    }
    if c.only_cross_attention
        .expand(n, FILE, "only_cross_attention")?
        .iter()
        .any(|&b| b)
    {
        return Err(unsupported("only_cross_attention", &c.only_cross_attention, "false"));
    }
    Ok(())
}

fn layer_counts(spec: &PerBlock<usize>, n_layers: usize, key: &str) -> std::result::Result<Vec<usize>, ModelError> {
    spec.expand(n_layers, FILE, key)
}

impl UNet2DConditionModel {
    /// Builds the UNet that `c` describes from the weights under `vb`.
    pub fn new(c: &UNetConfig, vb: VarBuilder) -> std::result::Result<Self, ModelError> {
        let n = c.down_block_types.len();
        validate(c, n)?;
        let act =
            Activation::from_name(&c.act_fn).ok_or_else(|| unsupported("act_fn", &c.act_fn, "silu, gelu, relu"))?;
        let boc = &c.block_out_channels;
        let layers_per_block = c.layers_per_block.expand(n, FILE, "layers_per_block")?;
        let heads =
            c.num_attention_heads
                .as_ref()
                .unwrap_or(&c.attention_head_dim)
                .expand(n, FILE, "num_attention_heads")?;
        let cross_dims = c.cross_attention_dim.expand(n, FILE, "cross_attention_dim")?;
        let tlpb = c
            .transformer_layers_per_block
            .per_block(n, FILE, "transformer_layers_per_block")?;
        let reversed_tlpb = match &c.reverse_transformer_layers_per_block {
            Some(r) => r.per_block(n, FILE, "reverse_transformer_layers_per_block")?,
            None => tlpb.iter().rev().cloned().collect(),
        };
        let time_embed_dim = c.time_embedding_dim.unwrap_or(boc[0] * 4);
        let common = BlockCommon {
            temb_channels: time_embed_dim,
            resnet: ResnetConfig {
                in_channels: 0,
                out_channels: 0,
                temb_channels: Some(time_embed_dim),
                groups: c.norm_num_groups,
                eps: c.norm_eps,
                act,
                output_scale_factor: 1.0,
            },
            groups: c.norm_num_groups,
            use_linear_projection: c.use_linear_projection,
        };
        let build = || -> Result<Self> {
            let time_proj = Timesteps {
                dim: boc[0],
                flip_sin_to_cos: c.flip_sin_to_cos,
                downscale_freq_shift: c.freq_shift,
            };
            let time_embedding = TimestepEmbedding::new(boc[0], time_embed_dim, act, vb.pp("time_embedding"))?;
            let add = match c.addition_embed_type.as_deref() {
                Some("text_time") => {
                    let (Some(time_dim), Some(in_dim)) =
                        (c.addition_time_embed_dim, c.projection_class_embeddings_input_dim)
                    else {
                        candle_core::bail!("{FILE}: `text_time` needs `addition_time_embed_dim` and `projection_class_embeddings_input_dim`");
                    };
                    Some(TextTimeEmbedding {
                        add_time_proj: Timesteps {
                            dim: time_dim,
                            flip_sin_to_cos: c.flip_sin_to_cos,
                            downscale_freq_shift: c.freq_shift,
                        },
                        add_embedding: TimestepEmbedding::new(in_dim, time_embed_dim, act, vb.pp("add_embedding"))?,
                    })
                }
                _ => None,
            };
            let cross_for = |i: usize, is_cross: bool, layers: Vec<usize>| {
                is_cross.then(|| CrossAttention {
                    heads: heads[i],
                    context_dim: cross_dims[i],
                    layers,
                })
            };
            let mut down_blocks = Vec::with_capacity(n);
            let mut out_ch = boc[0];
            for (i, kind) in c.down_block_types.iter().enumerate() {
                let in_ch = out_ch;
                out_ch = boc[i];
                let layers = layer_counts(&tlpb[i], layers_per_block[i], "transformer_layers_per_block")
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let cross = cross_for(i, kind == "CrossAttnDownBlock2D", layers);
                down_blocks.push(DownBlock::new(
                    &common,
                    in_ch,
                    out_ch,
                    layers_per_block[i],
                    cross.as_ref(),
                    i + 1 < n,
                    c.downsample_padding,
                    vb.pp(format!("down_blocks.{i}")),
                )?);
            }
            let mid_block = match c.mid_block_type {
                Some(_) => {
                    let layers = layer_counts(&tlpb[n - 1], 1, "transformer_layers_per_block")
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    let cross = CrossAttention {
                        heads: heads[n - 1],
                        context_dim: cross_dims[n - 1],
                        layers,
                    };
                    let mid_common = BlockCommon {
                        resnet: ResnetConfig {
                            output_scale_factor: c.mid_block_scale_factor,
                            ..common.resnet
                        },
                        ..common
                    };
                    Some(MidBlock::new(&mid_common, boc[n - 1], &cross, vb.pp("mid_block"))?)
                }
                None => None,
            };
            let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
            let (rboc, rheads, rlayers, rcross) = (rev(boc), rev(&heads), rev(&layers_per_block), rev(&cross_dims));
            let mut up_blocks = Vec::with_capacity(n);
            let mut out_ch = rboc[0];
            for (i, kind) in c.up_block_types.iter().enumerate() {
                let prev_out = out_ch;
                out_ch = rboc[i];
                let in_ch = rboc[(i + 1).min(n - 1)];
                let num_layers = rlayers[i] + 1;
                let layers = layer_counts(&reversed_tlpb[i], num_layers, "reverse_transformer_layers_per_block")
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let cross = (kind == "CrossAttnUpBlock2D").then(|| CrossAttention {
                    heads: rheads[i],
                    context_dim: rcross[i],
                    layers,
                });
                up_blocks.push(UpBlock::new(
                    &common,
                    UpChannels {
                        c_in: in_ch,
                        c_out: out_ch,
                        prev_out,
                    },
                    num_layers,
                    cross.as_ref(),
                    i + 1 < n,
                    vb.pp(format!("up_blocks.{i}")),
                )?);
            }
            Ok(Self {
                conv_in: conv2d_same(c.in_channels, boc[0], c.conv_in_kernel, vb.pp("conv_in"))?,
                time_proj,
                time_embedding,
                add,
                down_blocks,
                mid_block,
                up_blocks,
                conv_norm_out: group_norm(c.norm_num_groups, boc[0], c.norm_eps, vb.pp("conv_norm_out"))?,
                conv_act: act,
                conv_out: conv2d_same(boc[0], c.out_channels, c.conv_out_kernel, vb.pp("conv_out"))?,
                center_input_sample: c.center_input_sample,
                dtype: vb.dtype(),
                #[cfg(feature = "cuda")]
                graphs: Default::default(),
            })
        };
        build().map_err(|error| ModelError::Weights {
            component: "unet".into(),
            error: crate::without_backtrace(error),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The transformers of every block, in the order the forward runs them.
    fn transformers(&self) -> impl Iterator<Item = &attention::Transformer2DModel> {
        let down = self.down_blocks.iter().flat_map(|b| b.transformers());
        let mid = self.mid_block.iter().flat_map(|b| b.transformers());
        let up = self.up_blocks.iter().flat_map(|b| b.transformers());
        down.chain(mid).chain(up)
    }

    /// What every step of a denoising loop gives the UNet alike, made once
    /// for the loop: the keys and values of every cross-attention over
    /// `encoder_hidden_states` (`[b, tokens, d]`) and SDXL's added embedding
    /// of `text_embeds` (`[b, p]`, pooled) and `time_ids` (`[b, 6]`).
    /// [`Self::forward_conditioned`] takes it.
    pub fn conditioning(
        &self,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<Conditioning> {
        let context = encoder_hidden_states.to_dtype(self.dtype)?;
        let mut layers = Vec::new();
        for transformer in self.transformers() {
            layers.extend(transformer.context_kv(&context)?);
        }
        let kv = ContextKv::new(&context, &layers)?;
        let added = match &self.add {
            Some(add) => {
                // the ids go through the sinusoids on the host (a copy back
                // from the device, once a loop rather than once a step)
                let ids: Vec<f32> = time_ids.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let time_embeds = add
                    .add_time_proj
                    .forward(&ids, time_ids.device())?
                    .reshape((kv.batch, ()))?;
                let add_embeds =
                    Tensor::cat(&[&text_embeds.to_dtype(DType::F32)?, &time_embeds], 1)?.to_dtype(self.dtype)?;
                Some(add.add_embedding.forward(&add_embeds)?)
            }
            None => None,
        };
        Ok(Conditioning { kv, added })
    }

    /// Bytes of [`Conditioning`]'s keys and values for `rows` contexts of
    /// `tokens` tokens (alignment padding aside).
    pub fn context_kv_bytes(&self, rows: usize, tokens: usize) -> usize {
        let width: usize = self.transformers().map(|t| t.context_kv_width()).sum();
        rows * tokens * width * self.dtype.size_in_bytes()
    }

    /// One denoising prediction.
    ///
    /// `sample` `[b, c, h, w]`, `timestep` the scheduler's value,
    /// `encoder_hidden_states` `[b, 77, d]`, `text_embeds` `[b, p]` (pooled),
    /// `time_ids` `[b, 6]`. A loop over steps makes [`Self::conditioning`]
    /// once and calls [`Self::forward_conditioned`]; this is the two in one.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f32,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<Tensor> {
        let conditioning = self.conditioning(encoder_hidden_states, text_embeds, time_ids)?;
        self.forward_conditioned(sample, timestep, &conditioning)
    }

    /// [`Self::forward`] with what does not change from one step to the
    /// next made beforehand ([`Self::conditioning`]): the same prediction,
    /// without redoing at every step the products over the text context, and
    /// without the copy to the host that would make each step wait for the
    /// one before it to finish.
    pub fn forward_conditioned(&self, sample: &Tensor, timestep: f32, conditioning: &Conditioning) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let kv = &conditioning.kv;
        if kv.batch != batch {
            candle_core::bail!(
                "the conditioning is for a batch of {}, the sample's is {batch}",
                kv.batch
            );
        }
        let t_emb = self
            .time_proj
            .forward(&vec![timestep; batch], sample.device())?
            .to_dtype(self.dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(added) = &conditioning.added {
            emb = (emb + added)?;
        }
        // the time embedding is made on the host; the rest is a fixed-shape
        // function of device tensors, which a CUDA graph can replay (the
        // keys and values, one buffer, are copied in only when they change)
        #[cfg(feature = "cuda")]
        return self.graphs.run(&[sample, &emb, &kv.buffer], |x| {
            self.forward_body(&x[0], &x[1], &kv.layers(&x[2])?)
        });
        #[cfg(not(feature = "cuda"))]
        self.forward_body(sample, &emb, &kv.layers(&kv.buffer)?)
    }

    /// [`Self::forward`] after the time embedding `emb`, with the
    /// cross-attentions' keys and values `kv`, in forward order.
    fn forward_body(&self, sample: &Tensor, emb: &Tensor, kv: &[Tensor]) -> Result<Tensor> {
        let mut kv = kv.iter();
        let sample = if self.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        // channels-last from here on, where the CUDA path keeps it (a no-op elsewhere)
        let mut xs = self.conv_in.forward_into_layer_layout(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&xs, emb, &mut kv)?;
            xs = out;
            skips.extend(states);
        }
        if let Some(mid) = &self.mid_block {
            xs = mid.forward(&xs, emb, &mut kv)?;
        }
        for block in &self.up_blocks {
            let take = block.num_resnets();
            let rest = skips.len() - take;
            let upsample_size = match skips[..rest].last() {
                Some(next) => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                None => None,
            };
            xs = block.forward(&xs, &skips[rest..], emb, &mut kv, upsample_size)?;
            skips.truncate(rest);
        }
        if kv.next().is_some() {
            candle_core::bail!("the context has keys and values for more cross-attentions than the UNet has");
        }
        let xs = self.conv_norm_out.forward_act(&xs, Some(self.conv_act))?;
        self.conv_out.forward(&xs)?.contiguous()
    }
}

/// What every step of a denoising loop gives the UNet alike
/// ([`UNet2DConditionModel::conditioning`]), made once for the loop rather
/// than once a step.
#[derive(Debug, Clone)]
pub struct Conditioning {
    kv: ContextKv,
    /// `add_embedding(text_embeds ‖ add_time_proj(time_ids))`, `[b, temb]`;
    /// `None` without SDXL's `text_time` embedding.
    added: Option<Tensor>,
}

impl Conditioning {
    /// Bytes the text context's keys and values hold on the device.
    pub fn context_bytes(&self) -> usize {
        self.kv.bytes()
    }
}

/// The keys and values of every cross-attention of a UNet over one text
/// context, `[b, tokens, 2·inner]` each, keys first.
///
/// They live in one flat buffer, each layer's a contiguous range of it (its
/// start rounded up to [`ContextKv::ALIGN`] elements, so the kernels that
/// read it see the alignment a tensor of its own has), so that a CUDA graph
/// takes all of them as one input.
#[derive(Debug, Clone)]
struct ContextKv {
    buffer: Tensor,
    batch: usize,
    /// Each layer's start in the buffer and its shape.
    layers: Vec<(usize, (usize, usize, usize))>,
}

impl ContextKv {
    /// Elements each layer's range starts at a multiple of (256 bytes in f16).
    const ALIGN: usize = 128;

    /// The keys and values `layers` over `context`.
    fn new(context: &Tensor, layers: &[Tensor]) -> Result<Self> {
        let batch = context.dim(0)?;
        if layers.is_empty() {
            // a UNet without cross-attention: one element, so that the
            // buffer is a tensor like any other (a graph input, say)
            return Ok(Self {
                buffer: Tensor::zeros(1, context.dtype(), context.device())?,
                batch,
                layers: Vec::new(),
            });
        }
        let mut pieces = Vec::with_capacity(2 * layers.len());
        let mut shapes = Vec::with_capacity(layers.len());
        let mut start = 0;
        for kv in layers {
            let dims = kv.dims3()?;
            let len = kv.elem_count();
            shapes.push((start, dims));
            pieces.push(kv.flatten_all()?);
            let padded = len.next_multiple_of(Self::ALIGN);
            if padded > len {
                pieces.push(Tensor::zeros(padded - len, kv.dtype(), kv.device())?);
            }
            start += padded;
        }
        Ok(Self {
            buffer: Tensor::cat(&pieces, 0)?,
            batch,
            layers: shapes,
        })
    }

    /// Each layer's keys and values, as views of `buffer` (this one's, or a
    /// copy of it a CUDA graph reads).
    fn layers(&self, buffer: &Tensor) -> Result<Vec<Tensor>> {
        self.layers
            .iter()
            .map(|&(start, dims)| buffer.narrow(0, start, dims.0 * dims.1 * dims.2)?.reshape(dims))
            .collect()
    }

    /// Bytes the buffer holds.
    fn bytes(&self) -> usize {
        self.buffer.elem_count() * self.buffer.dtype().size_in_bytes()
    }
}
