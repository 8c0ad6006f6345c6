//! The weight keys of transformers' `CLIPTextModel` /
//! `CLIPTextModelWithProjection`, from `text_encoder*/config.json`.
//!
//! `embeddings.position_ids` is not listed: it is a buffer (0..77), not a
//! weight, newer transformers do not save it, and the model never reads it.

use super::keys::ComponentKeys;
use crate::config::ClipTextConfig;
use crate::ModelError;

/// A CLIP text encoder's shape parameters.
#[derive(Debug, Clone)]
pub struct ClipPlan {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub max_positions: usize,
    /// `text_projection` output size, for `CLIPTextModelWithProjection`.
    pub projection: Option<usize>,
}

impl ClipPlan {
    pub fn new(c: &ClipTextConfig, with_projection: bool, file: &str) -> Result<Self, ModelError> {
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(ModelError::config(
                file,
                format!(
                    "`hidden_size` {} does not split into `num_attention_heads` {}",
                    c.hidden_size, c.num_attention_heads
                ),
            ));
        }
        Ok(Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            layers: c.num_hidden_layers,
            max_positions: c.max_position_embeddings,
            projection: with_projection.then(|| c.projection_dim.unwrap_or(c.hidden_size)),
        })
    }

    /// Every weight with its shape, `text_model.`-prefixed.
    pub fn keys(&self) -> ComponentKeys {
        let mut k = ComponentKeys::default();
        let (h, m) = (self.hidden_size, self.intermediate_size);
        k.push(
            "text_model.embeddings.token_embedding.weight".into(),
            vec![self.vocab_size, h],
        );
        k.push(
            "text_model.embeddings.position_embedding.weight".into(),
            vec![self.max_positions, h],
        );
        for i in 0..self.layers {
            let l = format!("text_model.encoder.layers.{i}");
            k.push_norm(&format!("{l}.layer_norm1"), h);
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                k.push_wb(&format!("{l}.self_attn.{p}"), vec![h, h], h);
            }
            k.push_norm(&format!("{l}.layer_norm2"), h);
            k.push_wb(&format!("{l}.mlp.fc1"), vec![m, h], m);
            k.push_wb(&format!("{l}.mlp.fc2"), vec![h, m], h);
        }
        k.push_norm("text_model.final_layer_norm", h);
        if let Some(p) = self.projection {
            k.push("text_projection.weight".into(), vec![p, h]);
        }
        k
    }
}
