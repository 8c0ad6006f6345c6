//! `worker generate` against diffusers' golden images of the features folder
//! (`tests/fixtures/sdxl-features`, or the folder `SDXL_FEATURES_DIR` names):
//! every case of its `features.json` (each sampler, the single-file
//! checkpoint, …) run as a user runs it, with the case's random draws given
//! through `--init-noise`, must write a PNG within 2 of 255 of the golden
//! (mean difference at most 0.5).
//!
//! The model is the stage reference folder's (`tests/fixtures/sdxl-reference`
//! or `SDXL_REFERENCE_DIR`, its `golden.json` naming the model folder), or
//! the `model_dir` a features folder names itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn env_dir(var: &str, default: &str) -> PathBuf {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(default),
    }
}

fn features_dir() -> PathBuf {
    env_dir("SDXL_FEATURES_DIR", "sdxl-features")
}

fn reference_dir() -> PathBuf {
    env_dir("SDXL_REFERENCE_DIR", "sdxl-reference")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn features() -> Value {
    read_json(&features_dir().join("features.json"))
}

fn reference_golden() -> Value {
    read_json(&reference_dir().join("golden.json"))
}

/// The diffusers folder the features were made from.
fn model_dir() -> PathBuf {
    if let Some(dir) = features()["model_dir"].as_str() {
        return features_dir().join(dir);
    }
    let dir = reference_golden()["model_dir"]
        .as_str()
        .unwrap_or("tiny-sdxl")
        .to_string();
    reference_dir().join(dir)
}

fn worker(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("worker runs")
}

/// (max, mean) absolute difference of two 8-bit images of the same size.
fn pixel_diff(a: &Path, b: &Path) -> (u8, f64) {
    let a = image::open(a).unwrap().to_rgb8();
    let b = image::open(b).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes");
    let diffs: Vec<u8> = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    (max, mean)
}

fn assert_close(out: &Path, golden: &Path, what: &str) {
    let (max, mean) = pixel_diff(out, golden);
    assert!(
        max <= 2 && mean <= 0.5,
        "{what}: differs from {} by at most {max}/255, on average {mean:.3}",
        golden.display()
    );
}

fn num(v: &Value, key: &str, default: &Value) -> String {
    let x = if v[key].is_null() { &default[key] } else { &v[key] };
    assert!(x.is_number(), "`{key}` in features.json");
    x.to_string()
}

/// The flags every case shares: model, prompt, negative prompt, size, steps, guidance.
fn common_args(case: &Value, top: &Value, prompt: &str) -> Vec<String> {
    let mut args: Vec<String> = vec!["generate".into(), "--prompt".into(), prompt.into()];
    args.extend([
        "--negative-prompt".into(),
        top["negative_prompt"].as_str().unwrap_or("").into(),
    ]);
    for (flag, key) in [
        ("--width", "width"),
        ("--height", "height"),
        ("--steps", "steps"),
        ("--guidance-scale", "guidance_scale"),
    ] {
        args.extend([flag.into(), num(case, key, top)]);
    }
    args
}

fn cases_of(kind: &str) -> Vec<Value> {
    features()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == kind)
        .cloned()
        .collect()
}

#[test]
fn every_sampler_gives_diffusers_image() {
    let top = features();
    let cases = cases_of("scheduler");
    assert!(!cases.is_empty(), "the features folder has sampler cases");
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir();
    for case in &cases {
        let name = case["scheduler"].as_str().unwrap();
        for (i, prompt) in top["prompts"].as_array().unwrap().iter().enumerate() {
            let out_png = dir.path().join(format!("{name}_{i}.png"));
            let mut args = common_args(case, &top, prompt.as_str().unwrap());
            args.extend(["--model".into(), model.display().to_string()]);
            args.extend(["--scheduler".into(), name.into()]);
            let noise = features_dir().join(format!("{name}_noise_{i}.safetensors"));
            args.extend(["--init-noise".into(), noise.display().to_string()]);
            args.extend(["--output".into(), out_png.display().to_string()]);
            let out = worker(&args);
            assert!(
                out.status.success(),
                "{name} {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_close(
                &out_png,
                &features_dir().join(format!("{name}_{i}.png")),
                &format!("{name} {i}"),
            );
        }
    }
}

