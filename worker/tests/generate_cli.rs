//! `worker generate` as a user runs it: the fixture prompt gives diffusers'
//! image, and bad input gets a one-line error naming the problem.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture_dir() -> PathBuf {
    match std::env::var_os("SDXL_REFERENCE_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sdxl-reference"),
    }
}

fn golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("golden.json")).unwrap()).unwrap()
}

fn model_dir() -> PathBuf {
    let dir = golden()["model_dir"].as_str().unwrap_or("tiny-sdxl").to_string();
    fixture_dir().join(dir)
}

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("worker runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The last line of stderr: the error a user sees.
fn error_line(out: &Output) -> String {
    stderr(out).lines().last().unwrap_or_default().to_string()
}

fn max_pixel_diff(a: &Path, b: &Path) -> u8 {
    let a = image::open(a).unwrap().to_rgb8();
    let b = image::open(b).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

#[test]
fn fixture_prompt_gives_the_reference_png() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    for (i, prompt) in g["prompts"].as_array().unwrap().iter().enumerate() {
        let out_png = dir.path().join(format!("out_{i}.png"));
        let (w, h, steps, cfg) = (
            g["width"].to_string(),
            g["height"].to_string(),
            g["steps"].to_string(),
            g["guidance_scale"].to_string(),
        );
        let noise = fixture_dir().join(format!("noise_{i}.safetensors"));
        let model = model_dir();
        let negative = g["negative_prompt"].as_str().unwrap_or("").to_string();
        let out = worker(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            prompt.as_str().unwrap(),
            "--negative-prompt",
            &negative,
            "--width",
            &w,
            "--height",
            &h,
            "--steps",
            &steps,
            "--guidance-scale",
            &cfg,
            "--init-noise",
            noise.to_str().unwrap(),
            "--output",
            out_png.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("stages:"), "stage timings are printed");
        let diff = max_pixel_diff(&out_png, &fixture_dir().join(format!("pipeline_out_{i}.png")));
        assert!(diff <= 1, "image {i} differs by {diff}/255");
    }
}

#[test]
fn a_seed_gives_the_same_png_twice_and_another_seed_another() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir();
    let run = |seed: &str, name: &str| {
        let path = dir.path().join(name);
        let out = worker(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red apple",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            seed,
            "--output",
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        path
    };
    let (a, b, c) = (run("7", "a.png"), run("7", "b.png"), run("8", "c.png"));
    assert_eq!(max_pixel_diff(&a, &b), 0);
    assert!(max_pixel_diff(&a, &c) > 0);
}

#[test]
fn bad_input_gets_a_one_line_error_and_a_nonzero_exit() {
    let model = model_dir();
    let model = model.to_str().unwrap();
    let noise = fixture_dir().join("noise_0.safetensors");
    // twice the fixture's width: the fixture's noise cannot fit it
    let wrong_width = (2 * golden()["width"].as_u64().unwrap()).to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", "/no/such/folder"], "/no/such/folder"),
        (
            vec!["--model", model, "--width", "100"],
            "--width 100 must be a positive multiple of 8",
        ),
        (
            vec!["--model", model, "--height", "12"],
            "--height 12 must be a positive multiple of 8",
        ),
        (vec!["--model", model, "--steps", "0"], "--steps 0 must be at least 1"),
        (
            vec![
                "--model",
                model,
                "--width",
                &wrong_width,
                "--init-noise",
                noise.to_str().unwrap(),
            ],
            "tensor `init_noise` has shape",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["generate", "--prompt", "x", "--output", "/tmp/never-written.png"];
        full.extend(args.iter());
        let out = worker(&full);
        assert!(!out.status.success(), "{args:?} should fail");
        let line = error_line(&out);
        assert!(
            line.starts_with("error: ") && line.contains(expected),
            "{args:?}: {line}"
        );
    }
}

#[test]
fn a_broken_model_folder_names_the_missing_file_or_key() {
    let src = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let copy = |dst: &Path| {
        for entry in walk(&src) {
            let rel = entry.strip_prefix(&src).unwrap();
            let target = dst.join(rel);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(&entry, &target).unwrap();
        }
    };
    let run = |dir: &Path| {
        worker(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "x",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--output",
            "/tmp/never-written.png",
        ])
    };

    let missing = tmp.path().join("missing");
    copy(&missing);
    std::fs::remove_file(missing.join("unet/config.json")).unwrap();
    let out = run(&missing);
    assert!(!out.status.success());
    assert!(error_line(&out).contains("unet/config.json"), "{}", error_line(&out));

    let malformed = tmp.path().join("malformed");
    copy(&malformed);
    std::fs::write(malformed.join("vae/config.json"), "{ not json").unwrap();
    let out = run(&malformed);
    assert!(!out.status.success());
    assert!(error_line(&out).contains("vae/config.json"), "{}", error_line(&out));

    let wrong_key = tmp.path().join("wrong_key");
    copy(&wrong_key);
    let cfg_path = wrong_key.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["timestep_spacing"] = serde_json::json!("x");
    cfg["up_block_types"][0] = serde_json::json!("SimpleCrossAttnUpBlock2D");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = run(&wrong_key);
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(
        line.contains("up_block_types") && line.contains("SimpleCrossAttnUpBlock2D"),
        "{line}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
