//! Stable Diffusion XL in candle: the same computation as diffusers'
//! `StableDiffusionXLPipeline`, loaded from a diffusers folder or a hub repo.
//!
//! A library with no serving in it: no network service, no queue, no
//! environment variable. Model code is pure (tensors and configs in, tensors
//! out); files are read only by [`source`] (finding them, locally or in the
//! Hugging Face cache) and when a model is built from its memory-mapped
//! safetensors. What the binaries decide (kernel paths, TF32, hub access)
//! comes in through [`pipeline::LoadOptions`].
//!
//! - [`pipeline`]: the whole generation (text encode, denoise, decode, previews);
//! - [`clip`], [`tokenizer`], [`unet`], [`vae`], [`taesd`]: the models;
//! - [`scheduler`]: the sampler; [`noise`]: the seeded random draws;
//! - [`config`], [`source`]: configs and where files come from;
//! - [`checkpoint`]: single-file (SGM) checkpoints; [`lora`]: LoRA files;
//! - [`image_processor`]: tensors to 8-bit images and back;
//! - [`nn`], [`accel`], `cuda`: building blocks and their CUDA fast paths;
//! - [`random`]: random weights from configs (benchmarks without the real weights).

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod image_processor;
pub mod lora;
pub mod noise;
pub mod pipeline;
pub mod random;
pub mod scheduler;
pub mod source;
pub mod taesd;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub mod accel;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod layout;
pub mod nn;
mod resnet;
pub mod sdpa;

use std::path::Path;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the model folder must have is not there.
    #[error("missing file {path}: {message}")]
    MissingFile { path: String, message: String },
    /// A config file is malformed or asks for something this port does not do.
    #[error("{file}: {message}")]
    Config { file: String, message: String },
    /// A weight file lacks a tensor or holds one of the wrong shape.
    #[error("{component}: {error}")]
    Weights {
        component: String,
        error: candle_core::Error,
    },
    /// The tokenizer files could not be read.
    #[error("{component}: {message}")]
    Tokenizer { component: String, message: String },
    /// A LoRA file that cannot be applied to this model: the message names the key.
    #[error("{0}")]
    Lora(String),
    /// A checkpoint file that is not what it must be (a pickle, not SDXL,
    /// a key missing or of the wrong shape, no VAE): the message names it.
    #[error("{0}")]
    Checkpoint(String),
    /// Resolving a Hugging Face repo id failed.
    #[error("hugging face hub: {0}")]
    Hub(String),
    /// An input to the pipeline has the wrong shape or value.
    #[error("{0}")]
    Input(String),
    /// A tensor operation failed while running.
    #[error("{0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Candle(without_backtrace(e))
    }
}

/// candle attaches a backtrace to its errors when `RUST_BACKTRACE` is set;
/// a user-facing one-line error wants only the message.
pub fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        candle_core::Error::Context { context, inner } => candle_core::Error::Context {
            context,
            inner: Box::new(without_backtrace(*inner)),
        },
        e => e,
    }
}

impl ModelError {
    /// A config error in `file`.
    pub fn config(file: &str, message: impl Into<String>) -> Self {
        ModelError::Config {
            file: file.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn missing_file(path: &Path, err: impl std::fmt::Display) -> Self {
        ModelError::MissingFile {
            path: path.display().to_string(),
            message: err.to_string(),
        }
    }
}

/// Attaches the component name (`unet`, `vae`, …) to a weight-loading error.
pub(crate) trait WeightsContext<T> {
    fn component(self, name: &str) -> Result<T, ModelError>;
}

impl<T> WeightsContext<T> for candle_core::Result<T> {
    fn component(self, name: &str) -> Result<T, ModelError> {
        self.map_err(|error| ModelError::Weights {
            component: name.to_string(),
            error: without_backtrace(error),
        })
    }
}
