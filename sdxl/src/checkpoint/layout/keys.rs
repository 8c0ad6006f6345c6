//! The vocabulary every part of the layout shares: [`Component`] (the four
//! models of the pipeline), [`ComponentKeys`] (one component's weights with
//! their shapes, in derivation order) and [`canonical_text_key`] (the one
//! form text-encoder keys are listed in).

use std::borrow::Cow;
use std::collections::HashMap;

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
