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
        self.encode_texts(&[text])
    }

    /// [`Self::encode_text`] for several texts in one batch through each
    /// encoder (`[n, 77, d1+d2]`, `[n, p]`, in the order given): each
    /// encoder's layers run once for all of them, so a prompt and its
    /// negative cost about what one text does when launches, not arithmetic,
    /// bound the encoders (77 tokens a text).
    pub fn encode_texts(&self, texts: &[&str]) -> Result<(Tensor, Tensor), ModelError> {
        let mut ids_1 = Vec::with_capacity(texts.len());
        let mut ids_2 = Vec::with_capacity(texts.len());
        for text in texts {
            let (a, b) = self.tokenize(text)?;
            ids_1.push(a);
            ids_2.push(b);
        }
        let models = self.active();
        let out_1 = models.text_encoder.forward(&ids_1, &self.device, false)?;
        let out_2 = models.text_encoder_2.forward(&ids_2, &self.device, true)?;
        let embeds = Tensor::cat(&[&out_1.penultimate, &out_2.penultimate], 2)?;
        let pooled = out_2
            .pooled
            .ok_or_else(|| ModelError::Input("text_encoder_2 returned no pooled output".into()))?;
        Ok((embeds, pooled))
    }

    /// The conditioning the UNet gets: with guidance, the negative prompt's
    /// (zeros when it is empty and `force_zeros_for_empty_prompt`) then the
    /// prompt's, both encoded in one batch.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        do_cfg: bool,
    ) -> Result<PromptEmbeds, ModelError> {
        let negative = negative_prompt.filter(|n| !n.is_empty());
        let (prompt_embeds, pooled_prompt_embeds) = match (do_cfg, negative) {
            (false, _) => self.encode_text(prompt)?,
            (true, None) if self.force_zeros_for_empty_prompt => {
                let (embeds, pooled) = self.encode_text(prompt)?;
                (
                    Tensor::cat(&[&embeds.zeros_like()?, &embeds], 0)?,
                    Tensor::cat(&[&pooled.zeros_like()?, &pooled], 0)?,
                )
            }
            (true, negative) => self.encode_texts(&[negative.unwrap_or(""), prompt])?,
        };
        Ok(PromptEmbeds {
            prompt_embeds,
            pooled_prompt_embeds,
        })
    }
}