/// LoRAs (kohya alone, kohya and PEFT stacked), img2img (two samplers and
/// strengths) and inpainting: each case's flags from `features.json`.
#[test]
fn loras_img2img_and_inpainting_give_diffusers_images() {
    let top = features();
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir();
    let mut ran = Vec::new();
    for kind in ["lora", "img2img", "inpaint"] {
        for case in cases_of(kind) {
            let tag = case["tag"].as_str().unwrap().to_string();
            for (i, prompt) in top["prompts"].as_array().unwrap().iter().enumerate() {
                let out_png = dir.path().join(format!("{tag}_{i}.png"));
                let mut args = common_args(&case, &top, prompt.as_str().unwrap());
                args.extend(["--model".into(), model.display().to_string()]);
                if let Some(s) = case["scheduler"].as_str() {
                    args.extend(["--scheduler".into(), s.into()]);
                }
                for lora in case["loras"].as_array().into_iter().flatten() {
                    let file = features_dir().join(lora[0].as_str().unwrap());
                    args.extend(["--lora".into(), format!("{}:{}", file.display(), lora[1])]);
                }
                if let Some(input) = case["input"].as_str() {
                    // the output takes the input's size: no --width/--height
                    let at = args.iter().position(|a| a == "--width").unwrap();
                    args.drain(at..at + 4);
                    args.extend(["--image".into(), features_dir().join(input).display().to_string()]);
                    args.extend(["--strength".into(), num(&case, "strength", &top)]);
                }
                if let Some(mask) = case["mask"].as_str() {
                    args.extend(["--mask".into(), features_dir().join(mask).display().to_string()]);
                }
                let noise = features_dir().join(format!("{tag}_noise_{i}.safetensors"));
                args.extend(["--init-noise".into(), noise.display().to_string()]);
                args.extend(["--output".into(), out_png.display().to_string()]);
                let out = worker(&args);
                assert!(
                    out.status.success(),
                    "{tag} {i}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_close(
                    &out_png,
                    &features_dir().join(format!("{tag}_{i}.png")),
                    &format!("{tag} {i}"),
                );
            }
            ran.push(tag);
        }
    }
    for kind in ["lora", "img2img", "inpaint"] {
        assert!(
            !cases_of(kind).is_empty(),
            "the features folder has {kind} cases: ran {ran:?}"
        );
    }
}

/// The single-file checkpoint (SGM layout) read with the folder's configs
/// gives the folder's own images.
#[test]
fn the_single_file_checkpoint_gives_the_folders_images() {
    let cases = cases_of("single_file");
    assert!(!cases.is_empty(), "the features folder has a single-file case");
    let golden = reference_golden();
    let dir = tempfile::tempdir().unwrap();
    for case in &cases {
        let file = features_dir().join(case["file"].as_str().unwrap());
        for (i, prompt) in golden["prompts"].as_array().unwrap().iter().enumerate() {
            let out_png = dir.path().join(format!("single_{i}.png"));
            let mut args = common_args(&Value::Null, &golden, prompt.as_str().unwrap());
            args.extend(["--model".into(), file.display().to_string()]);
            args.extend(["--config".into(), model_dir().display().to_string()]);
            let noise = reference_dir().join(format!("noise_{i}.safetensors"));
            args.extend(["--init-noise".into(), noise.display().to_string()]);
            args.extend(["--output".into(), out_png.display().to_string()]);
            let out = worker(&args);
            assert!(
                out.status.success(),
                "single file {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_close(
                &out_png,
                &reference_dir().join(format!("pipeline_out_{i}.png")),
                &format!("single file {i}"),
            );
        }
    }
}

