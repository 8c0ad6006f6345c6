//! The boundary between the job service (async: RabbitMQ, Redis, S3) and the
//! model side (rank threads that own devices and tensors).
//!
//! The service hands an [`EngineJob`] to an [`Engine`] and receives progress and
//! preview events while it runs; it never sees a tensor. The engine never sees
//! the network. This mirrors TEI's `Backend` trait.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use sdxl::scheduler::SamplerKind;

/// One generation as the model side sees it: already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineJob {
    pub prompt: String,
    /// `None` (or empty) means no negative prompt: zero embeddings where the
    /// model asks for them (`force_zeros_for_empty_prompt`).
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub scheduler: SamplerKind,
    /// Image `i` of the job uses seed `seed + i`: its initial noise and
    /// every other random draw come from that seed.
    pub seed: u64,
    /// `None`: one image per rank.
    pub num_images: Option<usize>,
    /// Preview every this many steps (and at step 0); 0 = no previews.
    pub preview_every: usize,
    /// img2img and inpainting: the image to start from, already decoded.
    pub init_image: Option<Arc<image::RgbImage>>,
    /// Inpainting: where to repaint (white), the size of `init_image`.
    pub mask: Option<Arc<image::GrayImage>>,
    /// How much of `init_image` to repaint (0 < strength ≤ 1).
    pub strength: f64,
    /// LoRAs, as files on this machine.
    pub loras: Vec<EngineLora>,
}

/// One LoRA of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineLora {
    /// What tells this LoRA from any other (its sha256): two jobs with the
    /// same ids and scales reuse the merged weights.
    pub id: String,
    pub path: std::path::PathBuf,
    pub scale: f64,
}

impl EngineJob {
    /// A text-to-image job of `prompt` with every other field at its default.
    pub fn text(prompt: &str, width: usize, height: usize, steps: usize, seed: u64) -> Self {
        EngineJob {
            prompt: prompt.to_string(),
            negative_prompt: None,
            width,
            height,
            num_inference_steps: steps,
            guidance_scale: 5.0,
            scheduler: SamplerKind::Euler,
            seed,
            num_images: None,
            preview_every: 0,
            init_image: None,
            mask: None,
            strength: 1.0,
            loras: Vec::new(),
        }
    }
}

/// What the engine reports while it works.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Denoising step `step` of `total_steps` is done.
    Progress { step: usize, total_steps: usize },
    /// A preview grid of every image, JPEG-encoded.
    Preview {
        step: usize,
        total_steps: usize,
        jpeg: Vec<u8>,
    },
}

/// One finished image and the seed that made it.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub seed: u64,
    pub image: image::RgbImage,
}

/// How long each stage took, for the status record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageTimings {
    pub text_encode: Duration,
    /// img2img and inpainting: encoding the input image.
    pub image_encode: Duration,
    /// The whole denoising loop, previews included.
    pub denoise: Duration,
    /// Of `denoise`: decoding, gathering and handing over previews.
    pub preview: Duration,
    pub decode: Duration,
    /// The most device memory in use while the job ran on rank 0 (bytes,
    /// device-wide, sampled); `None` on the CPU.
    pub peak_memory: Option<u64>,
}

/// A finished job: the grid (laid out as torchvision's `make_grid`) and each image.
#[derive(Debug, Clone)]
pub struct EngineOutput {
    pub grid: image::RgbImage,
    pub images: Vec<GeneratedImage>,
    pub timings: StageTimings,
}

/// Why an engine job did not produce images.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The cancel flag was raised; the job stopped between steps.
    #[error("cancelled")]
    Cancelled,
    /// The job cannot succeed as given (poison: do not retry).
    #[error("invalid job: {0}")]
    Invalid(String),
    /// The model side failed (a rank error, out of memory, a timeout).
    #[error("generation failed: {0}")]
    Failed(String),
}

/// The model side of a worker: runs one job at a time.
pub trait Engine: Send + Sync + 'static {
    /// Number of ranks (GPUs, or 1 on CPU): the default `num_images`.
    fn world_size(&self) -> usize;

    /// Runs one job to completion, blocking the calling thread. `events` is
    /// called from that thread; `cancel` is checked between steps.
    fn generate(
        &self,
        job: &EngineJob,
        events: &mut dyn FnMut(EngineEvent),
        cancel: &Arc<AtomicBool>,
    ) -> Result<EngineOutput, EngineError>;
}
