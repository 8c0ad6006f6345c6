//! The `config.json` files of a diffusers SDXL folder, as serde structs.
//!
//! Every width, head count, layer count, group count and flag the models use is
//! read from here; a key that diffusers treats as optional gets diffusers' own
//! default. Values this port does not implement are rejected at load time with
//! the file, the key and the supported values, rather than silently ignored.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::path::Path;

use super::ModelError;

/// Reads and parses one JSON config file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::missing_file(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        file: path.display().to_string(),
        message: e.to_string(),
    })
}

/// A config value that diffusers accepts either as one value for every block
/// or as one value per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks; `key` names the field in errors.
    pub fn expand(&self, n: usize, file: &str, key: &str) -> Result<Vec<T>, ModelError> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(vs) if vs.len() == n => Ok(vs.clone()),
            PerBlock::Each(vs) => Err(ModelError::Config {
                file: file.to_string(),
                message: format!("`{key}` has {} entries, expected one per block ({n})", vs.len()),
            }),
        }
    }
}

/// `transformer_layers_per_block`: one count for every attention, one per
/// block, or one list per block with a count for each of its attentions.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum LayersPerBlock {
    All(usize),
    Each(Vec<PerBlock<usize>>),
}

impl LayersPerBlock {
    /// For each of `n_blocks` blocks, the value diffusers passes that block
    /// (a count, or a list of counts for each of its attentions).
    pub fn per_block(&self, n_blocks: usize, file: &str, key: &str) -> Result<Vec<PerBlock<usize>>, ModelError> {
        match self {
            LayersPerBlock::All(n) => Ok(vec![PerBlock::One(*n); n_blocks]),
            LayersPerBlock::Each(v) if v.len() == n_blocks => Ok(v.clone()),
            LayersPerBlock::Each(v) => Err(ModelError::Config {
                file: file.to_string(),
                message: format!("`{key}` has {} entries, expected one per block ({n_blocks})", v.len()),
            }),
        }
    }
}

/// `model_index.json`: which components the pipeline has.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// An empty negative prompt gives zero embeddings (SDXL base: true).
    #[serde(default)]
    pub force_zeros_for_empty_prompt: bool,
}

/// `text_encoder*/config.json` (transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Size of `text_projection` (only `CLIPTextModelWithProjection` has one).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// transformers' legacy rule: with `eos_token_id == 2` the pooled output is
    /// taken at the arg-max token id, otherwise at the first `eos_token_id`.
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: u32,
}

fn default_quick_gelu() -> String {
    "quick_gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_eos_token_id() -> u32 {
    2
}

/// `unet/config.json` (diffusers' `UNet2DConditionModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "no_per_block")]
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two_per_block")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "one_layer")]
    pub transformer_layers_per_block: LayersPerBlock,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<LayersPerBlock>,
    #[serde(default = "eight_per_block")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default = "one_f64")]
    pub resnet_out_scale_factor: f64,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default = "default_str")]
    pub attention_type: String,
}

/// `vae/config.json` (diffusers' `AutoencoderKL`).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Decode in f32 when the run dtype is f16 (the SDXL VAE overflows in f16).
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// The image size the VAE was made for; diffusers' default tile sizes of
    /// a tiled decode come from it (`vae::TileSizes::from_config`).
    #[serde(default = "default_vae_sample_size")]
    pub sample_size: SampleSize,
}

/// `sample_size`: one side, or a pair of which diffusers takes the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleSize(pub usize);

impl<'de> Deserialize<'de> for SampleSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(usize),
            Pair(Vec<usize>),
        }
        match Form::deserialize(d)? {
            Form::One(n) => Ok(SampleSize(n)),
            Form::Pair(v) => v
                .first()
                .map(|&n| SampleSize(n))
                .ok_or_else(|| serde::de::Error::custom("`sample_size` is an empty list")),
        }
    }
}

/// `config.json` of a TAESD (diffusers' `AutoencoderTiny`).
#[derive(Debug, Clone, Deserialize)]
pub struct TinyVaeConfig {
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default)]
    pub decoder_block_out_channels: Option<Vec<usize>>,
    #[serde(default)]
    pub block_out_channels: Option<Vec<usize>>,
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "relu")]
    pub act_fn: String,
    #[serde(default = "two")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "nearest")]
    pub upsample_fn: String,
    #[serde(default = "one_f64")]
    pub scaling_factor: f64,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one_f64() -> f64 {
    1.0
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
/// `AutoencoderKL`'s own default.
fn default_vae_sample_size() -> SampleSize {
    SampleSize(32)
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn no_per_block() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn one_layer() -> LayersPerBlock {
    LayersPerBlock::All(1)
}
fn two_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn eight_per_block() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn s(v: &str) -> String {
    v.to_string()
}
fn silu() -> String {
    s("silu")
}
fn relu() -> String {
    s("relu")
}
fn nearest() -> String {
    s("nearest")
}
fn default_str() -> String {
    s("default")
}
fn positional() -> String {
    s("positional")
}

/// Fails with a config error unless `value` is one of `allowed`.
pub fn expect_one_of(file: &str, key: &str, value: &str, allowed: &[&str]) -> Result<(), ModelError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(ModelError::Config {
            file: file.to_string(),
            message: format!(
                "`{key}` = {value:?} is not supported (supported: {})",
                allowed.join(", ")
            ),
        })
    }
}