/// A file whose names or shapes do not fit the job, a pickle, and a file
/// that is not SDXL get one-line errors naming the problem.
#[test]
fn bad_noise_files_and_checkpoints_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir();
    let top = features();
    let (width, height) = (top["width"].to_string(), top["height"].to_string());
    let wrong_width = (2 * top["width"].as_u64().unwrap()).to_string();
    let run = |extra: &[String]| {
        let mut args: Vec<String> = ["generate", "--prompt", "x", "--steps", "2"].map(String::from).to_vec();
        args.extend(["--height".into(), height.clone()]);
        if !extra.iter().any(|a| a == "--width") {
            args.extend(["--width".into(), width.clone()]);
        }
        args.extend(["--output".into(), dir.path().join("never.png").display().to_string()]);
        args.extend(extra.iter().cloned());
        let out = worker(&args);
        assert!(!out.status.success(), "{extra:?} should fail");
        // from the error line on (clap lists the possible values after it)
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let at = stderr.find("error:").expect("an error line");
        stderr[at..].to_string()
    };
    let m = model.display().to_string();
    // euler takes no step noise: `step.0` is not one of its draws
    let euler_a_noise = features_dir().join("euler_a_noise_0.safetensors").display().to_string();
    let line = run(&[
        "--model".into(),
        m.clone(),
        "--init-noise".into(),
        euler_a_noise.clone(),
    ]);
    assert!(line.contains("`step.0`") && line.contains("(it takes: init)"), "{line}");
    // the right names at the wrong size
    let line = run(&[
        "--model".into(),
        m.clone(),
        "--width".into(),
        wrong_width.clone(),
        "--scheduler".into(),
        "euler_a".into(),
        "--init-noise".into(),
        euler_a_noise,
    ]);
    assert!(
        line.contains("has shape") && line.contains(&format!("for {wrong_width}x{height}")),
        "{line}"
    );
    // an unknown sampler lists the allowed ones
    let line = run(&["--model".into(), m.clone(), "--scheduler".into(), "heun".into()]);
    assert!(line.contains("heun") && line.contains("dpmpp_2m_karras"), "{line}");
    // a pickle checkpoint is refused unopened, saying why
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"\x80\x02}q\x00.").unwrap();
    let line = run(&["--model".into(), ckpt.display().to_string()]);
    assert!(line.contains("pickle") && line.contains("safetensors"), "{line}");
    // a LoRA is not a checkpoint
    let lora = features_dir().join("lora_kohya.safetensors").display().to_string();
    let line = run(&["--model".into(), lora, "--config".into(), m.clone()]);
    assert!(line.contains("not an SDXL checkpoint"), "{line}");
    // a single file without a VAE needs --vae
    let no_vae = dir.path().join("no-vae.safetensors");
    let single = features_dir().join("tiny-sdxl-single.safetensors");
    let tensors = candle_core::safetensors::load(&single, &candle_core::Device::Cpu).unwrap();
    let kept: std::collections::HashMap<_, _> = tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("first_stage_model."))
        .collect();
    candle_core::safetensors::save(&kept, &no_vae).unwrap();
    let line = run(&[
        "--model".into(),
        no_vae.display().to_string(),
        "--config".into(),
        m.clone(),
    ]);
    assert!(line.contains("no VAE") && line.contains("--vae"), "{line}");
    // img2img: a strength that runs no step, and a mask of another size
    let input = features_dir().join("img2img_input.png").display().to_string();
    let line = run(&[
        "--model".into(),
        m.clone(),
        "--image".into(),
        input.clone(),
        "--strength".into(),
        "0.2".into(),
    ]);
    assert!(line.contains("--strength 0.2") && line.contains("0 steps"), "{line}");
    let small_mask = dir.path().join("mask.png");
    image::GrayImage::new(64, 64).save(&small_mask).unwrap();
    let line = run(&[
        "--model".into(),
        m.clone(),
        "--image".into(),
        input,
        "--mask".into(),
        small_mask.display().to_string(),
    ]);
    assert!(line.contains("64x64") && line.contains("same size"), "{line}");
    // a LoRA key that matches no layer of the model is refused, naming it
    let bad_lora = dir.path().join("bad-lora.safetensors");
    let t = candle_core::Tensor::zeros((4, 8), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let tensors = std::collections::HashMap::from([
        ("lora_unet_no_such_layer.lora_down.weight".to_string(), t.clone()),
        (
            "lora_unet_no_such_layer.lora_up.weight".to_string(),
            t.t().unwrap().contiguous().unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&tensors, &bad_lora).unwrap();
    let line = run(&["--model".into(), m, "--lora".into(), bad_lora.display().to_string()]);
    assert!(line.contains("lora_unet_no_such_layer"), "{line}");
}
