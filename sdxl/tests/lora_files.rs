//! LoRA parsing with the fixture LoRAs (kohya and PEFT) on the tiny SDXL, the
//! update maths against diffusers' own merge, and the refusals.

mod common;

// The merged weights in `tests/fixtures/lora-reference` were made by diffusers
// from exactly the project's fixture LoRAs and tiny model: these tests read
// those, whatever SDXL_FEATURES_DIR / SDXL_REFERENCE_DIR say (another
// reference folder's LoRAs are checked end to end by worker/tests/features_cli.rs).
fn features_dir() -> std::path::PathBuf {
    common::fixture("sdxl-features")
}

fn tiny_dir() -> std::path::PathBuf {
    common::fixture("sdxl-reference/tiny-sdxl")
}

fn tiny_layout() -> sdxl::checkpoint::layout::ModelLayout {
    common::layout(&tiny_dir())
}

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use common::{base_configs_dir, component_file, layout};
use sdxl::checkpoint::layout::{canonical_text_key, Component};
use sdxl::lora::{delta, parse_lora, parse_lora_file, summarize, KohyaTable, Lora, LoraError, LoraFormat, LoraKind};

fn kohya() -> Lora {
    parse_lora_file(&features_dir().join("lora_kohya.safetensors"), &tiny_layout()).unwrap()
}

fn peft() -> Lora {
    parse_lora_file(&features_dir().join("lora_peft.safetensors"), &tiny_layout()).unwrap()
}

/// The tiny folder's weights as f32, by (component, canonical key).
fn tiny_weights() -> HashMap<(Component, String), Tensor> {
    let mut out = HashMap::new();
    for c in Component::ALL {
        // SAFETY: read-only mapping of a fixture nobody writes.
        let f = unsafe { MmapedSafetensors::new(component_file(&tiny_dir(), c)) }.unwrap();
        for (k, _) in f.tensors() {
            let t = f.load(&k, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            out.insert((c, canonical_text_key(&k).into_owned()), t);
        }
    }
    out
}

fn check_fits_tiny(lora: &Lora) {
    let weights = tiny_weights();
    for u in &lora.updates {
        let w = &weights[&(u.component, u.key.clone())];
        assert_eq!(u.target_shape, w.dims(), "{} `{}`", u.component, u.key);
        let d = delta(u, 0.8, DType::F16).unwrap();
        assert_eq!(d.dims(), w.dims(), "{}", u.module);
        assert_eq!(d.dtype(), DType::F16);
    }
}

#[test]
fn kohya_fixture_resolves_and_fits() {
    let lora = kohya();
    assert_eq!(lora.format, LoraFormat::Kohya);
    assert_eq!(lora.updates.len(), 278);
    check_fits_tiny(&lora);
    let s = summarize(&lora);
    assert_eq!((s.ranks.clone(), s.alphas.clone()), (vec![4], vec![2.0]));
    assert_eq!(
        s.components,
        [Component::Unet, Component::TextEncoder, Component::TextEncoder2]
    );
    assert_eq!(
        s.to_string(),
        "kohya LoRA, rank 4 (alpha 2), 278 modules (0 conv) on unet/text_encoder/text_encoder_2"
    );
    let by_module: HashMap<&str, &str> = lora
        .updates
        .iter()
        .map(|u| (u.module.as_str(), u.key.as_str()))
        .collect();
    for (module, key) in [
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        ),
        (
            "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj",
            "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj.weight",
        ),
        (
            "lora_unet_output_blocks_3_1_proj_in",
            "up_blocks.1.attentions.0.proj_in.weight",
        ),
        (
            "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_out_0",
            "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_out.0.weight",
        ),
        (
            "lora_te2_text_model_encoder_layers_2_mlp_fc2",
            "text_model.encoder.layers.2.mlp.fc2.weight",
        ),
    ] {
        assert_eq!(by_module[module], key);
    }
}

#[test]
fn peft_fixture_resolves_and_fits() {
    let lora = peft();
    assert_eq!(lora.format, LoraFormat::Peft);
    check_fits_tiny(&lora);
    let s = summarize(&lora);
    assert_eq!(s.components, [Component::Unet, Component::TextEncoder2]);
    assert_eq!(s.modules, 150);
    assert!(
        lora.updates.iter().all(|u| u.alpha == u.rank as f32),
        "no alpha in the file: alpha = rank"
    );
}

