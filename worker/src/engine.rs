//! The boundary between the job service (async: RabbitMQ, Redis, S3) and the
//! model side (rank threads that own devices and tensors).
//!
//! The service hands [`EngineJob`]s to an [`Engine`], one alone or several
//! as one batch ([`BatchJob`]), and receives each job's progress and preview
//! events while it runs and its outcome as soon as it is known; it never sees
//! a tensor. The engine never sees the network. This mirrors TEI's `Backend`
//! trait.

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
    /// The jobs whose images shared this job's denoising loop.
    pub batch: BatchShape,
}

/// What ran in one denoising loop: how many jobs, how many images (on
/// every rank together). A job run alone is a batch of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub jobs: usize,
    pub images: usize,
}

/// A job's outcome: its images, or why there are none.
pub type JobOutcome = Result<EngineOutput, EngineError>;

/// Why an engine job did not produce images.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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

/// One job of a batch as the engine takes it: the job, its cancel flag, where
/// its events go, and where its outcome goes.
pub struct BatchJob<'a> {
    pub job: &'a EngineJob,
    /// Checked between steps; raised, the job ends (`Cancelled`) without
    /// stopping the others.
    pub cancel: &'a Arc<AtomicBool>,
    /// The job's events, called on the thread that called the engine.
    pub events: Box<dyn FnMut(EngineEvent) + 'a>,
    /// Called once, on that thread, as soon as the job's outcome is known
    /// (a cancelled job's at the step that saw the flag, not at the end of
    /// the batch); `events` is dropped then and not called again.
    pub done: Box<dyn FnOnce(JobOutcome) + 'a>,
}

impl std::fmt::Debug for BatchJob<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchJob")
            .field("job", self.job)
            .finish_non_exhaustive()
    }
}

/// How a job starts, for [`BatchKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    Text,
    Image,
    Inpaint,
}

/// What jobs must share to run in one denoising loop: the latents' shape,
/// the sampler's schedule, guidance on or off (the UNet's batch has two
/// rows per image or one), how it starts (img2img and inpainting: the same
/// strength, hence the same first step) and the same merged weights (LoRA
/// ids and scales, in order). Prompts, seeds, guidance scales, image
/// counts, previews and input images may differ.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchKey {
    pub width: usize,
    pub height: usize,
    pub num_inference_steps: usize,
    pub scheduler: SamplerKind,
    pub guidance: bool,
    pub start: StartKind,
    /// 1 for text to image.
    pub strength: f64,
    /// `(id, scale)` of each LoRA.
    pub loras: Vec<(String, f64)>,
}

impl EngineJob {
    /// What this job must share with others to be batched with them.
    pub fn batch_key(&self) -> BatchKey {
        let start = match (&self.init_image, &self.mask) {
            (None, _) => StartKind::Text,
            (Some(_), None) => StartKind::Image,
            (Some(_), Some(_)) => StartKind::Inpaint,
        };
        BatchKey {
            width: self.width,
            height: self.height,
            num_inference_steps: self.num_inference_steps,
            scheduler: self.scheduler,
            guidance: self.guidance_scale > 1.0,
            start,
            strength: if start == StartKind::Text { 1.0 } else { self.strength },
            loras: self.loras.iter().map(|l| (l.id.clone(), l.scale)).collect(),
        }
    }
}

/// The model side of a worker: runs one batch of jobs at a time.
pub trait Engine: Send + Sync + 'static {
    /// Number of ranks (GPUs, or 1 on CPU): the default `num_images`.
    fn world_size(&self) -> usize;

    /// Runs `batch` to completion, blocking the calling thread: jobs with
    /// equal [`BatchKey`]s share one denoising loop (others run after,
    /// each group in turn), and every image is the one its job makes alone.
    /// Every job's `done` is called exactly once before this returns.
    fn generate_batch(&self, batch: Vec<BatchJob<'_>>);

    /// Runs one job to completion, blocking the calling thread. `events` is
    /// called from that thread; `cancel` is checked between steps.
    fn generate(
        &self,
        job: &EngineJob,
        events: &mut dyn FnMut(EngineEvent),
        cancel: &Arc<AtomicBool>,
    ) -> Result<EngineOutput, EngineError> {
        let mut outcome = None;
        self.generate_batch(vec![BatchJob {
            job,
            cancel,
            events: Box::new(events),
            done: Box::new(|r| outcome = Some(r)),
        }]);
        outcome.unwrap_or_else(|| Err(EngineError::Failed("the engine gave the job no outcome".into())))
    }
}

/// The groups of `batch` that can share a loop (equal [`BatchKey`]s), each
/// in the batch's order, the groups in the order of their first job.
pub fn compatible_groups<T>(batch: Vec<T>, key: impl Fn(&T) -> BatchKey) -> Vec<Vec<T>> {
    let mut groups: Vec<(BatchKey, Vec<T>)> = Vec::new();
    for item in batch {
        let k = key(&item);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, members)) => members.push(item),
            None => groups.push((k, vec![item])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_group_by_what_their_loop_must_share() {
        let a = EngineJob::text("a", 64, 64, 4, 1);
        let other_prompt_seed_guidance = EngineJob {
            guidance_scale: 7.5,
            num_images: Some(3),
            preview_every: 2,
            ..EngineJob::text("b", 64, 64, 4, 9)
        };
        let no_guidance = EngineJob {
            guidance_scale: 1.0,
            ..a.clone()
        };
        let bigger = EngineJob::text("a", 64, 128, 4, 1);
        let more_steps = EngineJob::text("a", 64, 64, 5, 1);
        let lora = EngineJob {
            loras: vec![EngineLora {
                id: "sha".into(),
                path: "x".into(),
                scale: 0.5,
            }],
            ..a.clone()
        };
        let jobs = vec![
            ("a", a.clone()),
            ("no_guidance", no_guidance),
            ("b", other_prompt_seed_guidance),
            ("bigger", bigger),
            ("more_steps", more_steps),
            ("lora", lora.clone()),
            ("a2", a.clone()),
        ];
        let groups = compatible_groups(jobs, |(_, j)| j.batch_key());
        let names: Vec<Vec<&str>> = groups.iter().map(|g| g.iter().map(|(n, _)| *n).collect()).collect();
        assert_eq!(
            names,
            vec![
                vec!["a", "b", "a2"],
                vec!["no_guidance"],
                vec!["bigger"],
                vec!["more_steps"],
                vec!["lora"]
            ]
        );
        // another scale of the same LoRA is another merge
        let mut rescaled = lora.clone();
        rescaled.loras[0].scale = 0.6;
        assert_ne!(rescaled.batch_key(), lora.batch_key());
        // a strength matters only where there is an image
        let text_strength = EngineJob {
            strength: 0.3,
            ..a.clone()
        };
        assert_eq!(text_strength.batch_key(), a.batch_key());
    }
}
