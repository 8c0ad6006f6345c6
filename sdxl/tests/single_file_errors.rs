//! Files that must be refused, and how: a missing weight, a wrong shape, no
//! VAE, a key the configs do not explain, another kind of checkpoint, a pickle.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use sdxl::checkpoint::file::FileError;
use sdxl::checkpoint::layout::Component;
use sdxl::checkpoint::single_file::{
    detect_checkpoint, looks_like_sdxl_single_file, sgm_to_diffusers, CheckpointKind, SingleFile, SingleFileError,
};

fn tiny_keys() -> Vec<(String, Vec<usize>)> {
    shapes(&single_file())
}

fn map_err(keys: Vec<(String, Vec<usize>)>) -> SingleFileError {
    sgm_to_diffusers(keys, &tiny_layout()).unwrap_err()
}

#[test]
fn missing_key_is_named_with_its_expected_shape() {
    let gone = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight";
    let keys = tiny_keys().into_iter().filter(|(k, _)| k != gone).collect();
    let err = map_err(keys);
    assert_eq!(
        err,
        SingleFileError::MissingKey {
            component: Component::TextEncoder2,
            key: gone.into(),
            diffusers_key: "text_model.encoder.layers.1.self_attn.q_proj.weight".into(),
            expected: vec![48, 16],
        }
    );
    assert_eq!(
        err.to_string(),
        "not an SDXL checkpoint matching the configs: \
         `conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight` is missing \
         (expected shape [48, 16], for text_encoder_2 `text_model.encoder.layers.1.self_attn.q_proj.weight`)"
    );
}

#[test]
fn wrong_shape_is_named_with_the_expected_shape() {
    let bad = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight";
    let keys = tiny_keys()
        .into_iter()
        .map(|(k, s)| if k == bad { (k, vec![32, 2048]) } else { (k, s) })
        .collect();
    match map_err(keys) {
        SingleFileError::WrongShape {
            component,
            key,
            diffusers_key,
            shape,
            expected,
        } => {
            assert_eq!(component, Component::Unet);
            assert_eq!(key, bad);
            assert_eq!(
                diffusers_key,
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
            );
            assert_eq!((shape, expected), (vec![32, 2048], vec![32, 32]));
        }
        e => panic!("{e}"),
    }
    // A VAE attention weight that is neither the 1×1 conv nor the linear form.
    let bad = "first_stage_model.decoder.mid.attn_1.q.weight";
    let keys = tiny_keys()
        .into_iter()
        .map(|(k, s)| if k == bad { (k, vec![16, 16, 3, 3]) } else { (k, s) })
        .collect();
    let msg = map_err(keys).to_string();
    assert!(
        msg.contains("has shape [16, 16, 3, 3], expected [16, 16, 1, 1]"),
        "{msg}"
    );
}

#[test]
fn a_file_without_vae_says_so() {
    let keys = tiny_keys()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("first_stage_model."))
        .collect();
    let err = map_err(keys);
    assert_eq!(err, SingleFileError::NoVae);
    assert_eq!(
        err.to_string(),
        "no VAE in the checkpoint (it has no `first_stage_model.*` weights)"
    );
}

#[test]
fn extra_layers_are_refused() {
    // A deeper transformer than the config says: the weights would be dropped.
    let mut keys = tiny_keys();
    keys.push((
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.2.attn1.to_q.weight".into(),
        vec![32, 32],
    ));
    let msg = map_err(keys).to_string();
    assert!(
        msg.contains("`model.diffusion_model.input_blocks.4.1.transformer_blocks.2.attn1.to_q.weight` is not a weight")
            && msg.contains("unet `down_blocks.1.attentions.0.transformer_blocks.2.attn1.to_q.weight`"),
        "{msg}"
    );
    let mut keys = tiny_keys();
    keys.push((
        "model.diffusion_model.input_blocks.4.0.in_layers.1.weight".into(),
        vec![32],
    ));
    assert!(matches!(map_err(keys), SingleFileError::UnexpectedKey { .. }));
}

