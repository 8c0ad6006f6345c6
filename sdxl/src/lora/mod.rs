//! LoRA files parsed into per-weight low-rank updates keyed by diffusers names.
//!
//! Formats, detected per key (a file may mix them):
//! - kohya (sd-scripts, and most Civitai files): `lora_unet_…`, `lora_te1_…`,
//!   `lora_te2_…` (`lora_te_…` for a lone text encoder) with `.lora_down.weight`,
//!   `.lora_up.weight` and `.alpha`; UNet modules named by SGM paths
//!   (`input_blocks_4_1_…`) or by diffusers paths (`down_blocks_1_…`).
//! - PEFT / diffusers: `unet.….lora_A.weight`, `….lora_B.weight`, prefixes
//!   `unet.`, `text_encoder.`, `text_encoder_2.` (or none for a UNet-only file);
//!   optional `….alpha`.
//! - older diffusers: `…attn1.processor.to_q_lora.down.weight`,
//!   `….lora.down.weight`, `….lora_linear_layer.down.weight`.
//!
//! LoCon (LoRA on 3×3 convolutions, kohya's `conv_dim`) is plain LoRA with a
//! convolutional `down` and is supported. LoHa, LoKr, DoRA, (IA)³, OFT, GLoRA
//! and Tucker-decomposed LoCon are refused with the key and the type named.
//!
//! Alpha: `LoraUpdate::alpha` is the file's alpha as stored (the rank when the
//! file has none, or 0, as sd-scripts and diffusers do); it is *not* folded
//! into `up`. The update to add is [`delta`]: `scale · alpha/rank · up @ down`.

mod delta;
mod names;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use self::delta::{delta, fit};
pub use self::names::{is_lora_target, KohyaTable};
use self::names::{parse_key, resolve_dotted, NameError, Part, Style};
use crate::checkpoint::file::{check_not_pickle, FileError};
use crate::checkpoint::layout::{Component, ModelLayout};

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

/// The tensors of one module, gathered from its keys.
#[derive(Default)]
struct ModuleParts {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, Tensor)>,
    style: Option<Style>,
}

/// Reads a safetensors LoRA file (pickles refused) and parses it.
pub fn parse_lora_file(path: &Path, layout: &ModelLayout) -> Result<Lora, LoraError> {
    check_not_pickle(path)?;
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| LoraError::Read {
        path: path.display().to_string(),
        message: crate::without_backtrace(e).to_string(),
    })?;
    parse_lora(tensors, layout)
}

