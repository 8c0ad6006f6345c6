//! Every weight an SDXL pipeline's models have, under diffusers' names and with
//! its shape, derived from the components' configs alone.
//!
//! This is the single source of truth the two mappings check against: a
//! single-file checkpoint must supply exactly these keys (with these shapes),
//! and a LoRA may only target weights listed here, with an update that fits
//! the listed shape. It is tested against the tiny reference folder's real key
//! lists, so a derivation error shows up as a concrete missing or extra key.
//!
//! Text-encoder keys are listed in their canonical `text_model.`-prefixed form
//! (the form on the hub and in single files); transformers ≥ 5 saves
//! `CLIPTextModel` without the prefix, which [`canonical_text_key`] undoes.

mod clip;
mod unet;
mod vae;

use std::borrow::Cow;
use std::collections::HashMap;

pub use self::clip::ClipPlan;
pub use self::unet::{AttentionPlan, BlockPlan, ResnetPlan, UNetPlan};
pub use self::vae::VaePlan;
use crate::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::ModelError;

/// One model of the SDXL pipeline, named as its diffusers subfolder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    Vae,
    /// OpenAI CLIP ViT-L (`CLIPTextModel`, no projection).
    TextEncoder,
    /// OpenCLIP ViT-bigG (`CLIPTextModelWithProjection`).
    TextEncoder2,
}

impl Component {
    /// All components, in the order errors are looked for.
    pub const ALL: [Component; 4] = [
        Component::Unet,
        Component::Vae,
        Component::TextEncoder,
        Component::TextEncoder2,
    ];

    /// The diffusers subfolder name (`unet`, `vae`, `text_encoder`, `text_encoder_2`).
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }

    pub fn is_text_encoder(self) -> bool {
        matches!(self, Component::TextEncoder | Component::TextEncoder2)
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The weights of one component, in derivation order, with their shapes.
#[derive(Debug, Clone, Default)]
pub struct ComponentKeys {
    keys: Vec<(String, Vec<usize>)>,
    index: HashMap<String, usize>,
}

impl ComponentKeys {
    /// Adds a weight; a key derived twice is a bug in the derivation.
    pub(crate) fn push(&mut self, key: String, shape: Vec<usize>) {
        let previous = self.index.insert(key.clone(), self.keys.len());
        assert!(previous.is_none(), "weight {key} derived twice");
        self.keys.push((key, shape));
    }

    /// A module's `weight` and `bias` (both shaped by the caller).
    pub(crate) fn push_wb(&mut self, module: &str, weight: Vec<usize>, bias: usize) {
        self.push(format!("{module}.weight"), weight);
        self.push(format!("{module}.bias"), vec![bias]);
    }

    /// A norm layer's `weight` and `bias`, both `[channels]`.
    pub(crate) fn push_norm(&mut self, module: &str, channels: usize) {
        self.push_wb(module, vec![channels], channels);
    }

    /// The shape of `key`, if the component has that weight.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.index.get(key).map(|&i| self.keys[i].1.as_slice())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// `(key, shape)` in derivation order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.keys.iter().map(|(k, s)| (k.as_str(), s.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

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

/// A text-encoder key in the `text_model.`-prefixed form this crate uses:
/// `encoder.layers.0.mlp.fc1.weight` → `text_model.encoder.layers.0.mlp.fc1.weight`.
/// `text_projection.*` sits outside `text_model` in both forms and is kept.
pub fn canonical_text_key(key: &str) -> Cow<'_, str> {
    const INSIDE_TEXT_MODEL: [&str; 3] = ["embeddings.", "encoder.", "final_layer_norm."];
    if INSIDE_TEXT_MODEL.iter().any(|p| key.starts_with(p)) {
        Cow::Owned(format!("text_model.{key}"))
    } else {
        Cow::Borrowed(key)
    }
}
