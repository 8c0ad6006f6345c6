//! The prompt's conditioning, as `encode_prompt` in diffusers' SDXL
//! pipelines: both tokenizers and text encoders, the penultimate hidden
//! states side by side and the second encoder's projected pooled output;
//! with guidance, the negative prompt's first (zeros for an empty one when
//! the model asks for them).

use candle_core::Tensor;

use super::model::{PromptEmbeds, SdxlPipeline};
use crate::ModelError;

impl SdxlPipeline {
    /// Token ids of `text` for both tokenizers (exposed for tests).
    pub fn tokenize(&self, text: &str) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
        Ok((self.tokenizer.encode(text)?, self.tokenizer_2.encode(text)?))
    }

    /// `encode_prompt` for one text: the concatenated penultimate states of
    /// both encoders `[1, 77, d1+d2]` and the projected pooled output `[1, p]`.
    pub fn encode_text(&self, text: &str) -> Result<(Tensor, Tensor), ModelError> {
        let (ids_1, ids_2) = self.tokenize(text)?;
        let models = self.active();
        let out_1 = models.text_encoder.forward(&[ids_1], &self.device, false)?;
        let out_2 = models.text_encoder_2.forward(&[ids_2], &self.device, true)?;
        let embeds = Tensor::cat(&[&out_1.penultimate, &out_2.penultimate], 2)?;
        let pooled = out_2
            .pooled
            .ok_or_else(|| ModelError::Input("text_encoder_2 returned no pooled output".into()))?;
        Ok((embeds, pooled))
    }

    /// The conditioning the UNet gets: with guidance, the negative prompt's
    /// (zeros when it is empty and `force_zeros_for_empty_prompt`) then the prompt's.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        do_cfg: bool,
    ) -> Result<PromptEmbeds, ModelError> {
        let (embeds, pooled) = self.encode_text(prompt)?;
        if !do_cfg {
            return Ok(PromptEmbeds {
                prompt_embeds: embeds,
                pooled_prompt_embeds: pooled,
            });
        }
        let negative = negative_prompt.filter(|n| !n.is_empty());
        let (neg_embeds, neg_pooled) = match negative {
            None if self.force_zeros_for_empty_prompt => (embeds.zeros_like()?, pooled.zeros_like()?),
            _ => self.encode_text(negative.unwrap_or(""))?,
        };
        Ok(PromptEmbeds {
            prompt_embeds: Tensor::cat(&[&neg_embeds, &embeds], 0)?,
            pooled_prompt_embeds: Tensor::cat(&[&neg_pooled, &pooled], 0)?,
        })
    }
}
