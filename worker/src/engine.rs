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
    /// The whole denoising loop, previews included.
    pub denoise: Duration,
    /// Of `denoise`: decoding, gathering and handing over previews.
    pub preview: Duration,
    pub decode: Duration,
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