#[test]
fn harmless_extras_are_ignored() {
    let mut keys = tiny_keys();
    keys.push(("model_ema.decay".into(), vec![]));
    keys.push((
        "model_ema.diffusion_modelinput_blocks00weight".into(),
        vec![16, 4, 3, 3],
    ));
    keys.push((
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids".into(),
        vec![1, 77],
    ));
    keys.push(("denoiser.sigmas".into(), vec![1000]));
    let map = sgm_to_diffusers(keys, &tiny_layout()).unwrap();
    assert_eq!(map.ignored().len(), 5);
}

#[test]
fn other_checkpoints_are_named() {
    let sd15 = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ];
    assert_eq!(detect_checkpoint(sd15), CheckpointKind::StableDiffusion);
    let keys = sd15.iter().map(|k| (k.to_string(), vec![1])).collect();
    let msg = map_err(keys).to_string();
    assert!(
        msg.starts_with("not an SDXL checkpoint: this is a Stable Diffusion 1.x/2.x"),
        "{msg}"
    );
    let refiner = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "conditioner.embedders.0.model.ln_final.weight",
    ];
    assert_eq!(detect_checkpoint(refiner), CheckpointKind::SdxlRefiner);
    let names = |p: std::path::PathBuf| shapes(&p).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let lora = names(features_dir().join("lora_kohya.safetensors"));
    assert_eq!(detect_checkpoint(lora.iter().map(String::as_str)), CheckpointKind::Lora);
    let unet = names(component_file(&tiny_dir(), Component::Unet));
    assert_eq!(
        detect_checkpoint(unet.iter().map(String::as_str)),
        CheckpointKind::Diffusers
    );
}

#[test]
fn detection_helper_reads_only_the_header() {
    assert!(looks_like_sdxl_single_file(&single_file()).unwrap());
    assert!(!looks_like_sdxl_single_file(&features_dir().join("lora_peft.safetensors")).unwrap());
    assert!(!looks_like_sdxl_single_file(&component_file(&tiny_dir(), Component::TextEncoder2)).unwrap());
}

#[test]
fn pickles_are_refused_unopened() {
    let dir = tempfile::tempdir().unwrap();
    let layout = tiny_layout();
    // By extension (the content does not matter)…
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"anything").unwrap();
    let err = SingleFile::open(&ckpt, &layout).unwrap_err();
    assert!(matches!(&err, SingleFileError::File(FileError::Pickle { .. })), "{err}");
    assert!(
        err.to_string().ends_with(
            "is a PyTorch pickle checkpoint: loading a pickle can run arbitrary code, so it is refused; \
             convert it to .safetensors first"
        ),
        "{err}"
    );
    // …and by content: a zip-format torch file and a bare pickle, misnamed.
    for (name, bytes) in [
        ("zip.safetensors", &b"PK\x03\x04archive"[..]),
        ("bare.safetensors", &[0x80, 2, 0x8a, 0x0a]),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let err = SingleFile::open(&p, &layout).unwrap_err();
        assert!(
            matches!(err, SingleFileError::File(FileError::Pickle { .. })),
            "{name}: {err}"
        );
        assert!(looks_like_sdxl_single_file(&p).is_err());
    }
}

#[test]
fn a_real_file_without_vae_through_open() {
    // Write the tiny single file minus its VAE, as "pruned" checkpoints are.
    // SAFETY: read-only mapping of a fixture nobody writes.
    let src = unsafe { candle_core::safetensors::MmapedSafetensors::new(single_file()) }.unwrap();
    let tensors: HashMap<String, Tensor> = src
        .tensors()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("first_stage_model."))
        .map(|(k, _)| {
            let t = src.load(&k, &Device::Cpu).unwrap();
            (k, t)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-vae.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    assert_eq!(
        SingleFile::open(&path, &tiny_layout()).unwrap_err(),
        SingleFileError::NoVae
    );
    // With a separate VAE the same file loads.
    let (u, _, t1, t2) = configs(&tiny_dir());
    let layout = sdxl::checkpoint::layout::ModelLayout::new(&u, None, &t1, &t2).unwrap();
    let single = SingleFile::open(&path, &layout).unwrap();
    let vb = single.var_builder(Component::Unet, DType::F32, &Device::Cpu).unwrap();
    assert!(vb.contains_tensor("conv_in.weight"));
    assert!(single.var_builder(Component::Vae, DType::F32, &Device::Cpu).is_none());
}
