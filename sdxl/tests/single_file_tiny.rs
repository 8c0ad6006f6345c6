//! The tiny SDXL single file against the same weights as a diffusers folder:
//! every diffusers tensor is made, bit for bit, from exactly one file tensor,
//! and every file tensor is used (`logit_scale` aside); and the inverse map
//! reproduces the file's key list from the configs.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use common::*;
use sdxl::checkpoint::layout::{canonical_text_key, Component};
use sdxl::checkpoint::single_file::{sgm_keys, sgm_to_diffusers, vae_file_to_diffusers, SingleFile, Transform};

#[test]
fn every_key_maps_both_ways_and_tensors_are_bit_equal() {
    let layout = tiny_layout();
    let single = SingleFile::open(&single_file(), &layout).unwrap();
    let mut used_sources = BTreeSet::new();
    let mut transforms = BTreeMap::new();
    for c in Component::ALL {
        let map = single.map().component(c).unwrap();
        // SAFETY: read-only mapping of a fixture nobody writes.
        let folder = unsafe { MmapedSafetensors::new(component_file(&tiny_dir(), c)) }.unwrap();
        let folder_keys: BTreeSet<String> = folder
            .tensors()
            .into_iter()
            .map(|(k, _)| {
                if c.is_text_encoder() {
                    canonical_text_key(&k).into_owned()
                } else {
                    k
                }
            })
            .collect();
        let mapped_keys: BTreeSet<String> = map.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(folder_keys, mapped_keys, "{c}: the mapped keys are the folder's keys");

        let backend = single.backend(c).unwrap();
        for (name, _) in folder.tensors() {
            let expected = folder.load(&name, &Device::Cpu).unwrap();
            // The folder's own spelling (unprefixed text keys included) resolves.
            let got = backend.load(&name, &Device::Cpu).unwrap();
            assert_eq!(bits(&got), bits(&expected), "{c} `{name}`");
            let m = map.get(&name).unwrap();
            used_sources.insert(m.source.clone());
            *transforms.entry(format!("{:?}", m.transform)).or_insert(0) += 1;
        }
    }
    let file_keys: BTreeSet<String> = shapes(&single_file()).into_iter().map(|(k, _)| k).collect();
    let unused: Vec<_> = file_keys.difference(&used_sources).collect();
    assert_eq!(
        unused,
        ["conditioner.embedders.1.model.logit_scale"],
        "file keys no component uses"
    );
    let ignored: Vec<_> = single.map().ignored().iter().map(|i| i.key.as_str()).collect();
    assert_eq!(ignored, ["conditioner.embedders.1.model.logit_scale"]);
    // 3 layers × q/k/v from in_proj weight and bias; one transpose; 2 × 4 VAE 1×1 convs.
    assert_eq!(transforms[&format!("{:?}", Transform::Rows { index: 0, of: 3 })], 6);
    assert_eq!(transforms["Transpose"], 1);
    assert_eq!(transforms["Conv1x1ToLinear"], 8);
}

