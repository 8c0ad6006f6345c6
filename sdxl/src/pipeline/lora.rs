//! LoRAs on a loaded pipeline. A job's LoRAs are merged — `scale · alpha/rank
//! · up @ down` added to each weight they touch — into a copy of the text
//! encoders and the UNet, built again from the checkpoint with the updates
//! added as the weights are read (the UNet fuses q/k/v when it loads, so the
//! updates go in before that). The models as loaded are never modified: a
//! job without LoRAs uses them unchanged, bit for bit; consecutive jobs with
//! the same LoRAs and scales reuse the merged copy.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::load::build_adaptable;
use super::model::SdxlPipeline;
use crate::checkpoint::layout::{canonical_text_key, Component};
use crate::lora::{delta, parse_lora_file, Lora};
use crate::ModelError;

/// One LoRA of a job: its parsed updates and the strength to merge them at.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// Names it in the cache key and in messages (its registry name or its
    /// file's digest: two different files must not share one).
    pub id: String,
    pub lora: Arc<Lora>,
    /// diffusers' `set_adapters` weight (A1111's `<lora:name:scale>`).
    pub scale: f64,
}

/// A component's weights with the LoRA updates added as they are read.
struct Merged {
    base: VarBuilder<'static>,
    /// By canonical key: the summed `scale · alpha/rank · up @ down`, f32, CPU.
    deltas: HashMap<String, Tensor>,
    text: bool,
}

impl Merged {
    fn with_delta(&self, name: &str, weight: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let key = if self.text {
            canonical_text_key(name).into_owned()
        } else {
            name.to_string()
        };
        match self.deltas.get(&key) {
            None => Ok(weight),
            Some(d) => (weight.to_dtype(DType::F32)? + d.to_device(weight.device())?)?.to_dtype(dtype),
        }
    }
}

impl SimpleBackend for Merged {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let weight = self.base.get_with_hints_dtype(s, name, h, dtype)?;
        self.with_delta(name, weight, dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let weight = self.base.get_unchecked_dtype(name, dtype)?;
        self.with_delta(name, weight, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }
}

/// The cache key of a set of LoRAs: ids and exact scales, in order.
fn key_of(loras: &[LoraWeights]) -> String {
    loras
        .iter()
        .map(|l| format!("{}@{:016x}", l.id, l.scale.to_bits()))
        .collect::<Vec<_>>()
        .join(",")
}

impl SdxlPipeline {
    /// Parses a LoRA file against this model: a key that matches no layer,
    /// a LyCORIS type we do not run (LoHa, LoKr, …) or a shape that does not
    /// fit its layer is refused, naming the key.
    pub fn read_lora(&self, path: &Path) -> Result<Lora, ModelError> {
        parse_lora_file(path, &self.rebuild.layout).map_err(|e| ModelError::Lora(format!("{}: {e}", path.display())))
    }

    /// Makes `loras` the adapters of the next generations (an empty list: none).
    pub fn set_loras(&mut self, loras: &[LoraWeights]) -> Result<(), ModelError> {
        if loras.is_empty() {
            // Back to the models as loaded; the merged copy is kept for a
            // job that asks for the same LoRAs again.
            if let Some((key, models)) = self.adapted.take() {
                self.cached = Some((key, models));
            }
            return Ok(());
        }
        let key = key_of(loras);
        if self.adapted.as_ref().is_some_and(|(k, _)| *k == key) {
            return Ok(());
        }
        if self.cached.as_ref().is_some_and(|(k, _)| *k == key) {
            self.adapted = self.cached.take();
            return Ok(());
        }
        // Free the old copy before building the new one.
        self.adapted = None;
        self.cached = None;
        let mut deltas: [HashMap<String, Tensor>; 3] = Default::default();
        for l in loras {
            for u in &l.lora.updates {
                let slot = match u.component {
                    Component::TextEncoder => 0,
                    Component::TextEncoder2 => 1,
                    Component::Unet => 2,
                    Component::Vae => continue,
                };
                let d = delta(u, l.scale as f32, DType::F32)?;
                let sum = match deltas[slot].remove(&u.key) {
                    Some(prev) => (prev + d)?,
                    None => d,
                };
                deltas[slot].insert(u.key.clone(), sum);
            }
        }
        let deltas = std::sync::Mutex::new(deltas.map(Some));
        let wrap = |c: Component, vb: VarBuilder<'static>| -> Result<VarBuilder<'static>, ModelError> {
            let slot = match c {
                Component::TextEncoder => 0,
                Component::TextEncoder2 => 1,
                Component::Unet => 2,
                Component::Vae => return Ok(vb),
            };
            let mine = deltas.lock().unwrap_or_else(|e| e.into_inner())[slot]
                .take()
                .unwrap_or_default();
            if mine.is_empty() {
                return Ok(vb);
            }
            let (dtype, device) = (vb.dtype(), vb.device().clone());
            let merged = Merged {
                base: vb,
                deltas: mine,
                text: c.is_text_encoder(),
            };
            Ok(VarBuilder::from_backend(Box::new(merged), dtype, device))
        };
        let models = build_adaptable(&self.rebuild, self.dtype, &self.device, &wrap)?;
        self.adapted = Some((key, models));
        self.merges += 1;
        Ok(())
    }

    /// The LoRAs in force (`id@scale`, comma-separated), or `None`.
    pub fn active_loras(&self) -> Option<&str> {
        self.adapted.as_ref().map(|(key, _)| key.as_str())
    }

    /// How many times LoRAs have been merged into a new copy of the models
    /// (a job with the LoRAs and scales of the one before adds none).
    pub fn lora_merges(&self) -> usize {
        self.merges
    }
}
