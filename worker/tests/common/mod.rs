//! What the rank-group tests share: the tiny fixture and a CPU rank group on it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device};
use sdxl::pipeline::LoadOptions;
use worker::ranks::{DeviceKind, RankGroupConfig};

/// `tests/fixtures/sdxl-reference` (the tiny SDXL and its TAESD).
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sdxl-reference")
}

/// `ranks` CPU ranks of the tiny SDXL with previews, warmed up.
pub fn tiny_group(ranks: usize, collective_timeout: Duration) -> RankGroupConfig {
    RankGroupConfig {
        memory_budget: None,
        load: LoadOptions {
            taesd: Some(fixture().join("tiny-taesdxl").display().to_string()),
            ..LoadOptions::new(
                fixture().join("tiny-sdxl").display().to_string(),
                Device::Cpu,
                DType::F32,
            )
        },
        device: DeviceKind::Cpu,
        ranks,
        collective_timeout,
        warm_up: true,
    }
}
