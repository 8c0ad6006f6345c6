//! The grammar of LoRA tensor names: which part of which module a key is, and
//! which model weight a module name means.
//!
//! kohya names a module by its full path with every `.` turned into `_`
//! (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), which
//! cannot be split back by rule: `_` also occurs inside names (`to_q`,
//! `transformer_blocks`). So the names are never parsed; instead every
//! LoRA-able weight of our model is converted to kohya's form (from both its
//! diffusers path and, for the UNet, its SGM path, since sd-scripts trains
//! SDXL on an SGM-named UNet) and each file name is looked up exactly.
//!
//! PEFT/diffusers names keep the dots (`unet.down_blocks.1.….to_q.lora_A.weight`)
//! and are resolved directly against the layout.

use std::collections::HashMap;

use crate::checkpoint::layout::{canonical_text_key, Component, ModelLayout};
use crate::checkpoint::single_file::sgm_key;

/// Which half of a LoRA pair (or its alpha) a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `lora_down` / `lora_A`: `[rank, in, (kh, kw)]`.
    Down,
    /// `lora_up` / `lora_B`: `[out, rank, (1, 1)]`.
    Up,
    Alpha,
}

/// A parsed tensor name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName {
    /// The module as the file names it (kohya: `lora_unet_…`; PEFT: the
    /// dotted path with its component prefix).
    pub module: String,
    pub part: Part,
    pub style: Style,
}

/// The naming family of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Style {
    Kohya,
    Peft,
    /// diffusers before PEFT: `…to_q_lora.down.weight`, `….lora.down.weight`,
    /// `….lora_linear_layer.down.weight`.
    DiffusersLegacy,
}

/// Why a key is not a plain LoRA tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// A LyCORIS/PEFT variant we do not run.
    Unsupported(&'static str),
    Unrecognised,
}

/// Kohya-style suffixes (after the first `.`).
const KOHYA_PARTS: [(&str, Part); 3] = [
    ("lora_down.weight", Part::Down),
    ("lora_up.weight", Part::Up),
    ("alpha", Part::Alpha),
];

/// Name segments of adapter types this crate refuses, and what they are.
const UNSUPPORTED: [(&str, &str); 23] = [
    ("hada_w1_a", "LoHa (LyCORIS Hadamard product)"),
    ("hada_w1_b", "LoHa (LyCORIS Hadamard product)"),
    ("hada_w2_a", "LoHa (LyCORIS Hadamard product)"),
    ("hada_w2_b", "LoHa (LyCORIS Hadamard product)"),
    ("hada_t1", "LoHa (LyCORIS Hadamard product)"),
    ("hada_t2", "LoHa (LyCORIS Hadamard product)"),
    ("lokr_w1", "LoKr (LyCORIS Kronecker product)"),
    ("lokr_w1_a", "LoKr (LyCORIS Kronecker product)"),
    ("lokr_w1_b", "LoKr (LyCORIS Kronecker product)"),
    ("lokr_w2", "LoKr (LyCORIS Kronecker product)"),
    ("lokr_w2_a", "LoKr (LyCORIS Kronecker product)"),
    ("lokr_w2_b", "LoKr (LyCORIS Kronecker product)"),
    ("lokr_t2", "LoKr (LyCORIS Kronecker product)"),
    ("dora_scale", "DoRA (weight-decomposed LoRA)"),
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"),
    ("on_input", "(IA)³"),
    ("lora_mid", "LoCon with a Tucker-decomposed middle (`lora_mid`)"),
    ("diff", "a full weight difference"),
    ("diff_b", "a full bias difference"),
    ("oft_blocks", "OFT"),
    ("oft_diag", "OFT"),
    ("lora_embedding_A", "an embedding-layer LoRA"),
    ("lora_embedding_B", "an embedding-layer LoRA"),
];

