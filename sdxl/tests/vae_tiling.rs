//! The VAE's tiled decode against diffusers' (`vae.enable_tiling()`), and
//! the pipeline's choice between a whole and a tiled decode.
//!
//! Reads `tests/fixtures/vae-tiling` (made by
//! `scripts/make_vae_tiling_reference.py`), or the folder `SDXL_TILING_DIR`
//! names: any folder of that format (other latent sizes, another VAE) must
//! pass too. Tolerance: 1e-4 absolute in f32, as for every tensor of
//! `parity.rs` (the same decode in float64 lands within 3e-6 of diffusers'
//! float32 goldens; the folder's `tiling.json` records it per case).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sdxl::config::{read_json, VaeConfig};
use sdxl::pipeline::{LoadOptions, SdxlPipeline, VaeTiling};
use sdxl::vae::{AutoencoderKL, TileSizes};
use serde::Deserialize;

const TOL: f32 = 1e-4;

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    latents: String,
    image: String,
    tiled: bool,
    decoder_calls: usize,
    tile_latent_min_size: Option<usize>,
    tile_sample_min_size: Option<usize>,
    tile_overlap_factor: Option<f64>,
    #[serde(default)]
    config_defaults: bool,
}

#[derive(Debug, Deserialize)]
struct Meta {
    vae: String,
    scale_factor: usize,
    cases: Vec<Case>,
}

struct Fixture {
    meta: Meta,
    tensors: HashMap<String, Tensor>,
    config: VaeConfig,
    vae: AutoencoderKL,
}

fn load(dir: PathBuf) -> Fixture {
    let meta: Meta = read_json(&dir.join("tiling.json")).expect("tiling.json");
    let tensors =
        candle_core::safetensors::load(dir.join("tiling.safetensors"), &Device::Cpu).expect("tiling.safetensors");
    let vae_dir = dir.join(&meta.vae);
    let config: VaeConfig = read_json(&vae_dir.join("config.json")).expect("the VAE's config");
    // SAFETY: a test fixture, not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[vae_dir.join("diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .expect("the VAE's weights");
    let vae = AutoencoderKL::new(&config, vb).expect("the VAE builds");
    Fixture {
        meta,
        tensors,
        config,
        vae,
    }
}

impl Fixture {
    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("tiling.safetensors lacks {name}"))
    }

    fn case(&self, name: &str) -> &Case {
        self.meta.cases.iter().find(|c| c.name == name).expect("the case")
    }

    fn tiles(&self, case: &Case) -> TileSizes {
        TileSizes {
            tile_latent_min_size: case.tile_latent_min_size.expect("tile_latent_min_size"),
            tile_sample_min_size: case.tile_sample_min_size.expect("tile_sample_min_size"),
            tile_overlap_factor: case.tile_overlap_factor.expect("tile_overlap_factor"),
        }
    }
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor) {
    let d = common::max_abs_diff(name, got, want);
    eprintln!("{name}: max abs diff {d:.3e}");
    assert!(d <= TOL, "{name}: max abs diff {d} > {TOL}");
}

#[test]
fn every_case_matches_diffusers() {
    let f = load(common::tiling_dir());
    assert_eq!(f.vae.scale_factor(), f.meta.scale_factor);
    assert!(f.meta.cases.iter().filter(|c| c.tiled).count() >= 2, "tiled cases");
    for case in &f.meta.cases {
        let z = f.tensor(&case.latents);
        let (_, _, h, w) = z.dims4().unwrap();
        let image = if case.tiled {
            let tiles = f.tiles(case);
            if case.config_defaults {
                assert_eq!(
                    TileSizes::from_config(&f.config),
                    tiles,
                    "{}: diffusers' defaults",
                    case.name
                );
            }
            assert!(tiles.tiles_needed(h, w), "{}: larger than one tile", case.name);
            let (rows, cols) = tiles.grid(h, w);
            assert_eq!(rows * cols, case.decoder_calls, "{}: tiles decoded", case.name);
            f.vae.tiled_decode(z, &tiles).unwrap()
        } else {
            f.vae.decode(z).unwrap()
        };
        assert_close(&case.name, &image, f.tensor(&case.image));
    }
}

#[test]
fn tiled_and_whole_decodes_differ_where_diffusers_does() {
    // The blend is what a faithful port must get right: the tiled image is
    // not the whole one, by far more than the tolerance.
    let f = load(common::tiling_dir());
    let Some(tiled) = f
        .meta
        .cases
        .iter()
        .find(|c| c.tiled && c.latents == f.case("untiled").latents)
    else {
        return;
    };
    let d = common::max_abs_diff("tiled vs whole", f.tensor(&tiled.image), f.tensor("untiled_image"));
    assert!(d > 100.0 * TOL, "tiled and whole decodes differ by only {d}");
}

fn tiny_pipeline(tiling: VaeTiling) -> SdxlPipeline {
    // The project's own fixtures: the default case was made with this VAE.
    let model = common::fixture("sdxl-reference").join("tiny-sdxl");
    SdxlPipeline::load(&LoadOptions {
        vae_tiling: tiling,
        ..LoadOptions::new(model.display().to_string(), Device::Cpu, DType::F32)
    })
    .unwrap()
}

#[test]
fn the_pipeline_decodes_in_tiles_when_told_or_short_of_memory() {
    let f = load(common::fixture("vae-tiling"));
    let case = f.case("default");
    let z = f.tensor(&case.latents);
    let (_, _, h, w) = z.dims4().unwrap();
    let (width, height) = (w * 8, h * 8);
    let latents = (z * f.config.scaling_factor).unwrap();
    let want = f.tensor(&case.image);

    let on = tiny_pipeline(VaeTiling::On);
    assert!(on.decode_tiled(width, height, None));
    assert_close("pipeline, tiling on", &on.decode(&latents).unwrap(), want);
    assert!(
        !on.decode_tiled(128, 128, None),
        "one tile: decoded whole, as diffusers does"
    );

    let auto = tiny_pipeline(VaeTiling::Auto);
    let memory = auto.decode_memory(width, height);
    let tiled = memory.tiled.expect("larger than one tile");
    assert!(tiled < memory.whole, "a tile takes less than the whole: {memory:?}");
    assert!(!auto.decode_tiled(width, height, None), "no free memory given: whole");
    assert!(!auto.decode_tiled(width, height, Some(memory.whole)), "fits: whole");
    assert!(
        auto.decode_tiled(width, height, Some(memory.whole - 1)),
        "does not fit: tiled"
    );
    assert_close(
        "pipeline, auto, short of memory",
        &auto.decode_within(&latents, Some(memory.whole - 1)).unwrap(),
        want,
    );
    let whole = auto.decode_within(&latents, Some(memory.whole)).unwrap();
    assert!(
        common::max_abs_diff("auto with room", &whole, want) > 100.0 * TOL,
        "decoded whole"
    );

    let off = tiny_pipeline(VaeTiling::Off);
    assert!(!off.decode_tiled(width, height, Some(0)));
    assert_eq!(
        common::max_abs_diff(
            "off vs auto with room",
            &off.decode_within(&latents, Some(0)).unwrap(),
            &whole
        ),
        0.0
    );
}