/// Parses a LoRA's tensors against the model `layout`. Keys are checked in
/// sorted order, so the first bad key reported is the first by name.
pub fn parse_lora(tensors: HashMap<String, Tensor>, layout: &ModelLayout) -> Result<Lora, LoraError> {
    let mut modules: BTreeMap<String, ModuleParts> = BTreeMap::new();
    let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    for (key, tensor) in tensors {
        let name = parse_key(&key).map_err(|e| match e {
            NameError::Unsupported(kind) => LoraError::Unsupported { key: key.clone(), kind },
            NameError::Unrecognised => LoraError::Unrecognised { key: key.clone() },
        })?;
        let parts = modules.entry(name.module).or_default();
        let slot = match name.part {
            Part::Down => &mut parts.down,
            Part::Up => &mut parts.up,
            Part::Alpha => &mut parts.alpha,
        };
        if name.part != Part::Alpha || parts.style.is_none() {
            parts.style = Some(name.style);
        }
        *slot = Some((key, tensor));
    }
    if modules.is_empty() {
        return Err(LoraError::Empty);
    }

    let kohya = KohyaTable::new(layout);
    let mut styles = BTreeSet::new();
    let mut updates = Vec::with_capacity(modules.len());
    let mut targeted: HashMap<(Component, String), String> = HashMap::new();
    for (module, parts) in modules {
        let ((down_key, down), (_, up)) = match (parts.down, parts.up) {
            (Some(d), Some(u)) => (d, u),
            (d, _) => {
                let missing = if d.is_some() {
                    "up weight (`lora_up` / `lora_B`)"
                } else {
                    "down weight (`lora_down` / `lora_A`)"
                };
                return Err(LoraError::Incomplete { module, missing });
            }
        };
        let style = parts.style.unwrap_or(Style::Peft);
        styles.insert(style);
        let (component, key) = match style {
            Style::Kohya => match kohya.lookup(&module) {
                [] => return Err(LoraError::UnknownModule { key: down_key }),
                [one] => one.clone(),
                many => {
                    return Err(LoraError::Ambiguous {
                        module,
                        candidates: many
                            .iter()
                            .map(|(c, k)| format!("{c} `{k}`"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            },
            _ => resolve_dotted(layout, &module, style).ok_or(LoraError::UnknownModule { key: down_key })?,
        };
        let target = layout.shape(component, &key).unwrap_or_default().to_vec();
        let Some((rank, kind)) = fit(up.dims(), down.dims(), &target) else {
            return Err(LoraError::ShapeMismatch {
                module,
                up: up.dims().to_vec(),
                down: down.dims().to_vec(),
                component,
                key,
                target,
            });
        };
        let alpha = match parts.alpha {
            Some((alpha_key, t)) => read_alpha(&t).ok_or(LoraError::BadAlpha { key: alpha_key })?,
            None => 0.0,
        };
        // sd-scripts and diffusers: no alpha (or 0) means alpha = rank, scale 1.
        let alpha = if alpha == 0.0 { rank as f32 } else { alpha };
        if let Some(first) = targeted.insert((component, key.clone()), module.clone()) {
            return Err(LoraError::Duplicate {
                component,
                key,
                first,
                second: module,
            });
        }
        updates.push(LoraUpdate {
            component,
            key,
            module,
            up,
            down,
            rank,
            alpha,
            kind,
            target_shape: target,
        });
    }
    updates.sort_by(|a, b| (a.component, &a.key).cmp(&(b.component, &b.key)));
    let format = if styles.contains(&Style::Kohya) {
        LoraFormat::Kohya
    } else if styles.contains(&Style::Peft) {
        LoraFormat::Peft
    } else {
        LoraFormat::DiffusersLegacy
    };
    Ok(Lora { format, updates })
}

/// A scalar alpha (stored as `[]` or `[1]`, any float dtype).
fn read_alpha(t: &Tensor) -> Option<f32> {
    if t.elem_count() != 1 {
        return None;
    }
    let v = t.to_dtype(DType::F32).ok()?.flatten_all().ok()?.to_vec1::<f32>().ok()?[0];
    v.is_finite().then_some(v)
}

/// What an upload check shows about a LoRA.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSummary {
    pub format: LoraFormat,
    /// The distinct ranks, ascending.
    pub ranks: Vec<usize>,
    /// The distinct alphas, ascending.
    pub alphas: Vec<f32>,
    /// The components it changes, in [`Component::ALL`] order.
    pub components: Vec<Component>,
    pub modules: usize,
    /// Of which on convolution weights.
    pub conv_modules: usize,
}

/// Summarises a parsed LoRA.
pub fn summarize(lora: &Lora) -> LoraSummary {
    let ranks: BTreeSet<usize> = lora.updates.iter().map(|u| u.rank).collect();
    let mut alphas: Vec<f32> = lora.updates.iter().map(|u| u.alpha).collect();
    alphas.sort_by(f32::total_cmp);
    alphas.dedup();
    let components: BTreeSet<Component> = lora.updates.iter().map(|u| u.component).collect();
    LoraSummary {
        format: lora.format,
        ranks: ranks.into_iter().collect(),
        alphas,
        components: components.into_iter().collect(),
        modules: lora.updates.len(),
        conv_modules: lora
            .updates
            .iter()
            .filter(|u| matches!(u.kind, LoraKind::Conv { .. }))
            .count(),
    }
}

impl std::fmt::Display for LoraSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: Vec<String>| v.join("/");
        write!(
            f,
            "{} LoRA, rank {} (alpha {}), {} modules ({} conv) on {}",
            self.format,
            list(self.ranks.iter().map(|r| r.to_string()).collect()),
            list(self.alphas.iter().map(|a| a.to_string()).collect()),
            self.modules,
            self.conv_modules,
            list(self.components.iter().map(|c| c.to_string()).collect()),
        )
    }
}
