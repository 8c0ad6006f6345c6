//! [`inspect_header`]: what a LoRA file's safetensors header alone tells —
//! every key a LoRA tensor of a type we run, the format, the ranks and the
//! components it changes — so that a registry can accept or refuse an upload
//! without the model at hand. Whether each module matches a layer of *the*
//! model (and its shape) is checked when a worker loads it ([`super::parse_lora`]).

use std::collections::{BTreeMap, BTreeSet};

use super::names::{parse_key, NameError, Part, Style, KOHYA_PREFIXES};
use super::update::{LoraError, LoraFormat};
use crate::checkpoint::layout::Component;

/// What the header of a LoRA file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraHeader {
    pub format: LoraFormat,
    /// The distinct ranks (the down weights' first dimension), ascending.
    pub ranks: Vec<usize>,
    /// The components it changes, in [`Component::ALL`] order.
    pub components: Vec<Component>,
    pub modules: usize,
    /// Of which with a convolutional down weight (LoCon and 1×1 convs).
    pub conv_modules: usize,
}

/// The component a module name belongs to, from its prefix (a dotted name
/// without one is a UNet-only diffusers file).
fn component_of(module: &str, style: Style) -> Component {
    if style == Style::Kohya {
        return KOHYA_PREFIXES
            .iter()
            .find(|(p, _)| module.starts_with(p))
            .map_or(Component::Unet, |(_, c)| *c);
    }
    if module.starts_with("text_encoder_2.") {
        Component::TextEncoder2
    } else if module.starts_with("text_encoder.") {
        Component::TextEncoder
    } else {
        Component::Unet
    }
}

/// Reads the header of safetensors `bytes` (the whole file or at least its
/// header) and checks that every key is a LoRA tensor: refused, naming the
/// key, are names we do not know, LyCORIS types we do not run, and modules
/// with a down weight and no up weight or the reverse.
pub fn inspect_header(bytes: &[u8]) -> Result<LoraHeader, LoraError> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| LoraError::Read {
        path: "upload".into(),
        message: format!("not a safetensors file: {e}"),
    })?;
    let tensors: BTreeMap<String, Vec<usize>> = metadata
        .tensors()
        .into_iter()
        .map(|(k, info)| (k, info.shape.clone()))
        .collect();
    #[derive(Default)]
    struct Seen {
        down: Option<Vec<usize>>,
        up: bool,
        style: Option<Style>,
    }
    let mut modules: BTreeMap<String, Seen> = BTreeMap::new();
    for (key, shape) in &tensors {
        let name = parse_key(key).map_err(|e| match e {
            NameError::Unsupported(kind) => LoraError::Unsupported { key: key.clone(), kind },
            NameError::Unrecognised => LoraError::Unrecognised { key: key.clone() },
        })?;
        let seen = modules.entry(name.module).or_default();
        match name.part {
            Part::Down => seen.down = Some(shape.clone()),
            Part::Up => seen.up = true,
            Part::Alpha => {}
        }
        if name.part != Part::Alpha || seen.style.is_none() {
            seen.style = Some(name.style);
        }
    }
    if modules.is_empty() {
        return Err(LoraError::Empty);
    }
    let mut ranks = BTreeSet::new();
    let mut components = BTreeSet::new();
    let mut styles = BTreeSet::new();
    let mut conv_modules = 0;
    for (module, seen) in &modules {
        let style = seen.style.unwrap_or(Style::Peft);
        let down = match (&seen.down, seen.up) {
            (Some(down), true) => down,
            (down, _) => {
                return Err(LoraError::Incomplete {
                    module: module.clone(),
                    missing: if down.is_some() {
                        "up weight (`lora_up` / `lora_B`)"
                    } else {
                        "down weight (`lora_down` / `lora_A`)"
                    },
                })
            }
        };
        ranks.insert(down.first().copied().unwrap_or(0));
        if down.len() == 4 {
            conv_modules += 1;
        }
        components.insert(component_of(module, style));
        styles.insert(style);
    }
    let format = if styles.contains(&Style::Kohya) {
        LoraFormat::Kohya
    } else if styles.contains(&Style::Peft) {
        LoraFormat::Peft
    } else {
        LoraFormat::DiffusersLegacy
    };
    Ok(LoraHeader {
        format,
        ranks: ranks.into_iter().collect(),
        components: Component::ALL.into_iter().filter(|c| components.contains(c)).collect(),
        modules: modules.len(),
        conv_modules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of zero-filled f32 tensors with these names and shapes.
    fn file(tensors: &[(&str, &[usize])]) -> Vec<u8> {
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(k, s)| (k.to_string(), s.to_vec(), vec![0u8; 4 * s.iter().product::<usize>()]))
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(k, s, d)| {
                (
                    k.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    #[test]
    fn kohya_file_reports_format_ranks_and_parts() {
        let bytes = file(&[
            ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", &[4, 64]),
            ("lora_unet_input_blocks_4_1_proj_in.lora_up.weight", &[64, 4]),
            ("lora_unet_input_blocks_4_1_proj_in.alpha", &[]),
            (
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                &[8, 32],
            ),
            ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", &[64, 8]),
            (
                "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight",
                &[4, 32, 3, 3],
            ),
            ("lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight", &[32, 4, 1, 1]),
        ]);
        let header = inspect_header(&bytes).unwrap();
        assert_eq!(header.format, LoraFormat::Kohya);
        assert_eq!(header.ranks, vec![4, 8]);
        assert_eq!(header.components, vec![Component::Unet, Component::TextEncoder2]);
        assert_eq!((header.modules, header.conv_modules), (3, 1));
    }

    #[test]
    fn peft_file_is_recognised() {
        let bytes = file(&[
            ("unet.down_blocks.1.attentions.0.proj_in.lora_A.weight", &[2, 64]),
            ("unet.down_blocks.1.attentions.0.proj_in.lora_B.weight", &[64, 2]),
            (
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
                &[2, 32],
            ),
            (
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight",
                &[32, 2],
            ),
        ]);
        let header = inspect_header(&bytes).unwrap();
        assert_eq!(header.format, LoraFormat::Peft);
        assert_eq!(header.components, vec![Component::Unet, Component::TextEncoder]);
    }

    #[test]
    fn refusals_name_the_key() {
        let loha = file(&[("lora_unet_x.hada_w1_a", &[4, 4])]);
        let e = inspect_header(&loha).unwrap_err();
        assert!(
            matches!(&e, LoraError::Unsupported { key, .. } if key == "lora_unet_x.hada_w1_a"),
            "{e}"
        );
        let odd = file(&[("model.diffusion_model.out.2.weight", &[4, 4])]);
        let e = inspect_header(&odd).unwrap_err();
        assert!(e.to_string().contains("model.diffusion_model.out.2.weight"), "{e}");
        let half = file(&[("lora_unet_a_b.lora_down.weight", &[4, 4])]);
        assert!(matches!(inspect_header(&half), Err(LoraError::Incomplete { .. })));
        assert!(matches!(inspect_header(b"not a file"), Err(LoraError::Read { .. })));
        assert!(matches!(inspect_header(&file(&[])), Err(LoraError::Empty)));
    }
}
