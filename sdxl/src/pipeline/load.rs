//! Building a pipeline: every component from a diffusers folder (local or
//! on the hub), or from a single-file checkpoint (the SGM layout of A1111,
//! ComfyUI and Civitai) read with the configs and tokenizers of a folder —
//! by default SDXL base's, built into the binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::model::{Adaptable, Rebuild, SdxlPipeline, WeightSource};
use crate::accel::{Accel, Precision};
use crate::checkpoint::layout::{Component, ModelLayout, VaePlan};
use crate::checkpoint::single_file::{SingleFile, SingleFileError};
use crate::clip::ClipTextModel;
use crate::config::{ClipTextConfig, ModelIndex, TinyVaeConfig, UNetConfig, VaeConfig};
use crate::scheduler::{self, SamplerKind, SchedulerConfig};
use crate::source::{HubOptions, ModelSource, SDXL_BASE_CONFIGS};
use crate::taesd::TinyDecoder;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::{AutoencoderKL, VaeTiling};
use crate::{ModelError, WeightsContext};

/// Where to load a pipeline from and how to run it.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A diffusers SDXL folder, a hub repo id, or a single-file checkpoint
    /// (`*.safetensors` in the SGM layout).
    pub model: String,
    /// For a single-file `model`: the diffusers folder or repo whose configs
    /// and tokenizers describe it (its weights are not read); `None`: SDXL
    /// base's, built in.
    pub config: Option<String>,
    /// Another VAE: a folder with `config.json` and weights, e.g. an fp16-safe
    /// one, or a single VAE file (the LDM or the diffusers layout).
    pub vae: Option<String>,
    /// A TAESD-XL folder or repo id for previews; `None` loads no preview decoder.
    pub taesd: Option<String>,
    /// Weight file variant, e.g. `fp16` for `*.fp16.safetensors`.
    pub variant: Option<String>,
    pub device: Device,
    pub dtype: DType,
    /// The CUDA fast paths to take (process-wide: installed at load).
    pub accel: Accel,
    /// FP8 for the UNet's transformer linear layers, or the run dtype.
    pub precision: Precision,
    /// How to reach the Hugging Face hub for repo ids.
    pub hub: HubOptions,
    /// When the VAE decodes in tiles.
    pub vae_tiling: VaeTiling,
}

impl LoadOptions {
    /// `model` on `device` in `dtype`, with every fast path and default hub access.
    pub fn new(model: impl Into<String>, device: Device, dtype: DType) -> Self {
        LoadOptions {
            model: model.into(),
            config: None,
            vae: None,
            taesd: None,
            variant: None,
            device,
            dtype,
            accel: Accel::ALL,
            precision: Precision::Dtype,
            hub: HubOptions::default(),
            vae_tiling: VaeTiling::Auto,
        }
    }
}

/// Whether `model` names a single checkpoint file rather than a folder or repo.
pub fn is_single_file(model: &str) -> bool {
    let path = Path::new(model);
    path.is_file() || has_extension(path, &["safetensors", "ckpt", "pt", "pth", "bin"])
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Memory-maps safetensors files, converting to `dtype` on `device` as tensors are read.
fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    component: &str,
) -> Result<VarBuilder<'static>, ModelError> {
    // SAFETY: the files are mapped read-only and not modified while the
    // pipeline exists; this is how candle loads every checkpoint.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.component(component)
}

