//! Text-encoder names between a single file and transformers' CLIP, both ways.
//!
//! - The first encoder (`conditioner.embedders.0.transformer.*`) is already
//!   stored under transformers' names (`text_model.encoder.layers.N.…`).
//! - The second (`conditioner.embedders.1.model.*`) is an OpenCLIP model:
//!   `transformer.resblocks.N` with `ln_1`/`ln_2`, one fused `attn.in_proj_*`
//!   for q, k and v, `mlp.c_fc`/`mlp.c_proj`, and `positional_embedding`,
//!   `token_embedding`, `ln_final`, `text_projection` (transposed) at the top.
//!
//! SGM runs OpenCLIP up to its penultimate block for the hidden states, but the
//! last block is still stored and needed: the pooled embedding passes through
//! every block, `ln_final` and `text_projection`.

use super::map::{split_index, Route};
use super::transform::Transform;

/// The key prefix of the first (OpenAI CLIP) text encoder in a single file.
pub const TE1_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// The key prefix of the second (OpenCLIP bigG) text encoder in a single file.
pub const TE2_PREFIX: &str = "conditioner.embedders.1.model.";

/// OpenCLIP top-level tensors: (OpenCLIP, transformers, transform).
const TE2_TOP: [(&str, &str, Transform); 6] = [
    (
        "token_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
        Transform::Identity,
    ),
    (
        "positional_embedding",
        "text_model.embeddings.position_embedding.weight",
        Transform::Identity,
    ),
    (
        "ln_final.weight",
        "text_model.final_layer_norm.weight",
        Transform::Identity,
    ),
    ("ln_final.bias", "text_model.final_layer_norm.bias", Transform::Identity),
    ("text_projection", "text_projection.weight", Transform::Transpose),
    // A few converters store the projection as a linear layer already.
    ("text_projection.weight", "text_projection.weight", Transform::Identity),
];

/// OpenCLIP residual-block sub-modules → transformers encoder-layer ones
/// (the fused `attn.in_proj_*` is handled apart).
const TE2_BLOCK: [(&str, &str); 5] = [
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
];

/// The route of a first-encoder key (the part after [`TE1_PREFIX`]).
pub fn te1_to_diffusers(key: &str) -> Route {
    if key == "text_model.embeddings.position_ids" {
        return Route::Ignore("position ids buffer (0..77), not a weight");
    }
    if key.starts_with("text_model.") {
        Route::to(key.to_string())
    } else {
        Route::Unknown
    }
}

/// The SGM key of a first-encoder diffusers key: the same name, prefixed.
pub fn te1_to_sgm(key: &str) -> (String, Transform) {
    (format!("{TE1_PREFIX}{key}"), Transform::Identity)
}

/// The route of a second-encoder key (the part after [`TE2_PREFIX`]).
pub fn te2_to_diffusers(key: &str) -> Route {
    match key {
        "logit_scale" => return Route::Ignore("CLIP's contrastive-loss temperature, unused by the text encoder"),
        "attn_mask" => return Route::Ignore("causal-mask buffer, rebuilt by the model"),
        _ => {}
    }
    if let Some((_, d, t)) = TE2_TOP.iter().find(|(s, _, _)| *s == key) {
        return Route::To(vec![(d.to_string(), *t)]);
    }
    let Some((layer, rest)) = key.strip_prefix("transformer.resblocks.").and_then(split_index) else {
        return Route::Unknown;
    };
    let l = format!("text_model.encoder.layers.{layer}");
    if let Some(param) = rest.strip_prefix("attn.in_proj_") {
        // `in_proj_weight` / `in_proj_bias`: rows [q; k; v].
        return Route::To(
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(|(index, p)| (format!("{l}.self_attn.{p}.{param}"), Transform::Rows { index, of: 3 }))
                .collect(),
        );
    }
    let Some((module, param)) = rest.rsplit_once('.') else {
        return Route::Unknown;
    };
    match TE2_BLOCK.iter().find(|(s, _)| *s == module) {
        Some((_, d)) => Route::to(format!("{l}.{d}.{param}")),
        None => Route::Unknown,
    }
}

/// The SGM key and transform that make the second encoder's diffusers `key`.
pub fn te2_to_sgm(key: &str) -> Option<(String, Transform)> {
    // The first matching entry is the form SGM itself writes.
    if let Some((s, _, t)) = TE2_TOP.iter().find(|(_, d, _)| *d == key) {
        return Some((format!("{TE2_PREFIX}{s}"), *t));
    }
    let (layer, rest) = split_index(key.strip_prefix("text_model.encoder.layers.")?)?;
    let block = format!("{TE2_PREFIX}transformer.resblocks.{layer}");
    let (module, param) = rest.rsplit_once('.')?;
    for (index, p) in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        .iter()
        .enumerate()
    {
        if module == *p {
            return Some((
                format!("{block}.attn.in_proj_{param}"),
                Transform::Rows { index, of: 3 },
            ));
        }
    }
    let (s, _) = TE2_BLOCK.iter().find(|(_, d)| *d == module)?;
    Some((format!("{block}.{s}.{param}"), Transform::Identity))
}
