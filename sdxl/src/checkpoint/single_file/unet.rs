//! UNet names between SGM (`model.diffusion_model.*`: `input_blocks`,
//! `middle_block`, `output_blocks`) and diffusers (`down_blocks`, `mid_block`,
//! `up_blocks`), in both directions, driven by the config's block plan.
//!
//! SGM numbers its blocks as one flat list per side: `input_blocks.0` is
//! `conv_in`, then for each level one entry per resnet (`.0` the resnet, `.1`
//! its attention when the level has attentions) and one for the downsampler
//! (`.0.op`); `output_blocks` likewise, with the upsampler inside the level's
//! last entry (`.1.conv`, or `.2.conv` after an attention). So an SGM index
//! depends on every earlier level's resnet count and sampler: it is computed
//! from the plan, never assumed to be SDXL base's numbers.
//!
//! The two directions are written independently (a lookup table one way,
//! arithmetic the other) so the tests that compare them check something.

use super::map::split_index;
use crate::checkpoint::layout::UNetPlan;

/// The key prefix of the UNet in a single file.
pub const PREFIX: &str = "model.diffusion_model.";

/// SGM `ResBlock` sub-module → diffusers `ResnetBlock2D` sub-module.
const RESNET_NAMES: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// Top-level modules outside the block lists: (SGM, diffusers).
const TOP_LEVEL: [(&str, &str); 6] = [
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
];

/// What one `input_blocks.K` entry is.
#[derive(Debug, Clone, Copy)]
enum InputSlot {
    ConvIn,
    Resnet { block: usize, layer: usize },
    Downsampler { block: usize },
}

/// The forward direction's tables: each SGM block index's diffusers place.
#[derive(Debug, Clone)]
pub struct SgmUNetIndex {
    input: Vec<InputSlot>,
    /// `output_blocks.K` → (up block, resnet index).
    output: Vec<(usize, usize)>,
}

impl SgmUNetIndex {
    pub fn new(plan: &UNetPlan) -> Self {
        let mut input = vec![InputSlot::ConvIn];
        for (block, b) in plan.down.iter().enumerate() {
            input.extend((0..b.resnets.len()).map(|layer| InputSlot::Resnet { block, layer }));
            if b.sampler.is_some() {
                input.push(InputSlot::Downsampler { block });
            }
        }
        let output = plan
            .up
            .iter()
            .enumerate()
            .flat_map(|(block, b)| (0..b.resnets.len()).map(move |layer| (block, layer)))
            .collect();
        Self { input, output }
    }

    /// The diffusers key for `key` (the part after [`PREFIX`]), or `None` when
    /// `key` names nothing a UNet of this plan has.
    pub fn to_diffusers(&self, plan: &UNetPlan, key: &str) -> Option<String> {
        for (sgm, diffusers) in TOP_LEVEL {
            if let Some(param) = key.strip_prefix(sgm).and_then(|r| r.strip_prefix('.')) {
                return Some(format!("{diffusers}.{param}"));
            }
        }
        if let Some(rest) = key.strip_prefix("input_blocks.") {
            let (k, rest) = split_index(rest)?;
            let (m, rest) = split_index(rest)?;
            return match (*self.input.get(k)?, m) {
                (InputSlot::ConvIn, 0) => Some(format!("conv_in.{rest}")),
                (InputSlot::Resnet { block, layer }, 0) => {
                    resnet_to_diffusers(&format!("down_blocks.{block}.resnets.{layer}"), rest)
                }
                (InputSlot::Resnet { block, layer }, 1) if !plan.down[block].attentions.is_empty() => {
                    Some(format!("down_blocks.{block}.attentions.{layer}.{rest}"))
                }
                (InputSlot::Downsampler { block }, 0) => {
                    let param = rest.strip_prefix("op.")?;
                    Some(format!("down_blocks.{block}.downsamplers.0.conv.{param}"))
                }
                _ => None,
            };
        }
        if let Some(rest) = key.strip_prefix("middle_block.") {
            let (m, rest) = split_index(rest)?;
            return if m % 2 == 0 {
                resnet_to_diffusers(&format!("mid_block.resnets.{}", m / 2), rest)
            } else {
                Some(format!("mid_block.attentions.{}.{rest}", m / 2))
            };
        }
        if let Some(rest) = key.strip_prefix("output_blocks.") {
            let (k, rest) = split_index(rest)?;
            let (m, rest) = split_index(rest)?;
            let (block, layer) = *self.output.get(k)?;
            let b = &plan.up[block];
            let has_attention = !b.attentions.is_empty();
            let last = layer + 1 == b.resnets.len();
            return match m {
                0 => resnet_to_diffusers(&format!("up_blocks.{block}.resnets.{layer}"), rest),
                1 if has_attention => Some(format!("up_blocks.{block}.attentions.{layer}.{rest}")),
                _ if last && b.sampler.is_some() && m == 1 + usize::from(has_attention) => {
                    let param = rest.strip_prefix("conv.")?;
                    Some(format!("up_blocks.{block}.upsamplers.0.conv.{param}"))
                }
                _ => None,
            };
        }
        None
    }
}

