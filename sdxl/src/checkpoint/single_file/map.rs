//! What a single file maps to and why it may not: [`MappedTensor`] (where one
//! diffusers tensor comes from), [`ComponentMap`] and [`SingleFileMap`] (the
//! checked result), [`IgnoredKey`], [`SingleFileError`], and the `Route` of
//! one file key that the per-model key maps (`unet.rs`, `vae.rs`, `clip.rs`)
//! return.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::transform::Transform;
use crate::checkpoint::file::FileError;
use crate::checkpoint::layout::{canonical_text_key, Component};

/// Where one diffusers tensor comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedTensor {
    /// The single file's key.
    pub source: String,
    pub transform: Transform,
    /// The shape stored in the file.
    pub source_shape: Vec<usize>,
    /// The diffusers shape (after the transform), as the configs call for.
    pub shape: Vec<usize>,
}

/// One component's diffusers keys and where each comes from.
#[derive(Debug, Clone)]
pub struct ComponentMap {
    pub(super) component: Component,
    pub(super) entries: BTreeMap<String, MappedTensor>,
}

impl ComponentMap {
    pub fn component(&self) -> Component {
        self.component
    }

    /// The source of diffusers' `key`. Text-encoder keys may be given with or
    /// without the `text_model.` prefix (the model reads either form).
    pub fn get(&self, key: &str) -> Option<&MappedTensor> {
        if self.component.is_text_encoder() {
            self.entries.get(canonical_text_key(key).as_ref())
        } else {
            self.entries.get(key)
        }
    }

    /// `(diffusers key, source)`, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &MappedTensor)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A file key that no component uses, and why that is fine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredKey {
    pub key: String,
    pub reason: &'static str,
}

/// The checked mapping of a whole single file.
#[derive(Debug, Clone)]
pub struct SingleFileMap {
    pub(super) components: BTreeMap<Component, Arc<ComponentMap>>,
    pub(super) ignored: Vec<IgnoredKey>,
}

impl SingleFileMap {
    /// The map of `component`; `None` only for a VAE the layout left out.
    pub fn component(&self, component: Component) -> Option<&Arc<ComponentMap>> {
        self.components.get(&component)
    }

    /// File keys used by no component (to log, not to act on).
    pub fn ignored(&self) -> &[IgnoredKey] {
        &self.ignored
    }
}

/// Why a single file cannot be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SingleFileError {
    #[error(transparent)]
    File(#[from] FileError),
    /// The file is some other kind of checkpoint.
    #[error("not an SDXL checkpoint: {0}")]
    NotSdxl(String),
    /// The file has no `first_stage_model.*` weights; the caller must supply a VAE.
    #[error("no VAE in the checkpoint (it has no `first_stage_model.*` weights)")]
    NoVae,
    #[error(
        "not an SDXL checkpoint matching the configs: `{key}` is missing \
         (expected shape {expected:?}, for {component} `{diffusers_key}`)"
    )]
    MissingKey {
        component: Component,
        key: String,
        diffusers_key: String,
        expected: Vec<usize>,
    },
    #[error(
        "not an SDXL checkpoint matching the configs: `{key}` has shape {shape:?}, expected {expected:?} \
         (for {component} `{diffusers_key}`)"
    )]
    WrongShape {
        component: Component,
        key: String,
        diffusers_key: String,
        shape: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(
        "not an SDXL checkpoint matching the configs: `{key}` is not a weight of the model the configs \
         describe{detail}"
    )]
    UnexpectedKey { key: String, detail: String },
    #[error("`{first}` and `{second}` both hold {component} `{diffusers_key}`")]
    Duplicate {
        component: Component,
        diffusers_key: String,
        first: String,
        second: String,
    },
}

/// How one file key maps: onto diffusers keys (one, or three for a fused
/// `in_proj`), skipped for a reason, or unexplained.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    To(Vec<(String, Transform)>),
    Ignore(&'static str),
    Unknown,
}

impl Route {
    pub(super) fn to(key: String) -> Self {
        Route::To(vec![(key, Transform::Identity)])
    }
}

/// `"12.rest"` → `(12, "rest")`; only plain decimal indices.
pub(crate) fn split_index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((n.parse().ok()?, rest))
}
