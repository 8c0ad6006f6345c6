//! The mapping itself, both directions: [`sgm_to_diffusers`] and
//! [`vae_file_to_diffusers`] route every file key onto diffusers' names and
//! check the result against the layout; [`sgm_key`] and [`sgm_keys`] name the
//! file keys a layout calls for.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::detect::{detect_checkpoint, CheckpointKind};
use super::map::{ComponentMap, IgnoredKey, MappedTensor, Route, SingleFileError, SingleFileMap};
use super::transform::Transform;
use super::unet::SgmUNetIndex;
use super::{clip, unet, vae};
use crate::checkpoint::layout::{canonical_text_key, Component, ComponentKeys, ModelLayout, VaePlan};

/// Routes one file key (forward direction: file → diffusers).
fn route(layout: &ModelLayout, index: &SgmUNetIndex, key: &str) -> (Option<Component>, Route) {
    if let Some(r) = key.strip_prefix(unet::PREFIX) {
        let route = index.to_diffusers(&layout.unet, r).map_or(Route::Unknown, Route::to);
        return (Some(Component::Unet), route);
    }
    if let Some(r) = key.strip_prefix(vae::PREFIX) {
        return match &layout.vae {
            Some(plan) => (Some(Component::Vae), vae::to_diffusers(plan.levels(), r)),
            None => (
                None,
                Route::Ignore("VAE weights, not used: a separate VAE was asked for"),
            ),
        };
    }
    if let Some(r) = key.strip_prefix(clip::TE1_PREFIX) {
        return (Some(Component::TextEncoder), clip::te1_to_diffusers(r));
    }
    if let Some(r) = key.strip_prefix(clip::TE2_PREFIX) {
        return (Some(Component::TextEncoder2), clip::te2_to_diffusers(r));
    }
    let reason = if key.starts_with("model_ema.") {
        "EMA copy of the UNet weights (the live weights are used, as diffusers does by default)"
    } else {
        "not part of the SDXL models"
    };
    (None, Route::Ignore(reason))
}

/// The single-file key and transform that hold diffusers' `key` of
/// `component`, as SGM writes it (the inverse direction: diffusers → file).
pub fn sgm_key(layout: &ModelLayout, component: Component, key: &str) -> Option<(String, Transform)> {
    match component {
        Component::Unet => unet::to_sgm(&layout.unet, key).map(|k| (k, Transform::Identity)),
        Component::Vae => vae::to_sgm(layout.vae.as_ref()?.levels(), key),
        Component::TextEncoder => Some(clip::te1_to_sgm(&canonical_text_key(key))),
        Component::TextEncoder2 => clip::te2_to_sgm(&canonical_text_key(key)),
    }
}

/// Every key (with its stored shape) an SGM single file for `layout` holds,
/// derived from the configs alone. Sorted; a fused `in_proj` appears once.
pub fn sgm_keys(layout: &ModelLayout) -> Vec<(String, Vec<usize>)> {
    let mut out = BTreeMap::new();
    for c in layout.components() {
        for (key, shape) in layout.keys(c).into_iter().flat_map(|k| k.iter()) {
            let (sgm, t) = sgm_key(layout, c, key).unwrap_or_else(|| panic!("no SGM name for {c} `{key}`"));
            out.insert(sgm, t.source_shape(shape));
        }
    }
    out.into_iter().collect()
}

/// Maps a single file's keys onto diffusers' and checks them against the
/// layout. `keys` are the file's `(name, shape)` pairs, in any order.
///
/// Errors, in the order they are looked for: not an SDXL file at all; no VAE
/// (only when the layout has one); for each component in [`Component::ALL`]
/// order and each weight in derivation order, a missing file key or a wrong
/// shape; a file key that maps to nothing the configs describe.
pub fn sgm_to_diffusers(
    keys: impl IntoIterator<Item = (String, Vec<usize>)>,
    layout: &ModelLayout,
) -> Result<SingleFileMap, SingleFileError> {
    let keys: Vec<(String, Vec<usize>)> = keys.into_iter().collect();
    let kind = detect_checkpoint(keys.iter().map(|(k, _)| k.as_str()));
    let CheckpointKind::SdxlBase { has_vae } = kind else {
        return Err(SingleFileError::NotSdxl(kind.describe().into()));
    };
    if layout.vae.is_some() && !has_vae {
        return Err(SingleFileError::NoVae);
    }

    let index = SgmUNetIndex::new(&layout.unet);
    let routed = route_all(&keys, |key| route(layout, &index, key))?;
    let mut produced = routed.produced;
    let mut components = BTreeMap::new();
    for c in layout.components() {
        let expected = layout.keys(c).expect("laid-out component");
        let got = produced.remove(&c).unwrap_or_default();
        let map = check_component(c, expected, got, |k| sgm_key(layout, c, k))?;
        components.insert(c, Arc::new(map));
    }
    if let Some(key) = routed.unknown.into_iter().min() {
        return Err(SingleFileError::UnexpectedKey {
            key,
            detail: String::new(),
        });
    }
    Ok(SingleFileMap {
        components,
        ignored: routed.ignored,
    })
}

