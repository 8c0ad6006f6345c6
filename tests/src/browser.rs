//! The browser side of the web page tests: Chromium, Node.js and
//! playwright-core (installed by `scripts/browser.sh`, run once per test
//! binary), a run of `tests/browser/web_page.mjs` against a dispatcher, and
//! what a screenshot must show to count as not blank.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context};
use image::RgbImage;

use crate::process::workspace_root;

/// The environment printed by `scripts/browser.sh`: `CHROMIUM` and `NODE`.
pub fn browser_env() -> &'static HashMap<String, String> {
    static ENV: OnceLock<HashMap<String, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let out = Command::new(workspace_root().join("scripts/browser.sh"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running scripts/browser.sh");
        assert!(out.status.success(), "scripts/browser.sh failed: {}", out.status);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

/// Runs scenario `scenario` of `web_page.mjs` against the dispatcher at
/// `base` with the environment `params` (its parameters), screenshots into
/// `out`; returns the JSON it printed.
pub async fn run_page(
    scenario: &str,
    base: &str,
    params: &[(&str, String)],
    out: &Path,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let env = browser_env();
    let node = env.get("NODE").context("browser.sh printed no NODE")?;
    let chromium = env.get("CHROMIUM").context("browser.sh printed no CHROMIUM")?;
    std::fs::create_dir_all(out)?;
    let mut cmd = tokio::process::Command::new(node);
    cmd.arg(workspace_root().join("tests/browser/web_page.mjs"))
        .args([scenario, base])
        .arg(out)
        .env("CHROMIUM", chromium)
        .envs(params.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    let output = tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| format!("web_page.mjs {scenario} did not finish within {timeout:?}"))??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "web_page.mjs {scenario} failed ({}):\n{stderr}\n{stdout}",
            output.status
        );
    }
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("web_page.mjs {scenario} printed no JSON:\n{stdout}\n{stderr}"))
}

/// The standard deviation of the luminance, 0–255: near 0 for a blank
/// (single-colour) picture.
pub fn luma_spread(image: &RgbImage) -> f64 {
    let lumas: Vec<f64> = image
        .pixels()
        .map(|p| 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]))
        .collect();
    let n = lumas.len().max(1) as f64;
    let mean = lumas.iter().sum::<f64>() / n;
    (lumas.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// The mean absolute difference per channel between `image` and the
/// window of `shot` where it matches best. An element screenshot can be a
/// pixel wider than the element (it sits at a fractional position and the
/// shot covers every pixel it touches); `None` when `shot` is smaller.
pub fn best_window_diff(shot: &RgbImage, image: &RgbImage) -> Option<f64> {
    let (w, h) = image.dimensions();
    let (sw, sh) = shot.dimensions();
    if sw < w || sh < h {
        return None;
    }
    let mut best = f64::INFINITY;
    for dy in 0..=(sh - h) {
        for dx in 0..=(sw - w) {
            let mut total = 0u64;
            for (x, y, p) in image.enumerate_pixels() {
                let q = shot.get_pixel(x + dx, y + dy);
                total += (0..3).map(|c| u64::from(p[c].abs_diff(q[c]))).sum::<u64>();
            }
            best = best.min(total as f64 / (3 * w * h).max(1) as f64);
        }
    }
    Some(best)
}

/// Where a test keeps a copy of its screenshots after its temp folder is
/// gone: `target/web-page/` (the README's screenshot is refreshed from there).
pub fn kept_screenshots_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("web-page")
}
