//! VAE names between SGM (`first_stage_model.*`: `encoder.down.N.block.M`,
//! `decoder.up.N.block.M`, `mid.block_1`, `mid.attn_1.{norm,q,k,v,proj_out}`)
//! and diffusers' `AutoencoderKL` (`encoder.down_blocks.N.resnets.M`, …), in
//! both directions.
//!
//! SGM numbers the decoder's levels from the narrowest resolution's side the
//! other way round: its `up.0` is diffusers' last up block. The level count
//! comes from the config.

use super::map::{split_index, Route};
use super::transform::Transform;

/// The key prefix of the VAE in a single file.
pub const PREFIX: &str = "first_stage_model.";

/// SGM `AttnBlock` sub-module → diffusers `Attention` sub-module.
const ATTENTION_NAMES: [(&str, &str); 5] = [
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
];

/// The route of `key` (the part after [`PREFIX`]) for a VAE of `levels` levels.
pub fn to_diffusers(levels: usize, key: &str) -> Route {
    if key.starts_with("loss.") {
        // Some checkpoints keep the autoencoder's training loss (LPIPS and
        // discriminator weights); inference never uses it.
        return Route::Ignore("VAE training-loss weights, unused at inference");
    }
    match rename(levels, key) {
        Some(k) => Route::to(k),
        None => Route::Unknown,
    }
}

fn rename(levels: usize, key: &str) -> Option<String> {
    if key.starts_with("quant_conv.") || key.starts_with("post_quant_conv.") {
        return Some(key.to_string());
    }
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    for (sgm, diffusers) in [
        ("conv_in.", "conv_in."),
        ("conv_out.", "conv_out."),
        ("norm_out.", "conv_norm_out."),
    ] {
        if let Some(param) = rest.strip_prefix(sgm) {
            return Some(format!("{side}.{diffusers}{param}"));
        }
    }
    if let Some(mid) = rest.strip_prefix("mid.") {
        if let Some(r) = mid.strip_prefix("block_1.") {
            return resnet(&format!("{side}.mid_block.resnets.0"), r);
        }
        if let Some(r) = mid.strip_prefix("block_2.") {
            return resnet(&format!("{side}.mid_block.resnets.1"), r);
        }
        let (module, param) = mid.strip_prefix("attn_1.")?.rsplit_once('.')?;
        let (_, d) = ATTENTION_NAMES.iter().find(|(s, _)| *s == module)?;
        return Some(format!("{side}.mid_block.attentions.0.{d}.{param}"));
    }
    let (list, diffusers_list, sampler, diffusers_sampler) = if side == "encoder" {
        ("down.", "down_blocks", "downsample.conv.", "downsamplers.0.conv.")
    } else {
        ("up.", "up_blocks", "upsample.conv.", "upsamplers.0.conv.")
    };
    let (level, rest) = split_index(rest.strip_prefix(list)?)?;
    if level >= levels {
        return None;
    }
    let block = if side == "encoder" { level } else { levels - 1 - level };
    let prefix = format!("{side}.{diffusers_list}.{block}");
    if let Some(param) = rest.strip_prefix(sampler) {
        return Some(format!("{prefix}.{diffusers_sampler}{param}"));
    }
    let (j, r) = split_index(rest.strip_prefix("block.")?)?;
    resnet(&format!("{prefix}.resnets.{j}"), r)
}

/// A VAE resnet's parameters: the same names except the shortcut.
fn resnet(prefix: &str, rest: &str) -> Option<String> {
    let (module, param) = rest.rsplit_once('.')?;
    let module = match module {
        "norm1" | "conv1" | "norm2" | "conv2" => module,
        "nin_shortcut" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{prefix}.{module}.{param}"))
}

/// The SGM key (with [`PREFIX`]) and the transform for diffusers' `key`, as
/// SGM files store it: mid-block attention weights as 1×1 convolutions.
pub fn to_sgm(levels: usize, key: &str) -> Option<(String, Transform)> {
    let mut transform = Transform::Identity;
    let sgm = if key.starts_with("quant_conv.") || key.starts_with("post_quant_conv.") {
        key.to_string()
    } else {
        let (side, rest) = key.split_once('.')?;
        let encoder = match side {
            "encoder" => true,
            "decoder" => false,
            _ => return None,
        };
        let rest = if let Some(param) = rest.strip_prefix("conv_norm_out.") {
            format!("norm_out.{param}")
        } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
            rest.to_string()
        } else if let Some(mid) = rest.strip_prefix("mid_block.") {
            if let Some(r) = mid.strip_prefix("resnets.") {
                let (j, r) = split_index(r)?;
                format!("mid.block_{}.{}", j + 1, resnet_to_sgm(r)?)
            } else {
                let r = mid.strip_prefix("attentions.0.")?;
                let (module, param) = r.rsplit_once('.')?;
                let (s, _) = ATTENTION_NAMES.iter().find(|(_, d)| *d == module)?;
                if module != "group_norm" && param == "weight" {
                    transform = Transform::Conv1x1ToLinear;
                }
                format!("mid.attn_1.{s}.{param}")
            }
        } else {
            let (list, sgm_list, sampler, sgm_sampler) = if encoder {
                ("down_blocks.", "down", "downsamplers.0.conv.", "downsample.conv.")
            } else {
                ("up_blocks.", "up", "upsamplers.0.conv.", "upsample.conv.")
            };
            let (block, r) = split_index(rest.strip_prefix(list)?)?;
            let level = if encoder { block } else { levels.checked_sub(block + 1)? };
            if let Some(param) = r.strip_prefix(sampler) {
                format!("{sgm_list}.{level}.{sgm_sampler}{param}")
            } else {
                let (j, r) = split_index(r.strip_prefix("resnets.")?)?;
                format!("{sgm_list}.{level}.block.{j}.{}", resnet_to_sgm(r)?)
            }
        };
        format!("{side}.{rest}")
    };
    Some((format!("{PREFIX}{sgm}"), transform))
}

fn resnet_to_sgm(rest: &str) -> Option<String> {
    let (module, param) = rest.rsplit_once('.')?;
    let module = match module {
        "norm1" | "conv1" | "norm2" | "conv2" => module,
        "conv_shortcut" => "nin_shortcut",
        _ => return None,
    };
    Some(format!("{module}.{param}"))
}

/// diffusers' VAE attention names from before 0.15 (`query`, `key`, `value`,
/// `proj_attn`), which old diffusers-layout VAE files still use, in today's
/// names; other keys unchanged.
pub fn modernise_attention_name(key: &str) -> String {
    const OLD: [(&str, &str); 4] = [
        ("query.", "to_q."),
        ("key.", "to_k."),
        ("value.", "to_v."),
        ("proj_attn.", "to_out.0."),
    ];
    if let Some((head, tail)) = key.split_once("mid_block.attentions.0.") {
        for (old, new) in OLD {
            if let Some(param) = tail.strip_prefix(old) {
                return format!("{head}mid_block.attentions.0.{new}{param}");
            }
        }
    }
    key.to_string()
}