/// The `changed` list a reference file keeps in its metadata.
fn changed_weights(reference: &Path) -> BTreeSet<String> {
    let bytes = std::fs::read(reference).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let list = header["__metadata__"]["changed"].as_str().unwrap();
    list.lines().map(str::to_string).collect()
}

/// `base + Σ scale · delta` against the weights diffusers' `fuse_lora`
/// produced (scripts/make_lora_reference.py): the same weights change, and the
/// stored ones (every 6th) have the same values.
fn check_against_diffusers(loras: &[(Lora, f32)], reference: &Path) {
    let weights = tiny_weights();
    let mut merged: BTreeMap<String, Tensor> = BTreeMap::new();
    for (lora, scale) in loras {
        for u in &lora.updates {
            let name = format!("{}.{}", u.component, u.key);
            let base = merged
                .remove(&name)
                .unwrap_or_else(|| weights[&(u.component, u.key.clone())].clone());
            merged.insert(name, (base + delta(u, *scale, DType::F32).unwrap()).unwrap());
        }
    }
    let ours: BTreeSet<String> = merged.keys().cloned().collect();
    assert_eq!(
        ours,
        changed_weights(reference),
        "the weights diffusers changed are the weights we update"
    );
    let expected = candle_core::safetensors::load(reference, &Device::Cpu).unwrap();
    assert!(expected.len() > 40);
    let mut worst = 0f32;
    for (name, t) in &expected {
        let diff = (&merged[name] - t).unwrap().abs().unwrap().flatten_all().unwrap();
        worst = worst.max(diff.max(0).unwrap().to_scalar::<f32>().unwrap());
    }
    eprintln!("largest difference from diffusers' merge: {worst:e}");
    assert!(worst < 1e-6, "largest difference from diffusers' merge: {worst}");
}

#[test]
fn kohya_at_0_8_matches_diffusers_merge() {
    check_against_diffusers(
        &[(kohya(), 0.8)],
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lora-reference/lora_kohya_0.8.safetensors"),
    );
}

#[test]
fn kohya_and_peft_together_match_diffusers_merge() {
    check_against_diffusers(
        &[(kohya(), 0.8), (peft(), 0.5)],
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/lora-reference/lora_kohya_0.8_peft_0.5.safetensors"),
    );
}

fn tensors(entries: &[(&str, &[usize])]) -> HashMap<String, Tensor> {
    entries
        .iter()
        .enumerate()
        .map(|(i, (k, s))| {
            let n: usize = s.iter().product();
            let values: Vec<f32> = (0..n).map(|j| ((i * 31 + j * 7) % 13) as f32 / 13.0 - 0.5).collect();
            (k.to_string(), Tensor::from_vec(values, *s, &Device::Cpu).unwrap())
        })
        .collect()
}

