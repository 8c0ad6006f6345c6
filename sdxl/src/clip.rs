//! CLIP's text encoder, as transformers' `CLIPTextModel` and
//! `CLIPTextModelWithProjection`, under the checkpoint's own key names
//! (`text_model.encoder.layers.N.self_attn.q_proj`, `text_projection`, …).

use candle_core::{Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::config::ClipTextConfig;
use super::nn::{causal_attention, causal_mask, layer_norm, linear, linear_no_bias, Activation, LayerNorm, Linear};

#[derive(Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    fn new(c: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q = self.q_proj.forward(xs)?;
        let k = self.k_proj.forward(xs)?;
        let v = self.v_proj.forward(xs)?;
        self.out_proj.forward(&causal_attention(&q, &k, &v, self.heads, mask)?)
    }
}

#[derive(Debug)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

#[derive(Debug)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(c: &ClipTextConfig, act: Activation, vb: VarBuilder) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            layer_norm1: layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(c, vb.pp("self_attn"))?,
            layer_norm2: layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: ClipMlp {
                fc1: linear(d, c.intermediate_size, vb.pp("mlp.fc1"))?,
                fc2: linear(c.intermediate_size, d, vb.pp("mlp.fc2"))?,
                act,
            },
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        let h = self.layer_norm2.forward(&xs)?;
        let h = self
            .mlp
            .fc2
            .forward(&self.mlp.act.forward(&self.mlp.fc1.forward(&h)?)?)?;
        xs + h
    }
}

/// What SDXL takes from one text encoder.
#[derive(Debug)]
pub struct ClipOutput {
    /// `hidden_states[-2]`: the output of the next-to-last encoder layer.
    pub penultimate: Tensor,
    /// The final-layer-normed state at the end-of-text token, through
    /// `text_projection` when the model has one (`text_embeds`); `None` when
    /// not asked for.
    pub pooled: Option<Tensor>,
}

/// `CLIPTextModel` (or `…WithProjection` when `text_projection` is loaded).
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    eos_token_id: u32,
    /// [`causal_mask`] over `max_position_embeddings` tokens, made once at
    /// load; a shorter prompt reads its top-left corner.
    causal_mask: Tensor,
    /// The encoder's CUDA graphs (the `graphs` path), one set per value of
    /// `want_pooled`: ~25 small kernels a layer make a text encode
    /// launch-bound, like the TAESD preview.
    #[cfg(feature = "cuda")]
    graphs: [crate::cuda::graph::Graphs; 2],
}

impl ClipTextModel {
    /// Builds the model; `with_projection` loads `text_projection` as
    /// `CLIPTextModelWithProjection` does.
    pub fn new(c: &ClipTextConfig, with_projection: bool, vb: VarBuilder) -> Result<Self> {
        let act = Activation::from_name(&c.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "config.json: `hidden_act` = {:?} is not supported (supported: {})",
                c.hidden_act,
                Activation::NAMES.join(", ")
            ))
        })?;
        if c.num_hidden_layers < 2 {
            candle_core::bail!(
                "config.json: `num_hidden_layers` must be at least 2 for SDXL's penultimate hidden state"
            );
        }
        // transformers ≥ 5 saves the text model without the `text_model.` prefix;
        // the SDXL checkpoints on the hub have it. Read whichever is there.
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let emb = tm.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(c, act, tm.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let text_projection = if with_projection {
            let dim = c.projection_dim.unwrap_or(c.hidden_size);
            Some(linear_no_bias(c.hidden_size, dim, vb.pp("text_projection"))?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: candle_nn::embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: candle_nn::embedding(
                c.max_position_embeddings,
                c.hidden_size,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: layer_norm(c.hidden_size, c.layer_norm_eps, tm.pp("final_layer_norm"))?,
            text_projection,
            eos_token_id: c.eos_token_id,
            causal_mask: causal_mask(c.max_position_embeddings, vb.device())?,
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }

    /// Encodes `[batch, seq]` token ids. The last layer runs only when the
    /// pooled output is wanted: SDXL's first encoder needs just the penultimate state.
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device, want_pooled: bool) -> Result<ClipOutput> {
        let batch = ids.len();
        let seq = ids.first().map_or(0, Vec::len);
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (batch, seq), device)?;
        // the ids are uploaded here; the encoder is a fixed-shape function of
        // device tensors and the model's own, which a CUDA graph can replay
        #[cfg(feature = "cuda")]
        let states = self.graphs[usize::from(want_pooled)].run(&[&input], |x| self.encode(&x[0], want_pooled))?;
        #[cfg(not(feature = "cuda"))]
        let states = self.encode(&input, want_pooled)?;
        if !want_pooled {
            return Ok(ClipOutput {
                penultimate: states,
                pooled: None,
            });
        }
        let (penultimate, last) = (states.i(0)?, states.i(1)?);
        let rows = ids
            .iter()
            .enumerate()
            .map(|(b, seq_ids)| last.i((b, self.pooled_position(seq_ids), ..)))
            .collect::<Result<Vec<_>>>()?;
        let mut pooled = Tensor::stack(&rows, 0)?;
        if let Some(proj) = &self.text_projection {
            pooled = proj.forward(&pooled)?;
        }
        Ok(ClipOutput {
            penultimate,
            pooled: Some(pooled),
        })
    }

    /// The embeddings and encoder layers over token ids `input`: the
    /// penultimate hidden state `[batch, seq, hidden]`, or with `with_last`
    /// that and the final-layer-normed last state stacked, `[2, batch, seq,
    /// hidden]` (where the pooled output is read).
    fn encode(&self, input: &Tensor, with_last: bool) -> Result<Tensor> {
        let seq = input.dim(1)?;
        let mask = self.causal_mask.narrow(0, 0, seq)?.narrow(1, 0, seq)?;
        let positions = Tensor::arange(0u32, seq as u32, input.device())?;
        let mut xs = self
            .token_embedding
            .forward(input)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let (last, rest) = self.layers.split_last().expect("at least two layers, checked at load");
        for layer in rest {
            xs = layer.forward(&xs, &mask)?;
        }
        if !with_last {
            return Ok(xs);
        }
        let last = self.final_layer_norm.forward(&last.forward(&xs, &mask)?)?;
        Tensor::stack(&[&xs, &last], 0)
    }

    /// Where transformers reads the pooled output: with the legacy
    /// `eos_token_id == 2` the arg-max id (first on ties), else the first
    /// `eos_token_id`, falling back to the last position.
    fn pooled_position(&self, ids: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&t| t == max).unwrap_or(0)
        } else {
            ids.iter()
                .position(|&t| t == self.eos_token_id)
                .unwrap_or(ids.len().saturating_sub(1))
        }
    }
}
