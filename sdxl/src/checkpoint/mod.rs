//! Weights that do not come as a diffusers folder, mapped onto diffusers'
//! names (which the models use one to one):
//!
//! - [`layout`]: every weight key of the pipeline and its shape, derived from
//!   the components' configs alone — what a single file must supply and what
//!   a LoRA may target;
//! - [`single_file`]: single-file checkpoints in the SGM layout (A1111,
//!   ComfyUI, Civitai): which file tensor, transformed how, is each diffusers
//!   weight, checked before anything is loaded and served lazily from the
//!   memory-mapped file through a candle `VarBuilder`;
//! - [`file`](self::file): pickles refused, safetensors headers read.
//!
//! LoRA files are parsed against the same layout in [`crate::lora`].

pub mod file;
pub mod layout;
pub mod single_file;