/// Maps a standalone VAE file (for `--vae`) onto diffusers' `AutoencoderKL`
/// keys: the LDM layout (`encoder.down.N.block.M`, as in Stability's
/// `sdxl_vae.safetensors`, bare or under `first_stage_model.`/`vae.`) or
/// diffusers' own, including its old attention names (`query`, `key`,
/// `value`, `proj_attn`). The result has only [`Component::Vae`].
pub fn vae_file_to_diffusers(
    keys: impl IntoIterator<Item = (String, Vec<usize>)>,
    plan: &VaePlan,
) -> Result<SingleFileMap, SingleFileError> {
    let keys: Vec<(String, Vec<usize>)> = keys.into_iter().collect();
    let levels = plan.levels();
    let ldm_prefix = ["first_stage_model.", "vae.", ""].into_iter().find(|p| {
        keys.iter()
            .any(|(k, _)| k.starts_with(&format!("{p}encoder.down.")) || k.starts_with(&format!("{p}decoder.up.")))
    });
    let routed = route_all(&keys, |key| {
        let route = match ldm_prefix {
            Some(p) => match key.strip_prefix(p) {
                Some(k) => vae::to_diffusers(levels, k),
                None => Route::Ignore("not part of the VAE"),
            },
            None => Route::to(vae::modernise_attention_name(key)),
        };
        (Some(Component::Vae), route)
    })?;
    let mut produced = routed.produced;
    let got = produced.remove(&Component::Vae).unwrap_or_default();
    let inverse = |k: &str| match ldm_prefix {
        Some(p) => vae::to_sgm(levels, k).map(|(s, t)| (format!("{p}{}", s.trim_start_matches(vae::PREFIX)), t)),
        None => Some((k.to_string(), Transform::Identity)),
    };
    let map = check_component(Component::Vae, &plan.keys(), got, inverse)?;
    // Diffusers-layout keys the plan lacks were routed, so they surface in
    // `check_component`; `unknown` holds LDM keys that name nothing.
    if let Some(key) = routed.unknown.into_iter().min() {
        return Err(SingleFileError::UnexpectedKey {
            key,
            detail: String::new(),
        });
    }
    Ok(SingleFileMap {
        components: BTreeMap::from([(Component::Vae, Arc::new(map))]),
        ignored: routed.ignored,
    })
}

/// The outcome of routing every file key.
struct Routed {
    produced: HashMap<Component, HashMap<String, MappedTensor>>,
    ignored: Vec<IgnoredKey>,
    unknown: Vec<String>,
}

/// Routes every key, refusing two file keys that make the same diffusers key.
fn route_all(
    keys: &[(String, Vec<usize>)],
    route: impl Fn(&str) -> (Option<Component>, Route),
) -> Result<Routed, SingleFileError> {
    let mut out = Routed {
        produced: HashMap::new(),
        ignored: Vec::new(),
        unknown: Vec::new(),
    };
    for (key, shape) in keys {
        match route(key) {
            (Some(c), Route::To(targets)) => {
                let slot = out.produced.entry(c).or_default();
                for (diffusers_key, transform) in targets {
                    let entry = MappedTensor {
                        source: key.clone(),
                        transform,
                        source_shape: shape.clone(),
                        shape: Vec::new(),
                    };
                    if let Some(previous) = slot.insert(diffusers_key.clone(), entry) {
                        return Err(SingleFileError::Duplicate {
                            component: c,
                            diffusers_key,
                            first: previous.source,
                            second: key.clone(),
                        });
                    }
                }
            }
            (_, Route::Ignore(reason)) => out.ignored.push(IgnoredKey {
                key: key.clone(),
                reason,
            }),
            _ => out.unknown.push(key.clone()),
        }
    }
    Ok(out)
}

/// Checks one component's routed keys against its expected weights, in
/// derivation order: each must be there with a shape the transform turns into
/// the expected one; then nothing may be left over. `inverse` names the file
/// key (and its transform) for an expected weight, for the error messages.
fn check_component(
    c: Component,
    expected: &ComponentKeys,
    mut got: HashMap<String, MappedTensor>,
    inverse: impl Fn(&str) -> Option<(String, Transform)>,
) -> Result<ComponentMap, SingleFileError> {
    let mut entries = BTreeMap::new();
    for (diffusers_key, shape) in expected.iter() {
        let (file_key, file_transform) = inverse(diffusers_key)
            .unwrap_or_else(|| (format!("(the file name of `{diffusers_key}`)"), Transform::Identity));
        let Some(mut m) = got.remove(diffusers_key) else {
            return Err(SingleFileError::MissingKey {
                component: c,
                key: file_key,
                diffusers_key: diffusers_key.to_string(),
                expected: file_transform.source_shape(shape),
            });
        };
        if m.transform.output_shape(&m.source_shape).as_deref() != Some(shape) {
            // A 1×1 convolution is a linear layer: SGM's VAE attention stores
            // q/k/v/proj_out so, and some converters do likewise elsewhere.
            let as_linear = Transform::Conv1x1ToLinear.output_shape(&m.source_shape);
            if m.transform == Transform::Identity && as_linear.as_deref() == Some(shape) {
                m.transform = Transform::Conv1x1ToLinear;
            } else {
                return Err(SingleFileError::WrongShape {
                    component: c,
                    key: m.source,
                    diffusers_key: diffusers_key.to_string(),
                    shape: m.source_shape,
                    expected: file_transform.source_shape(shape),
                });
            }
        }
        m.shape = shape.to_vec();
        entries.insert(diffusers_key.to_string(), m);
    }
    if let Some((diffusers_key, m)) = got.into_iter().min_by(|a, b| a.1.source.cmp(&b.1.source)) {
        return Err(SingleFileError::UnexpectedKey {
            key: m.source,
            detail: format!(" (it would be {c} `{diffusers_key}`)"),
        });
    }
    Ok(ComponentMap { component: c, entries })
}
