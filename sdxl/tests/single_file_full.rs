//! The full-size SDXL base layout: the SGM key list derived from the configs
//! (the inverse map) has a real SDXL base file's names, shapes and count, and
//! the forward map turns it back into every diffusers key exactly once.
//! A non-uniform config checks that block numbering follows the config.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::*;
use sdxl::checkpoint::layout::{Component, ModelLayout};
use sdxl::checkpoint::single_file::{sgm_key, sgm_keys, sgm_to_diffusers, Transform};
use sdxl::config::{ClipTextConfig, UNetConfig, VaeConfig};

/// Forward-maps `layout`'s own SGM key list and checks the result covers the
/// layout exactly once, every tensor coming from the key the inverse names.
fn round_trip(layout: &ModelLayout, extra: &[(&str, Vec<usize>)]) -> usize {
    let mut file = sgm_keys(layout);
    file.extend(extra.iter().map(|(k, s)| (k.to_string(), s.clone())));
    let n = file.len();
    let map = sgm_to_diffusers(file, layout).unwrap();
    for c in layout.components() {
        let keys = layout.keys(c).unwrap();
        let m = map.component(c).unwrap();
        assert_eq!(m.len(), keys.len(), "{c}: one entry per diffusers key");
        let mut sources = HashSet::new();
        for (key, shape) in keys.iter() {
            let entry = m.get(key).unwrap();
            let (sgm, transform) = sgm_key(layout, c, key).unwrap();
            assert_eq!(entry.source, sgm, "{c} `{key}`");
            assert_eq!(entry.transform, transform, "{c} `{key}`");
            assert_eq!(entry.shape, shape, "{c} `{key}`");
            sources.insert((entry.source.clone(), entry.transform));
        }
        assert_eq!(
            sources.len(),
            keys.len(),
            "{c}: no two diffusers keys share a source and transform"
        );
    }
    assert_eq!(map.ignored().len(), extra.len());
    n
}

#[test]
fn sdxl_base_round_trip() {
    let layout = layout(&base_configs_dir());
    let derived: BTreeMap<String, Vec<usize>> = sgm_keys(&layout).into_iter().collect();
    // Names and shapes as they are in sd_xl_base_1.0.safetensors.
    let known: [(&str, &[usize]); 15] = [
        ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]),
        ("model.diffusion_model.input_blocks.3.0.op.weight", &[320, 320, 3, 3]),
        (
            "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
            &[640, 320, 1, 1],
        ),
        (
            "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
            &[1280, 2048],
        ),
        ("model.diffusion_model.label_emb.0.0.weight", &[1280, 2816]),
        (
            "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight",
            &[10240, 1280],
        ),
        (
            "model.diffusion_model.output_blocks.2.2.conv.weight",
            &[1280, 1280, 3, 3],
        ),
        ("model.diffusion_model.output_blocks.5.2.conv.weight", &[640, 640, 3, 3]),
        ("model.diffusion_model.output_blocks.6.0.in_layers.0.weight", &[960]),
        (
            "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
            &[320, 640, 1, 1],
        ),
        (
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
            &[128, 256, 1, 1],
        ),
        ("first_stage_model.encoder.mid.attn_1.q.weight", &[512, 512, 1, 1]),
        ("first_stage_model.quant_conv.weight", &[8, 8, 1, 1]),
        (
            "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
            &[3840, 1280],
        ),
        ("conditioner.embedders.1.model.text_projection", &[1280, 1280]),
    ];
    for (k, s) in known {
        assert_eq!(derived.get(k).map(Vec::as_slice), Some(s), "{k}");
    }
    assert!(!derived
        .keys()
        .any(|k| k.contains("output_blocks.8.2") || k.contains("input_blocks.9")));
    // The file also holds the position-ids buffer and OpenCLIP's logit scale.
    let extra = [
        (
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
            vec![1, 77],
        ),
        ("conditioner.embedders.1.model.logit_scale", vec![]),
    ];
    // sd_xl_base_1.0.safetensors has 2515 tensors.
    assert_eq!(round_trip(&layout, &extra), 2515);
    let (_, t) = sgm_key(&layout, Component::TextEncoder2, "text_projection.weight").unwrap();
    assert_eq!(t, Transform::Transpose);
}