/// kohya module-name prefixes and the component each names.
pub const KOHYA_PREFIXES: [(&str, Component); 4] = [
    ("lora_unet_", Component::Unet),
    ("lora_te1_", Component::TextEncoder),
    ("lora_te2_", Component::TextEncoder2),
    // SD 1.x kohya files name their single text encoder so.
    ("lora_te_", Component::TextEncoder),
];

/// Parses one tensor name of a LoRA file.
pub fn parse_key(key: &str) -> Result<KeyName, NameError> {
    let segments: Vec<&str> = key.split('.').collect();
    for s in &segments {
        if let Some((_, what)) = UNSUPPORTED.iter().find(|(u, _)| u == s) {
            return Err(NameError::Unsupported(what));
        }
    }
    if KOHYA_PREFIXES.iter().any(|(p, _)| key.starts_with(p)) {
        let (module, suffix) = key.split_once('.').ok_or(NameError::Unrecognised)?;
        return match KOHYA_PARTS.iter().find(|(s, _)| *s == suffix) {
            Some((_, part)) => Ok(KeyName {
                module: module.to_string(),
                part: *part,
                style: Style::Kohya,
            }),
            // `{module}.weight` alone is LyCORIS (IA)³ or a full weight.
            None if suffix == "weight" => Err(NameError::Unsupported("(IA)³ or a full-weight module")),
            None => Err(NameError::Unrecognised),
        };
    }
    parse_dotted(&segments)
}

/// PEFT and older diffusers names.
fn parse_dotted(s: &[&str]) -> Result<KeyName, NameError> {
    let n = s.len();
    let module = |end: usize| s[..end].join(".");
    let tail = |k: usize| (n >= k).then(|| &s[n - k..]);
    // PEFT: `….lora_A.weight`, or with an adapter name `….lora_A.default.weight`.
    for (k, adapter) in [(2, false), (3, true)] {
        if let Some([ab, rest @ ..]) = tail(k) {
            let part = match *ab {
                "lora_A" => Part::Down,
                "lora_B" => Part::Up,
                _ => continue,
            };
            match rest.last() {
                Some(&"weight") if adapter || rest.len() == 1 => {
                    return Ok(KeyName {
                        module: module(n - k),
                        part,
                        style: Style::Peft,
                    })
                }
                Some(&"bias") => return Err(NameError::Unsupported("LoRA bias terms (`lora_B.bias`)")),
                _ => {}
            }
        }
    }
    if let Some([m, "alpha"]) = tail(2) {
        // `….to_q_lora.alpha` (legacy) or `….to_q.alpha` (diffusers with alphas).
        return Ok(match m.strip_suffix("_lora") {
            Some(_) => legacy(s, n - 1, Part::Alpha),
            None => KeyName {
                module: module(n - 1),
                part: Part::Alpha,
                style: Style::Peft,
            },
        });
    }
    if let Some([m, du @ ("down" | "up"), "weight"]) = tail(3) {
        let part = if *du == "down" { Part::Down } else { Part::Up };
        if *m == "lora" || *m == "lora_linear_layer" {
            return Ok(KeyName {
                module: module(n - 3),
                part,
                style: Style::DiffusersLegacy,
            });
        }
        if m.ends_with("_lora") {
            return Ok(legacy(s, n - 2, part));
        }
    }
    Err(NameError::Unrecognised)
}

/// `….attn1.processor.to_q_lora` (ending before index `end`) → module
/// `….attn1.to_q_lora`; the `_lora` projection name is resolved per component.
fn legacy(s: &[&str], end: usize, part: Part) -> KeyName {
    let mut path: Vec<&str> = s[..end].to_vec();
    path.retain(|seg| *seg != "processor");
    KeyName {
        module: path.join("."),
        part,
        style: Style::DiffusersLegacy,
    }
}

/// A resolved target: the component and the diffusers weight key.
pub type Target = (Component, String);

/// kohya module name → the weight it means (or every weight it could mean,
/// when two paths collapse to the same name: then it is refused as ambiguous).
#[derive(Debug, Clone)]
pub struct KohyaTable {
    names: HashMap<String, Vec<Target>>,
}