#[test]
fn kohya_with_diffusers_module_names() {
    let sgm = kohya();
    let mut renamed = HashMap::new();
    for u in &sgm.updates {
        let prefix = match u.component {
            Component::Unet => "lora_unet_",
            Component::TextEncoder => "lora_te1_",
            _ => "lora_te2_",
        };
        let name = format!("{prefix}{}", u.key.trim_end_matches(".weight").replace('.', "_"));
        renamed.insert(format!("{name}.lora_down.weight"), u.down.clone());
        renamed.insert(format!("{name}.lora_up.weight"), u.up.clone());
        renamed.insert(format!("{name}.alpha"), Tensor::new(u.alpha, &Device::Cpu).unwrap());
    }
    let lora = parse_lora(renamed, &tiny_layout()).unwrap();
    let keys = |l: &Lora| {
        l.updates
            .iter()
            .map(|u| (u.component, u.key.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&lora), keys(&sgm));
    assert!(lora.updates[0]
        .module
        .starts_with("lora_unet_down_blocks_1_attentions_0"));
}

#[test]
fn locon_conv_updates() {
    let layout = tiny_layout();
    let t = tensors(&[
        (
            "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight",
            &[2, 16, 3, 3],
        ),
        ("lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight", &[16, 2, 1, 1]),
        ("lora_unet_input_blocks_3_0_op.lora_down.weight", &[2, 16, 3, 3]),
        ("lora_unet_input_blocks_3_0_op.lora_up.weight", &[16, 2, 1, 1]),
        (
            "lora_unet_output_blocks_0_0_skip_connection.lora_down.weight",
            &[2, 64, 1, 1],
        ),
        (
            "lora_unet_output_blocks_0_0_skip_connection.lora_up.weight",
            &[32, 2, 1, 1],
        ),
        ("lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight", &[2, 64]),
        ("lora_unet_input_blocks_1_0_emb_layers_1.lora_up.weight", &[16, 2]),
    ]);
    let mut t = t;
    t.insert(
        "lora_unet_input_blocks_1_0_in_layers_2.alpha".into(),
        Tensor::new(1f32, &Device::Cpu).unwrap(),
    );
    let lora = parse_lora(t.clone(), &layout).unwrap();
    let by_key: HashMap<&str, _> = lora.updates.iter().map(|u| (u.key.as_str(), u)).collect();
    let conv1 = by_key["down_blocks.0.resnets.0.conv1.weight"];
    assert_eq!(conv1.kind, LoraKind::Conv { kernel: (3, 3) });
    assert_eq!((conv1.rank, conv1.alpha), (2, 1.0));
    assert_eq!(
        by_key["down_blocks.0.downsamplers.0.conv.weight"].kind,
        LoraKind::Conv { kernel: (3, 3) }
    );
    assert_eq!(
        by_key["up_blocks.0.resnets.0.conv_shortcut.weight"].kind,
        LoraKind::Conv { kernel: (1, 1) }
    );
    assert_eq!(
        by_key["down_blocks.0.resnets.0.time_emb_proj.weight"].kind,
        LoraKind::Linear
    );
    assert_eq!(summarize(&lora).conv_modules, 3);

    // delta[o, i, y, x] = scale · alpha/rank · Σ_r up[o, r] · down[r, i, y, x]
    let d = delta(conv1, 0.5, DType::F32).unwrap();
    assert_eq!(d.dims(), &[16, 16, 3, 3]);
    let up = t["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let down = t["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got = d.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for o in 0..16 {
        for rest in 0..16 * 9 {
            let sum: f32 = (0..2).map(|r| up[o * 2 + r] * down[r * 144 + rest]).sum();
            let want = 0.5 * 1.0 / 2.0 * sum;
            assert!((got[o * 144 + rest] - want).abs() < 1e-6, "[{o}, {rest}]");
        }
    }
}

#[test]
fn legacy_diffusers_names() {
    let lora = parse_lora(
        tensors(&[
            (
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
                &[4, 32],
            ),
            (
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight",
                &[32, 4],
            ),
            (
                "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight",
                &[4, 32],
            ),
            (
                "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight",
                &[32, 4],
            ),
            (
                "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight",
                &[4, 16],
            ),
            (
                "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight",
                &[16, 4],
            ),
            (
                "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.down.weight",
                &[4, 16],
            ),
            (
                "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight",
                &[24, 4],
            ),
            // transformers ≥ 5 saves CLIPTextModel without `text_model.`.
            ("text_encoder.encoder.layers.2.mlp.fc2.lora_A.weight", &[4, 37]),
            ("text_encoder.encoder.layers.2.mlp.fc2.lora_B.weight", &[16, 4]),
        ]),
        &tiny_layout(),
    )
    .unwrap();
    let keys: Vec<String> = lora
        .updates
        .iter()
        .map(|u| format!("{} {}", u.component, u.key))
        .collect();
    assert_eq!(
        keys,
        [
            "unet down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "unet mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
            "text_encoder text_model.encoder.layers.0.self_attn.out_proj.weight",
            "text_encoder text_model.encoder.layers.2.mlp.fc2.weight",
            "text_encoder_2 text_model.encoder.layers.1.mlp.fc1.weight",
        ]
    );
    assert_eq!(lora.format, LoraFormat::Peft);
}

fn refused(entries: &[(&str, &[usize])]) -> LoraError {
    // Through a real file, as an upload would arrive.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&tensors(entries), &path).unwrap();
    parse_lora_file(&path, &tiny_layout()).unwrap_err()
}

#[test]
fn refusals_name_the_key() {
    let err = refused(&[
        ("lora_unet_input_blocks_99_1_proj_in.lora_down.weight", &[4, 32]),
        ("lora_unet_input_blocks_99_1_proj_in.lora_up.weight", &[32, 4]),
    ]);
    assert_eq!(
        err.to_string(),
        "LoRA key `lora_unet_input_blocks_99_1_proj_in.lora_down.weight` matches no layer of the model"
    );
    let err = refused(&[
        ("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", &[4, 16]),
        ("unet.down_blocks.0.attentions.0.proj_in.lora_B.weight", &[16, 4]),
    ]);
    assert!(
        matches!(err, LoraError::UnknownModule { .. }),
        "down_blocks.0 has no attentions: {err}"
    );

    let err = refused(&[
        ("lora_unet_input_blocks_4_1_proj_in.hada_w1_a", &[32, 4]),
        ("lora_unet_input_blocks_4_1_proj_in.hada_w1_b", &[4, 32]),
    ]);
    assert_eq!(
        err.to_string(),
        "LoRA key `lora_unet_input_blocks_4_1_proj_in.hada_w1_a` is LoHa (LyCORIS Hadamard product), \
         which is not supported (plain LoRA and LoCon are)"
    );
    let err = refused(&[("lora_unet_input_blocks_4_1_proj_in.lokr_w1", &[4, 4])]);
    assert!(err.to_string().contains("LoKr"), "{err}");
    let err = refused(&[
        ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", &[4, 32]),
        ("lora_unet_input_blocks_4_1_proj_in.lora_up.weight", &[32, 4]),
        ("lora_unet_input_blocks_4_1_proj_in.dora_scale", &[1, 32]),
    ]);
    assert!(err.to_string().contains("DoRA"), "{err}");
    let err = refused(&[("lora_unet_input_blocks_4_1_proj_in.on_input", &[1])]);
    assert!(err.to_string().contains("(IA)³"), "{err}");

    let err = refused(&[
        ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", &[4, 31]),
        ("lora_unet_input_blocks_4_1_proj_in.lora_up.weight", &[32, 4]),
    ]);
    assert_eq!(
        err.to_string(),
        "LoRA module `lora_unet_input_blocks_4_1_proj_in`: up [32, 4] and down [4, 31] do not fit \
         unet `down_blocks.1.attentions.0.proj_in.weight` of shape [32, 32]"
    );
    let err = refused(&[("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", &[4, 32])]);
    assert_eq!(
        err.to_string(),
        "LoRA module `lora_unet_input_blocks_4_1_proj_in` has no up weight (`lora_up` / `lora_B`)"
    );
    let err = refused(&[("something_else.weight", &[4])]);
    assert!(matches!(err, LoraError::Unrecognised { .. }), "{err}");
    // The same weight twice, under SGM and diffusers names.
    let err = refused(&[
        ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", &[4, 32]),
        ("lora_unet_input_blocks_4_1_proj_in.lora_up.weight", &[32, 4]),
        (
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight",
            &[4, 32],
        ),
        ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight", &[32, 4]),
    ]);
    assert!(matches!(err, LoraError::Duplicate { .. }), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let pt = dir.path().join("lora.pt");
    std::fs::write(&pt, b"PK\x03\x04").unwrap();
    let err = parse_lora_file(&pt, &tiny_layout()).unwrap_err();
    assert!(err.to_string().contains("pickle"), "{err}");
}

#[test]
fn kohya_names_are_unambiguous_for_sdxl_base() {
    let layout = layout(&base_configs_dir());
    let table = KohyaTable::new(&layout);
    let mut targets = BTreeSet::new();
    let mut names = 0;
    for (name, t) in table.iter() {
        assert_eq!(t.len(), 1, "`{name}` names {t:?}");
        targets.insert(t[0].clone());
        names += 1;
    }
    // Every UNet target has an SGM and a diffusers name, text-encoder ones
    // one name each (`lora_te_` aliases `lora_te1_`).
    let unet = targets.iter().filter(|(c, _)| *c == Component::Unet).count();
    let te1 = targets.iter().filter(|(c, _)| *c == Component::TextEncoder).count();
    let te2 = targets.iter().filter(|(c, _)| *c == Component::TextEncoder2).count();
    assert_eq!((te1, te2), (72, 193));
    assert_eq!(names, 2 * unet + 2 * te1 + te2);
    assert!(!table
        .lookup("lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k")
        .is_empty());
    assert!(!table.lookup("lora_unet_output_blocks_8_0_skip_connection").is_empty());
    assert!(!table.lookup("lora_te2_text_projection").is_empty());
}