/// The weights of one adaptable component, from wherever the model's come.
fn component_weights(
    source: &WeightSource,
    component: Component,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, ModelError> {
    match source {
        WeightSource::Folder {
            text_encoder,
            text_encoder_2,
            unet,
        } => {
            let files = match component {
                Component::TextEncoder => text_encoder,
                Component::TextEncoder2 => text_encoder_2,
                Component::Unet => unet,
                Component::Vae => {
                    return Err(ModelError::Input("the VAE is not rebuilt from the source".into()));
                }
            };
            var_builder(files, dtype, device, component.name())
        }
        WeightSource::SingleFile(file) => file
            .var_builder(component, dtype, device)
            .ok_or_else(|| ModelError::Checkpoint(format!("the checkpoint has no {} weights", component.name()))),
    }
}

/// What a component's weights pass through before the model reads them
/// (identity, or LoRA updates merged in).
pub(super) type WrapWeights<'a> =
    dyn Fn(Component, VarBuilder<'static>) -> Result<VarBuilder<'static>, ModelError> + 'a;

/// Builds both text encoders and the UNet from `rebuild`'s source, each
/// component's weights passed through `wrap`.
pub(super) fn build_adaptable(
    rebuild: &Rebuild,
    dtype: DType,
    device: &Device,
    wrap: &WrapWeights<'_>,
) -> Result<Adaptable, ModelError> {
    let weights = |c: Component| wrap(c, component_weights(&rebuild.source, c, dtype, device)?);
    Ok(Adaptable {
        text_encoder: ClipTextModel::new(&rebuild.te_config, false, weights(Component::TextEncoder)?)
            .component("text_encoder")?,
        text_encoder_2: ClipTextModel::new(&rebuild.te2_config, true, weights(Component::TextEncoder2)?)
            .component("text_encoder_2")?,
        unet: UNet2DConditionModel::new(&rebuild.unet_config, weights(Component::Unet)?)?,
    })
}

/// FP8 needs FP8 tensor cores and a half-precision run.
fn check_precision(opts: &LoadOptions) -> Result<(), ModelError> {
    if opts.precision != Precision::Fp8 {
        return Ok(());
    }
    if !matches!(opts.dtype, DType::F16 | DType::BF16) {
        return Err(ModelError::Input(format!(
            "precision fp8 runs the other layers in f16 or bf16, not {:?} (set the dtype to f16 or bf16)",
            opts.dtype
        )));
    }
    let capability = fp8_capability(&opts.device)?;
    match capability {
        Some((major, minor)) if (major, minor) >= (8, 9) => Ok(()),
        Some((major, minor)) => Err(ModelError::Input(format!(
            "precision fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); this GPU is {major}.{minor}"
        ))),
        None => Err(ModelError::Input(
            "precision fp8 runs on CUDA GPUs with FP8 tensor cores (compute capability 8.9 or newer), not on the CPU"
                .into(),
        )),
    }
}

/// The compute capability of a CUDA device; `None` for other devices.
fn fp8_capability(device: &Device) -> Result<Option<(i32, i32)>, ModelError> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as Attr;
        let ctx = cuda.cuda_stream().context().clone();
        let get = |a| {
            ctx.attribute(a)
                .map_err(|e| ModelError::Input(format!("reading the GPU's compute capability: {e}")))
        };
        return Ok(Some((
            get(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            get(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        )));
    }
    let _ = device;
    Ok(None)
}

fn single_file_error(path: &str, e: SingleFileError) -> ModelError {
    ModelError::Checkpoint(format!("{path}: {e}"))
}

impl SdxlPipeline {
    /// Loads every component; errors name the missing file, key or config value.
    pub fn load(opts: &LoadOptions) -> Result<Self, ModelError> {
        check_precision(opts)?;
        Accel {
            fp8: opts.precision == Precision::Fp8,
            ..opts.accel
        }
        .install();
        #[cfg(feature = "cuda")]
        if let Ok(cuda) = opts.device.as_cuda_device() {
            // All of a device's work runs on candle's one stream (NCCL's too),
            // so cudarc's cross-stream bookkeeping (an event recorded and
            // waited on per kernel argument) guards nothing here, costs host
            // time per launch, and cannot be recorded into a CUDA graph.
            // Safety: no second stream uses this device's tensors.
            unsafe { cuda.disable_event_tracking() };
        }
        let single = is_single_file(&opts.model);
        // Where the configs and tokenizers come from.
        let source = match (&opts.config, single) {
            (Some(config), _) => ModelSource::resolve(config, &opts.hub)?,
            (None, true) => ModelSource::Embedded(SDXL_BASE_CONFIGS),
            (None, false) => ModelSource::resolve(&opts.model, &opts.hub)?,
        };
        let index: ModelIndex = source.read_json("model_index.json")?;
        let scheduler_config: SchedulerConfig = source.read_json("scheduler/scheduler_config.json")?;
        // Fail early on a scheduler config this port cannot run.
        scheduler::build(SamplerKind::Euler, &scheduler_config, 1)?;
        let tokenizer = ClipTokenizer::load(&source, "tokenizer")?;
        let tokenizer_2 = ClipTokenizer::load(&source, "tokenizer_2")?;
        let te_config: ClipTextConfig = source.read_json("text_encoder/config.json")?;
        let te2_config: ClipTextConfig = source.read_json("text_encoder_2/config.json")?;
        let unet_config: UNetConfig = source.read_json("unet/config.json")?;
        check_added_embedding(&unet_config, &te2_config)?;
        let (vae_config, vae_weights) = match &opts.vae {
            Some(name) => Self::separate_vae(name, opts)?,
            None => (source.read_json::<VaeConfig>("vae/config.json")?, None),
        };
        // The SDXL VAE overflows in f16 (black images): diffusers decodes in f32
        // when the VAE's own config says so.
        let vae_dtype = if opts.dtype == DType::F16 && vae_config.force_upcast {
            DType::F32
        } else {
            opts.dtype
        };
        let layout = ModelLayout::new(
            &unet_config,
            opts.vae.is_none().then_some(&vae_config),
            &te_config,
            &te2_config,
        )?;
        let (source_weights, vae_vb) = if single {
            let file = SingleFile::open(Path::new(&opts.model), &layout).map_err(|e| match e {
                SingleFileError::NoVae => ModelError::Checkpoint(format!(
                    "{}: no VAE in the checkpoint (it has no `first_stage_model.*` weights): give one with --vae",
                    opts.model
                )),
                e => single_file_error(&opts.model, e),
            })?;
            let vae = match vae_weights {
                Some(w) => w.build(vae_dtype, &opts.device)?,
                None => file
                    .var_builder(Component::Vae, vae_dtype, &opts.device)
                    .ok_or_else(|| ModelError::Checkpoint(format!("{}: no VAE weights", opts.model)))?,
            };
            (WeightSource::SingleFile(Arc::new(file)), vae)
        } else {
            let variant = opts.variant.as_deref();
            let files = |folder: &str, base: &str| source.safetensors(folder, base, variant);
            let vae = match vae_weights {
                Some(w) => w.build(vae_dtype, &opts.device)?,
                None => var_builder(
                    &files("vae", "diffusion_pytorch_model")?,
                    vae_dtype,
                    &opts.device,
                    "vae",
                )?,
            };
            let weights = WeightSource::Folder {
                text_encoder: files("text_encoder", "model")?,
                text_encoder_2: files("text_encoder_2", "model")?,
                unet: files("unet", "diffusion_pytorch_model")?,
            };
            (weights, vae)
        };
        let rebuild = Rebuild {
            source: source_weights,
            te_config,
            te2_config,
            unet_config,
            layout,
        };
        let base = build_adaptable(&rebuild, opts.dtype, &opts.device, &|_, vb| Ok(vb))?;
        let vae = AutoencoderKL::new(&vae_config, vae_vb)?;
        let taesd = match &opts.taesd {
            Some(name) => {
                let taesd_source = ModelSource::resolve(name, &opts.hub)?;
                let config: TinyVaeConfig = taesd_source.read_json("config.json")?;
                let files = taesd_source.safetensors("", "diffusion_pytorch_model", None)?;
                Some(TinyDecoder::new(
                    &config,
                    var_builder(&files, opts.dtype, &opts.device, "taesd")?,
                )?)
            }
            None => None,
        };

        Ok(Self {
            tokenizer,
            tokenizer_2,
            latent_channels: rebuild.unet_config.in_channels,
            base,
            adapted: None,
            cached: None,
            merges: 0,
            rebuild,
            vae_scale_factor: 1 << vae_config.block_out_channels.len().saturating_sub(1),
            vae,
            taesd,
            scheduler_config,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            device: opts.device.clone(),
            dtype: opts.dtype,
            vae_dtype,
            vae_tiling: opts.vae_tiling,
        })
    }

    /// `--vae`: a folder or repo with `config.json` and weights, or one VAE
    /// file (its config: the model's `vae/config.json`, or SDXL base's).
    fn separate_vae(name: &str, opts: &LoadOptions) -> Result<(VaeConfig, Option<VaeWeights>), ModelError> {
        if is_single_file(name) {
            let configs = match &opts.config {
                Some(config) => ModelSource::resolve(config, &opts.hub)?,
                None if is_single_file(&opts.model) => ModelSource::Embedded(SDXL_BASE_CONFIGS),
                None => ModelSource::resolve(&opts.model, &opts.hub)?,
            };
            let config: VaeConfig = configs.read_json("vae/config.json")?;
            let plan = VaePlan::new(&config)?;
            let file = SingleFile::open_vae(Path::new(name), &plan).map_err(|e| single_file_error(name, e))?;
            return Ok((config, Some(VaeWeights::File(file))));
        }
        let vae_source = ModelSource::resolve(name, &opts.hub)?;
        let config: VaeConfig = vae_source.read_json("config.json")?;
        let files = vae_source.safetensors("", "diffusion_pytorch_model", None)?;
        Ok((config, Some(VaeWeights::Folder(files))))
    }
}

/// The weights of a `--vae`.
enum VaeWeights {
    Folder(Vec<PathBuf>),
    File(SingleFile),
}

impl VaeWeights {
    fn build(self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>, ModelError> {
        match self {
            VaeWeights::Folder(files) => var_builder(&files, dtype, device, "vae"),
            VaeWeights::File(file) => file
                .var_builder(Component::Vae, dtype, device)
                .ok_or_else(|| ModelError::Checkpoint("the VAE file has no VAE weights".into())),
        }
    }
}

/// SDXL's `_get_add_time_ids` check: six time ids times `addition_time_embed_dim`
/// plus the pooled width must be what `add_embedding` takes.
fn check_added_embedding(unet: &UNetConfig, te2: &ClipTextConfig) -> Result<(), ModelError> {
    if unet.addition_embed_type.as_deref() != Some("text_time") {
        return Err(ModelError::config(
            "unet/config.json",
            format!(
                "`addition_embed_type` = {:?}: an SDXL UNet needs \"text_time\"",
                unet.addition_embed_type
            ),
        ));
    }
    let pooled = te2.projection_dim.unwrap_or(te2.hidden_size);
    let time_dim = unet.addition_time_embed_dim.unwrap_or(0);
    let expected = unet.projection_class_embeddings_input_dim.unwrap_or(0);
    if 6 * time_dim + pooled != expected {
        return Err(ModelError::config(
            "unet/config.json",
            format!(
                "`projection_class_embeddings_input_dim` = {expected}, but 6 time ids × `addition_time_embed_dim` {time_dim} + text_encoder_2 `projection_dim` {pooled} = {}",
                6 * time_dim + pooled
            ),
        ));
    }
    Ok(())
}
