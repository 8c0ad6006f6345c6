//! The key derivation from configs, checked against a real diffusers folder:
//! the tiny SDXL's four weight files must hold exactly the derived keys, with
//! the derived shapes. And the full-size derivation has SDXL base's counts.

mod common;

use std::collections::BTreeMap;

use common::*;
use sdxl::checkpoint::layout::{canonical_text_key, Component};

#[test]
fn derived_keys_are_the_tiny_folders_keys() {
    let layout = tiny_layout();
    for c in Component::ALL {
        let file: BTreeMap<String, Vec<usize>> = shapes(&component_file(&tiny_dir(), c))
            .into_iter()
            .map(|(k, s)| {
                let k = if c.is_text_encoder() {
                    canonical_text_key(&k).into_owned()
                } else {
                    k
                };
                (k, s)
            })
            .collect();
        let derived: BTreeMap<String, Vec<usize>> = layout
            .keys(c)
            .unwrap()
            .iter()
            .map(|(k, s)| (k.to_string(), s.to_vec()))
            .collect();
        let missing: Vec<_> = file.keys().filter(|k| !derived.contains_key(*k)).collect();
        let extra: Vec<_> = derived.keys().filter(|k| !file.contains_key(*k)).collect();
        assert!(missing.is_empty(), "{c}: in the folder but not derived: {missing:?}");
        assert!(extra.is_empty(), "{c}: derived but not in the folder: {extra:?}");
        for (k, s) in &file {
            assert_eq!(&derived[k], s, "{c} `{k}`");
        }
    }
}

#[test]
fn full_size_counts_are_sdxl_base() {
    let layout = layout(&base_configs_dir());
    let count = |c| layout.keys(c).unwrap().len();
    // diffusers' stabilityai/stable-diffusion-xl-base-1.0 folder.
    assert_eq!(count(Component::Unet), 1680);
    assert_eq!(count(Component::Vae), 248);
    assert_eq!(count(Component::TextEncoder), 196);
    assert_eq!(count(Component::TextEncoder2), 517);
    let shape = |c, k| layout.shape(c, k).unwrap().to_vec();
    assert_eq!(shape(Component::Unet, "add_embedding.linear_1.weight"), [1280, 2816]);
    assert_eq!(
        shape(
            Component::Unet,
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight"
        ),
        [1280, 2048]
    );
    assert_eq!(
        shape(Component::Unet, "up_blocks.0.resnets.2.conv1.weight"),
        [1280, 1920, 3, 3]
    );
    assert_eq!(
        shape(Component::Vae, "decoder.up_blocks.3.resnets.0.conv_shortcut.weight"),
        [128, 256, 1, 1]
    );
    assert_eq!(shape(Component::TextEncoder2, "text_projection.weight"), [1280, 1280]);
    assert_eq!(
        shape(Component::TextEncoder2, "encoder.layers.31.mlp.fc1.weight"),
        [5120, 1280]
    );
    assert!(layout.shape(Component::TextEncoder, "text_projection.weight").is_none());
}
