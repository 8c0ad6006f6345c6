//! Reading a LoRA file: its keys grouped into modules (`names.rs` tells what
//! each key is), each module resolved to one weight of the model layout and
//! checked to fit it ([`parse_lora`], [`parse_lora_file`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::delta::fit;
use super::names::{parse_key, resolve_dotted, KohyaTable, NameError, Part, Style};
use super::update::{Lora, LoraError, LoraFormat, LoraUpdate};
use crate::checkpoint::file::check_not_pickle;
use crate::checkpoint::layout::{Component, ModelLayout};

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
