//! Single-file SDXL checkpoints (the SGM layout that A1111, ComfyUI and
//! Civitai use) read under diffusers' names.
//!
//! [`sgm_to_diffusers`] takes the file's key names and shapes (its header is
//! enough: no tensor is read) and the [`ModelLayout`] from the diffusers
//! configs, and returns, for each component, a map from every diffusers key the
//! model will ask for to the file key that holds it and the [`Transform`] that
//! turns it into the diffusers tensor. It checks the whole file first: every
//! weight the configs call for is there with the right shape, nothing in the
//! model's namespaces is left unexplained. [`SingleFile`] then memory-maps the
//! file and serves tensors lazily through a candle `VarBuilder`.
//! [`vae_file_to_diffusers`] / [`SingleFile::open_vae`] do the same for a
//! standalone VAE file (the `--vae` of a checkpoint that has none).
//!
//! [`sgm_key`] is the inverse direction (diffusers key → file key), written
//! independently; it names the expected file key in errors, and the tests
//! check the two directions against each other at full SDXL size.
//!
//! Keys outside the four model prefixes (`model_ema.*`, sampler state, …) and a
//! few known non-weights inside them are skipped and listed in
//! [`SingleFileMap::ignored`]; see each `Route::Ignore` for why.
//!
//! - `map.rs`: the mapping's types ([`SingleFileMap`], …) and [`SingleFileError`];
//! - `convert.rs`: building and checking the mapping, in both directions;
//! - `unet.rs`, `vae.rs`, `clip.rs`: each model's SGM key names;
//!   `transform.rs`: [`Transform`];
//! - `detect.rs`: telling checkpoint kinds apart; `backend.rs`: [`SingleFile`].
//!
//! [`ModelLayout`]: crate::checkpoint::layout::ModelLayout

mod backend;
mod clip;
mod convert;
mod detect;
mod map;
mod transform;
mod unet;
mod vae;

pub use self::backend::{SingleFile, SingleFileBackend};
pub use self::convert::{sgm_key, sgm_keys, sgm_to_diffusers, vae_file_to_diffusers};
pub use self::detect::{detect_checkpoint, looks_like_sdxl_single_file, CheckpointKind};
pub use self::map::{ComponentMap, IgnoredKey, MappedTensor, SingleFileError, SingleFileMap};
pub use self::transform::Transform;