#[test]
fn var_builder_serves_diffusers_names_lazily() {
    let layout = tiny_layout();
    let single = SingleFile::open(&single_file(), &layout).unwrap();
    let vb = single
        .var_builder(Component::TextEncoder2, DType::F32, &Device::Cpu)
        .unwrap();
    // What `clip.rs` asks first, then a q/k/v slice and the projection.
    assert!(vb.contains_tensor("text_model.embeddings.token_embedding.weight"));
    let q = vb
        .get((16, 16), "text_model.encoder.layers.1.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.dtype(), DType::F32);
    let p = vb.pp("text_projection").get((16, 16), "weight").unwrap();
    assert_eq!(p.dims(), &[16, 16]);
    let err = vb
        .get((16, 15), "text_model.final_layer_norm.weight")
        .unwrap_err()
        .to_string();
    assert!(err.contains("shape mismatch"), "{err}");
    assert!(!vb.contains_tensor("text_model.embeddings.position_ids"));

    let vae = single.var_builder(Component::Vae, DType::F16, &Device::Cpu).unwrap();
    let to_q = vae.get((16, 16), "decoder.mid_block.attentions.0.to_q.weight").unwrap();
    assert_eq!(to_q.dims(), &[16, 16]);
    let enc = vae.get((8, 3, 3, 3), "encoder.conv_in.weight").unwrap();
    assert_eq!(enc.dtype(), DType::F16);
}

#[test]
fn inverse_map_gives_the_files_keys_and_shapes() {
    let layout = tiny_layout();
    let derived: BTreeMap<String, Vec<usize>> = sgm_keys(&layout).into_iter().collect();
    let mut file: BTreeMap<String, Vec<usize>> = shapes(&single_file()).into_iter().collect();
    file.remove("conditioner.embedders.1.model.logit_scale");
    assert_eq!(derived, file);
}

#[test]
fn a_separate_vae_leaves_first_stage_model_unused() {
    let (u, _, t1, t2) = configs(&tiny_dir());
    let layout = sdxl::checkpoint::layout::ModelLayout::new(&u, None, &t1, &t2).unwrap();
    let map = sgm_to_diffusers(shapes(&single_file()), &layout).unwrap();
    assert!(map.component(Component::Vae).is_none());
    let skipped = map
        .ignored()
        .iter()
        .filter(|i| i.key.starts_with("first_stage_model."))
        .count();
    assert_eq!(skipped, 244);
}

#[test]
fn standalone_vae_files_in_both_layouts() {
    let layout = tiny_layout();
    let plan = layout.vae.as_ref().unwrap();
    // SAFETY: read-only mappings of fixtures nobody writes.
    let single = unsafe { MmapedSafetensors::new(single_file()) }.unwrap();
    let folder = unsafe { MmapedSafetensors::new(component_file(&tiny_dir(), Component::Vae)) }.unwrap();

    // The LDM layout without prefix, as Stability's `sdxl_vae.safetensors`.
    let ldm: std::collections::HashMap<String, candle_core::Tensor> = single
        .tensors()
        .into_iter()
        .filter_map(|(k, _)| {
            let bare = k.strip_prefix("first_stage_model.")?.to_string();
            Some((bare, single.load(&k, &Device::Cpu).unwrap()))
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdxl_vae.safetensors");
    candle_core::safetensors::save(&ldm, &path).unwrap();
    for file in [path.as_path(), component_file(&tiny_dir(), Component::Vae).as_path()] {
        let vae = SingleFile::open_vae(file, plan).unwrap();
        let backend = vae.backend(Component::Vae).unwrap();
        assert_eq!(
            vae.map().component(Component::Vae).unwrap().len(),
            folder.tensors().len()
        );
        for (name, _) in folder.tensors() {
            let expected = folder.load(&name, &Device::Cpu).unwrap();
            assert_eq!(
                bits(&backend.load(&name, &Device::Cpu).unwrap()),
                bits(&expected),
                "{name}"
            );
        }
        assert!(vae.backend(Component::Unet).is_none());
    }

    // diffusers' old attention names; and a missing key named as the file has it.
    let old: Vec<(String, Vec<usize>)> = shapes(&component_file(&tiny_dir(), Component::Vae))
        .into_iter()
        .map(|(k, s)| {
            (
                k.replace("attentions.0.to_q.", "attentions.0.query.")
                    .replace("to_out.0.", "proj_attn."),
                s,
            )
        })
        .collect();
    let map = vae_file_to_diffusers(old, plan).unwrap();
    let q = map
        .component(Component::Vae)
        .unwrap()
        .get("encoder.mid_block.attentions.0.to_q.weight")
        .unwrap();
    assert_eq!(q.source, "encoder.mid_block.attentions.0.query.weight");
    let missing: Vec<(String, Vec<usize>)> = ldm
        .iter()
        .filter(|(k, _)| k.as_str() != "decoder.up.3.upsample.conv.weight")
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let err = vae_file_to_diffusers(missing, plan).unwrap_err().to_string();
    assert!(
        err.contains("`decoder.up.3.upsample.conv.weight` is missing (expected shape [16, 16, 3, 3]"),
        "{err}"
    );
}