/// Whether a LoRA can target `key` of shape `shape`: linear and conv weights,
/// not embeddings (a lookup table, not a product) or norms.
pub fn is_lora_target(key: &str, shape: &[usize]) -> bool {
    key.ends_with(".weight") && matches!(shape.len(), 2 | 4) && !key.contains("embeddings.")
}

impl KohyaTable {
    pub fn new(layout: &ModelLayout) -> Self {
        let mut names: HashMap<String, Vec<Target>> = HashMap::new();
        let mut add = |name: String, target: &Target| {
            let list = names.entry(name).or_default();
            if !list.contains(target) {
                list.push(target.clone());
            }
        };
        for (prefix, component) in KOHYA_PREFIXES {
            let Some(keys) = layout.keys(component) else { continue };
            for (key, _) in keys.iter().filter(|(k, s)| is_lora_target(k, s)) {
                let target = (component, key.to_string());
                let module = key.trim_end_matches(".weight");
                add(format!("{prefix}{}", module.replace('.', "_")), &target);
                if component == Component::Unet {
                    if let Some((sgm, _)) = sgm_key(layout, component, key) {
                        let sgm = sgm.trim_start_matches("model.diffusion_model.");
                        let sgm = sgm.trim_end_matches(".weight");
                        add(format!("{prefix}{}", sgm.replace('.', "_")), &target);
                    }
                }
            }
        }
        Self { names }
    }

    /// The targets of a kohya module name (empty when none).
    pub fn lookup(&self, module: &str) -> &[Target] {
        self.names.get(module).map_or(&[], Vec::as_slice)
    }

    /// All names, for tests: (name, targets).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[Target])> {
        self.names.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

/// Resolves a PEFT / legacy-diffusers module path (with its component
/// prefix, or none for UNet-only files) to a weight of the layout.
pub fn resolve_dotted(layout: &ModelLayout, module: &str, style: Style) -> Option<Target> {
    const UNET_ROOTS: [&str; 7] = [
        "down_blocks.",
        "mid_block.",
        "up_blocks.",
        "conv_in",
        "conv_out",
        "time_embedding.",
        "add_embedding.",
    ];
    let (component, path) = if let Some(p) = module.strip_prefix("unet.") {
        (Component::Unet, p)
    } else if let Some(p) = module.strip_prefix("text_encoder_2.") {
        (Component::TextEncoder2, p)
    } else if let Some(p) = module.strip_prefix("text_encoder.") {
        (Component::TextEncoder, p)
    } else if UNET_ROOTS.iter().any(|r| module.starts_with(r)) {
        (Component::Unet, module)
    } else {
        return None;
    };
    let path = if style == Style::DiffusersLegacy {
        legacy_projection(component, path)?
    } else {
        path.to_string()
    };
    let key = format!("{path}.weight");
    let key = if component.is_text_encoder() {
        canonical_text_key(&key).into_owned()
    } else {
        key
    };
    let shape = layout.shape(component, &key)?;
    is_lora_target(&key, shape).then_some((component, key))
}

/// Old diffusers attention processors name q/k/v/out `to_q_lora` …; for the
/// text encoders those are CLIP's `q_proj` … .
fn legacy_projection(component: Component, path: &str) -> Option<String> {
    let Some((parent, last)) = path.rsplit_once('.') else {
        return Some(path.to_string());
    };
    let Some(base) = last.strip_suffix("_lora") else {
        return Some(path.to_string());
    };
    let name = match (component.is_text_encoder(), base) {
        (false, "to_q" | "to_k" | "to_v") => base,
        (false, "to_out") => "to_out.0",
        (true, "to_q") => "q_proj",
        (true, "to_k") => "k_proj",
        (true, "to_v") => "v_proj",
        (true, "to_out") => "out_proj",
        _ => return None,
    };
    Some(format!("{parent}.{name}"))
}
