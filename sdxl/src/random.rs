//! Random weights for a model described only by its configs: what speed and
//! memory measurements of full-size SDXL need where the real weights cannot be
//! downloaded. Each component is built by its own constructor over a
//! [`VarMap`], so the tensors have exactly the names and shapes the loaders
//! read, with candle's default initialisations (Kaiming for linear and
//! convolution weights, ones and zeros for norms).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::clip::ClipTextModel;
use super::config::{read_json, ClipTextConfig, TinyVaeConfig, UNetConfig, VaeConfig};
use super::taesd::TinyDecoder;
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKL;
use super::ModelError;

/// One component's tensors, by checkpoint key.
pub type Weights = HashMap<String, Tensor>;

/// Builds a component over fresh variables (created in f32 on `device`) and
/// returns them converted to `dtype`.
fn build<T>(
    dtype: DType,
    device: &Device,
    f: impl FnOnce(VarBuilder) -> Result<T, ModelError>,
) -> Result<Weights, ModelError> {
    let varmap = VarMap::new();
    f(VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    let vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    vars.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(dtype)?)))
        .collect()
}

pub fn clip_text(
    c: &ClipTextConfig,
    with_projection: bool,
    dtype: DType,
    device: &Device,
) -> Result<Weights, ModelError> {
    build(dtype, device, |vb| Ok(ClipTextModel::new(c, with_projection, vb)?))
}

pub fn unet(c: &UNetConfig, dtype: DType, device: &Device) -> Result<Weights, ModelError> {
    build(dtype, device, |vb| UNet2DConditionModel::new(c, vb).map(|_| ()))
}

pub fn vae(c: &VaeConfig, dtype: DType, device: &Device) -> Result<Weights, ModelError> {
    build(dtype, device, |vb| {
        // the encoder too: its first weight is what `AutoencoderKL::new` looks for
        vb.get_with_hints(
            (c.block_out_channels[0], c.in_channels, 3, 3),
            "encoder.conv_in.weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        AutoencoderKL::new(c, vb).map(|_| ())
    })
}

pub fn taesd(c: &TinyVaeConfig, dtype: DType, device: &Device) -> Result<Weights, ModelError> {
    build(dtype, device, |vb| TinyDecoder::new(c, vb).map(|_| ()))
}

/// What [`write_model`] wrote: one line per weight file.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenFile {
    pub path: std::path::PathBuf,
    pub tensors: usize,
    pub parameters: usize,
}

fn io_error(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::missing_file(path, e)
}

/// Copies a folder of configs (everything but weights) from `src` to `dst`.
fn copy_configs(src: &Path, dst: &Path) -> Result<(), ModelError> {
    std::fs::create_dir_all(dst).map_err(|e| io_error(dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| io_error(src, e))? {
        let path = entry.map_err(|e| io_error(src, e))?.path();
        let Some(name) = path.file_name() else { continue };
        let target = dst.join(name);
        if path.is_dir() {
            copy_configs(&path, &target)?;
        } else if path.extension().is_none_or(|e| e != "safetensors") {
            std::fs::copy(&path, &target).map_err(|e| io_error(&path, e))?;
        }
    }
    Ok(())
}

fn save(weights: Weights, path: &Path) -> Result<WrittenFile, ModelError> {
    let parameters = weights.values().map(|t| t.elem_count()).sum();
    let tensors = weights.len();
    candle_core::safetensors::save(&weights, path).map_err(|error| ModelError::Weights {
        component: path.display().to_string(),
        error,
    })?;
    Ok(WrittenFile {
        path: path.to_path_buf(),
        tensors,
        parameters,
    })
}

/// Writes a diffusers SDXL folder at `out` with random weights (stored as
/// `dtype`, drawn on `device`) for the configs in `configs` (a diffusers
/// folder without weights, e.g. `sdxl/configs/sdxl-base-1.0`), and a TAESD
/// beside it when the configs have a `taesdxl/` or `taesd/` folder.
pub fn write_model(configs: &Path, out: &Path, dtype: DType, device: &Device) -> Result<Vec<WrittenFile>, ModelError> {
    copy_configs(configs, out)?;
    let mut written = Vec::new();
    for (folder, projection) in [("text_encoder", false), ("text_encoder_2", true)] {
        let c: ClipTextConfig = read_json(&configs.join(folder).join("config.json"))?;
        written.push(save(
            clip_text(&c, projection, dtype, device)?,
            &out.join(folder).join("model.safetensors"),
        )?);
    }
    let c: UNetConfig = read_json(&configs.join("unet/config.json"))?;
    written.push(save(
        unet(&c, dtype, device)?,
        &out.join("unet/diffusion_pytorch_model.safetensors"),
    )?);
    let c: VaeConfig = read_json(&configs.join("vae/config.json"))?;
    written.push(save(
        vae(&c, dtype, device)?,
        &out.join("vae/diffusion_pytorch_model.safetensors"),
    )?);
    for name in ["taesdxl", "taesd"] {
        let config = configs.join(name).join("config.json");
        if config.is_file() {
            let c: TinyVaeConfig = read_json(&config)?;
            written.push(save(
                taesd(&c, dtype, device)?,
                &out.join(name).join("diffusion_pytorch_model.safetensors"),
            )?);
        }
    }
    Ok(written)
}
