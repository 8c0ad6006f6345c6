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
//!
//! - `keys.rs`: [`Component`], [`ComponentKeys`] and [`canonical_text_key`];
//! - `model_layout.rs`: [`ModelLayout`], the four models' plans and keys together;
//! - `unet.rs`, `vae.rs`, `clip.rs`: each model's block plan and its keys.

mod clip;
mod keys;
mod model_layout;
mod unet;
mod vae;

pub use self::clip::ClipPlan;
pub use self::keys::{canonical_text_key, Component, ComponentKeys};
pub use self::model_layout::ModelLayout;
pub use self::unet::{AttentionPlan, BlockPlan, ResnetPlan, UNetPlan};
pub use self::vae::VaePlan;