/// `in_layers.2.weight` under `prefix` → `{prefix}.conv1.weight`.
fn resnet_to_diffusers(prefix: &str, rest: &str) -> Option<String> {
    let (module, param) = rest.rsplit_once('.')?;
    let (_, diffusers) = RESNET_NAMES.iter().find(|(sgm, _)| *sgm == module)?;
    Some(format!("{prefix}.{diffusers}.{param}"))
}

/// `conv1.weight` → `in_layers.2.weight`.
fn resnet_to_sgm(rest: &str) -> Option<String> {
    let (module, param) = rest.rsplit_once('.')?;
    let (sgm, _) = RESNET_NAMES.iter().find(|(_, d)| *d == module)?;
    Some(format!("{sgm}.{param}"))
}

/// The SGM key (with [`PREFIX`]) a single file stores diffusers' `key` under.
/// UNet tensors are stored as diffusers uses them, so no transform is needed.
pub fn to_sgm(plan: &UNetPlan, key: &str) -> Option<String> {
    to_sgm_inner(plan, key).map(|k| format!("{PREFIX}{k}"))
}

fn to_sgm_inner(plan: &UNetPlan, key: &str) -> Option<String> {
    for (sgm, diffusers) in TOP_LEVEL {
        if let Some(param) = key.strip_prefix(diffusers).and_then(|r| r.strip_prefix('.')) {
            return Some(format!("{sgm}.{param}"));
        }
    }
    if let Some(param) = key.strip_prefix("conv_in.") {
        return Some(format!("input_blocks.0.0.{param}"));
    }
    if let Some(rest) = key.strip_prefix("down_blocks.") {
        let (i, rest) = split_index(rest)?;
        // input_blocks.0 is conv_in; each earlier level used one entry per
        // resnet plus one for its downsampler.
        let first: usize = 1 + plan.down[..i]
            .iter()
            .map(|b| b.resnets.len() + usize::from(b.sampler.is_some()))
            .sum::<usize>();
        let block = plan.down.get(i)?;
        return sub_block(
            rest,
            first,
            |sampler_param| {
                Some(format!(
                    "input_blocks.{}.0.op.{sampler_param}",
                    first + block.resnets.len()
                ))
            },
            "input_blocks",
            "downsamplers",
        );
    }
    if let Some(rest) = key.strip_prefix("mid_block.") {
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (j, rest) = split_index(rest)?;
            return Some(format!("middle_block.{}.{}", 2 * j, resnet_to_sgm(rest)?));
        }
        let (j, rest) = split_index(rest.strip_prefix("attentions.")?)?;
        return Some(format!("middle_block.{}.{rest}", 2 * j + 1));
    }
    if let Some(rest) = key.strip_prefix("up_blocks.") {
        let (i, rest) = split_index(rest)?;
        let first: usize = plan.up[..i].iter().map(|b| b.resnets.len()).sum();
        let block = plan.up.get(i)?;
        let sampler_slot = 1 + usize::from(!block.attentions.is_empty());
        return sub_block(
            rest,
            first,
            |param| {
                let last = first + block.resnets.len() - 1;
                Some(format!("output_blocks.{last}.{sampler_slot}.conv.{param}"))
            },
            "output_blocks",
            "upsamplers",
        );
    }
    None
}

/// The part of a down or up block key after `down_blocks.i.`: resnets and
/// attentions sit at `{list}.{first + j}.0` and `.1`; the sampler's SGM key
/// comes from `sampler` (given the parameter name).
fn sub_block(
    rest: &str,
    first: usize,
    sampler: impl Fn(&str) -> Option<String>,
    list: &str,
    sampler_name: &str,
) -> Option<String> {
    if let Some(rest) = rest.strip_prefix("resnets.") {
        let (j, rest) = split_index(rest)?;
        return Some(format!("{list}.{}.0.{}", first + j, resnet_to_sgm(rest)?));
    }
    if let Some(rest) = rest.strip_prefix("attentions.") {
        let (j, rest) = split_index(rest)?;
        return Some(format!("{list}.{}.1.{rest}", first + j));
    }
    let param = rest.strip_prefix(sampler_name)?.strip_prefix(".0.conv.")?;
    sampler(param)
}