fn tiny_variant(unet: serde_json::Value, vae: serde_json::Value) -> ModelLayout {
    let (_, _, t1, t2): (UNetConfig, VaeConfig, ClipTextConfig, ClipTextConfig) = configs(&tiny_dir());
    let u: UNetConfig = serde_json::from_value(unet).unwrap();
    let v: VaeConfig = serde_json::from_value(vae).unwrap();
    ModelLayout::new(&u, Some(&v), &t1, &t2).unwrap()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn block_numbering_follows_a_non_uniform_config() {
    let mut unet = json(&tiny_dir().join("unet/config.json"));
    unet["layers_per_block"] = serde_json::json!([1, 2, 3]);
    unet["down_block_types"] =
        serde_json::json!(["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]);
    unet["up_block_types"] = serde_json::json!(["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]);
    unet["transformer_layers_per_block"] = serde_json::json!([[1], [2, 1], 3]);
    unet["reverse_transformer_layers_per_block"] = serde_json::json!([[1, 2, 1, 1], [1, 1, 1], [2, 1]]);
    unet["use_linear_projection"] = serde_json::json!(false);
    let mut vae = json(&tiny_dir().join("vae/config.json"));
    vae["block_out_channels"] = serde_json::json!([8, 16, 16]);
    vae["down_block_types"] = serde_json::json!(["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"]);
    vae["up_block_types"] = serde_json::json!(["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]);
    vae["layers_per_block"] = serde_json::json!(1);
    let layout = tiny_variant(unet, vae);
    round_trip(&layout, &[]);

    let sgm = |c, k: &str| sgm_key(&layout, c, k).unwrap().0;
    let u = |k: &str| sgm(Component::Unet, k);
    // Level 0: one resnet + attention, then the downsampler.
    assert_eq!(
        u("down_blocks.0.attentions.0.proj_in.weight"),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    );
    assert_eq!(
        u("down_blocks.0.downsamplers.0.conv.weight"),
        "model.diffusion_model.input_blocks.2.0.op.weight"
    );
    // Level 1: two resnets (3, 4) whose attentions have 2 and 1 layers,
    // downsampler 5; level 2: resnets 6–8 with 3-layer attentions.
    assert_eq!(
        u("down_blocks.1.downsamplers.0.conv.bias"),
        "model.diffusion_model.input_blocks.5.0.op.bias"
    );
    assert_eq!(
        u("down_blocks.1.attentions.0.transformer_blocks.1.norm3.weight"),
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.norm3.weight"
    );
    let has = |k: &str| layout.shape(Component::Unet, k).is_some();
    assert!(!has("down_blocks.1.attentions.1.transformer_blocks.1.norm3.weight"));
    assert!(has("mid_block.attentions.0.transformer_blocks.2.norm3.weight"));
    assert_eq!(
        u("down_blocks.2.attentions.2.transformer_blocks.2.attn1.to_q.weight"),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.2.attn1.to_q.weight"
    );
    // Up block 0 has 3 + 1 resnets (0–3), its upsampler after an attention.
    assert_eq!(
        u("up_blocks.0.upsamplers.0.conv.weight"),
        "model.diffusion_model.output_blocks.3.2.conv.weight"
    );
    // Up block 1 is plain: resnets 4–6, upsampler at `.1`.
    assert_eq!(
        u("up_blocks.1.upsamplers.0.conv.weight"),
        "model.diffusion_model.output_blocks.6.1.conv.weight"
    );
    assert_eq!(
        u("up_blocks.2.resnets.1.conv2.weight"),
        "model.diffusion_model.output_blocks.8.0.out_layers.3.weight"
    );
    assert_eq!(
        layout.shape(Component::Unet, "down_blocks.0.attentions.0.proj_in.weight"),
        Some(&[16, 16, 1, 1][..])
    );
    // A 3-level VAE: SGM's decoder level 0 is diffusers' last up block.
    let v = |k: &str| sgm(Component::Vae, k);
    assert_eq!(
        v("decoder.up_blocks.2.resnets.1.conv1.weight"),
        "first_stage_model.decoder.up.0.block.1.conv1.weight"
    );
    assert_eq!(
        v("decoder.up_blocks.0.upsamplers.0.conv.weight"),
        "first_stage_model.decoder.up.2.upsample.conv.weight"
    );
}
