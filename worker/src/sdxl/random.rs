//! Random weights for a model described only by its configs: what speed and
//! memory measurements of full-size SDXL need where the real weights cannot be
//! downloaded. Each component is built by its own constructor over a
//! [`VarMap`], so the tensors have exactly the names and shapes the loaders
//! read, with candle's default initialisations (Kaiming for linear and
//! convolution weights, ones and zeros for norms).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::clip::ClipTextModel;
use super::config::{ClipTextConfig, TinyVaeConfig, UNetConfig, VaeConfig};
use super::taesd::TinyDecoder;
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKLDecoder;
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
    build(dtype, device, |vb| AutoencoderKLDecoder::new(c, vb).map(|_| ()))
}

pub fn taesd(c: &TinyVaeConfig, dtype: DType, device: &Device) -> Result<Weights, ModelError> {
    build(dtype, device, |vb| TinyDecoder::new(c, vb).map(|_| ()))
}
