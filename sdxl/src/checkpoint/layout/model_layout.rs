//! [`ModelLayout`]: the whole pipeline's layout, each model's block plan
//! (from `unet.rs`, `vae.rs`, `clip.rs`) with the keys derived from it.

use std::collections::HashMap;

use super::clip::ClipPlan;
use super::keys::{canonical_text_key, Component, ComponentKeys};
use super::unet::UNetPlan;
use super::vae::VaePlan;
use crate::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::ModelError;

/// The layout of the whole pipeline: each model's block plan and its keys.
#[derive(Debug, Clone)]
pub struct ModelLayout {
    pub unet: UNetPlan,
    /// `None` when the caller supplies the VAE separately (single files are
    /// then read without their `first_stage_model.*`).
    pub vae: Option<VaePlan>,
    pub text_encoder: ClipPlan,
    pub text_encoder_2: ClipPlan,
    keys: HashMap<Component, ComponentKeys>,
}

impl ModelLayout {
    /// Lays out SDXL from its four configs. The first text encoder has no
    /// `text_projection` (SDXL uses `CLIPTextModel`), the second has one.
    pub fn new(
        unet: &UNetConfig,
        vae: Option<&VaeConfig>,
        text_encoder: &ClipTextConfig,
        text_encoder_2: &ClipTextConfig,
    ) -> Result<Self, ModelError> {
        let unet = UNetPlan::new(unet)?;
        let vae = vae.map(VaePlan::new).transpose()?;
        let te1 = ClipPlan::new(text_encoder, false, "text_encoder/config.json")?;
        let te2 = ClipPlan::new(text_encoder_2, true, "text_encoder_2/config.json")?;
        let mut keys = HashMap::new();
        keys.insert(Component::Unet, unet.keys());
        if let Some(vae) = &vae {
            keys.insert(Component::Vae, vae.keys());
        }
        keys.insert(Component::TextEncoder, te1.keys());
        keys.insert(Component::TextEncoder2, te2.keys());
        Ok(Self {
            unet,
            vae,
            text_encoder: te1,
            text_encoder_2: te2,
            keys,
        })
    }

    /// The weights of `component`; `None` only for a VAE left out of the layout.
    pub fn keys(&self, component: Component) -> Option<&ComponentKeys> {
        self.keys.get(&component)
    }

    /// The components laid out, in [`Component::ALL`] order.
    pub fn components(&self) -> impl Iterator<Item = Component> + '_ {
        Component::ALL.into_iter().filter(|c| self.keys.contains_key(c))
    }

    /// The shape of `key` in `component` (text-encoder keys in either form).
    pub fn shape(&self, component: Component, key: &str) -> Option<&[usize]> {
        let keys = self.keys(component)?;
        if component.is_text_encoder() {
            keys.shape(&canonical_text_key(key))
        } else {
            keys.shape(key)
        }
    }
}
