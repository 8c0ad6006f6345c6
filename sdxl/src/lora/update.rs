//! What a parsed LoRA is: [`Lora`], its per-weight [`LoraUpdate`]s (each of a
//! [`LoraKind`]), the [`LoraFormat`] it was written in, and [`LoraError`], why
//! a file is refused.

use candle_core::Tensor;

use crate::checkpoint::file::FileError;
use crate::checkpoint::layout::Component;

/// How the update is applied to its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraKind {
    Linear,
    /// A convolution weight `[out, in, kh, kw]` (LoCon for `kernel` > 1×1).
    Conv {
        kernel: (usize, usize),
    },
}

/// The naming family a file (mostly) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    Kohya,
    Peft,
    /// diffusers' names from before PEFT.
    DiffusersLegacy,
}

impl std::fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Peft => "peft",
            LoraFormat::DiffusersLegacy => "diffusers (legacy)",
        })
    }
}

/// One weight's low-rank update.
#[derive(Debug, Clone)]
pub struct LoraUpdate {
    /// Never [`Component::Vae`].
    pub component: Component,
    /// The diffusers weight key, e.g.
    /// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`;
    /// text-encoder keys in the `text_model.`-prefixed form.
    pub key: String,
    /// The module's name in the file, for messages.
    pub module: String,
    /// `[out, rank]` or `[out, rank, 1, 1]`, as stored (file dtype, CPU).
    pub up: Tensor,
    /// `[rank, in]`, `[rank, in, 1, 1]` or `[rank, in, kh, kw]`, as stored.
    pub down: Tensor,
    pub rank: usize,
    /// The file's alpha (the rank when absent); the update scales by `alpha/rank`.
    pub alpha: f32,
    pub kind: LoraKind,
    /// The target weight's shape, from the layout.
    pub target_shape: Vec<usize>,
}

/// A parsed LoRA file.
#[derive(Debug, Clone)]
pub struct Lora {
    pub format: LoraFormat,
    /// Sorted by (component, key); at most one update per weight.
    pub updates: Vec<LoraUpdate>,
}

/// Why a LoRA file is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum LoraError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: cannot read the LoRA: {message}")]
    Read { path: String, message: String },
    #[error("the file holds no LoRA weights")]
    Empty,
    #[error("LoRA key `{key}` is {kind}, which is not supported (plain LoRA and LoCon are)")]
    Unsupported { key: String, kind: &'static str },
    #[error("LoRA key `{key}` is not a LoRA weight name this loader knows")]
    Unrecognised { key: String },
    #[error("LoRA key `{key}` matches no layer of the model")]
    UnknownModule { key: String },
    #[error("LoRA module `{module}` names more than one layer of the model: {candidates}")]
    Ambiguous { module: String, candidates: String },
    #[error("LoRA module `{module}` has no {missing}")]
    Incomplete { module: String, missing: &'static str },
    #[error("LoRA key `{key}`: alpha must be one finite number")]
    BadAlpha { key: String },
    #[error("LoRA module `{module}`: up {up:?} and down {down:?} do not fit {component} `{key}` of shape {target:?}")]
    ShapeMismatch {
        module: String,
        up: Vec<usize>,
        down: Vec<usize>,
        component: Component,
        key: String,
        target: Vec<usize>,
    },
    #[error("LoRA modules `{first}` and `{second}` both target {component} `{key}`")]
    Duplicate {
        component: Component,
        key: String,
        first: String,
        second: String,
    },
}
