//! One rank: an OS thread that owns its device and its pipeline, and runs its
//! share of each batch of jobs (`batch.rs`). Rank 0 also assembles previews
//! and the final grids from what the others send it, and is the only one
//! that replies to the service.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::collective::{Abandon, Collective, CollectiveError};
use crate::engine::{EngineError, EngineEvent, EngineJob, EngineLora, EngineOutput};
use sdxl::lora::Lora;
use sdxl::pipeline::LoraWeights;
use sdxl::pipeline::SdxlPipeline;

#[cfg(any(test, feature = "fault-injection"))]
use super::fault::Fault;

/// One job of a batch as every rank receives it.
#[derive(Debug, Clone)]
pub struct RankPart {
    pub job: EngineJob,
    /// Images of each rank; rank r makes images `sum(counts[..r])..` of the job.
    pub counts: Vec<usize>,
    pub cancel: Arc<AtomicBool>,
}

/// One batch as every rank receives it: jobs that share one denoising loop.
#[derive(Debug, Clone)]
pub struct RankJob {
    pub seq: u64,
    pub parts: Arc<[RankPart]>,
    #[cfg(any(test, feature = "fault-injection"))]
    pub fault: Option<Fault>,
    pub reply: Sender<RankReply>,
}

/// What ranks send back while and after they work. `job` is an index into
/// the batch's parts.
#[derive(Debug)]
pub enum RankReply {
    /// From rank 0 only.
    Event { job: usize, event: EngineEvent },
    /// From rank 0 only: every image's preview of one job at `step`, to be
    /// laid out, blurred and encoded off the rank thread while it denoises on.
    PreviewTiles {
        job: usize,
        step: usize,
        total_steps: usize,
        timestep: f32,
        tiles: Vec<image::RgbImage>,
    },
    /// From rank 0 only, once per job, as soon as it is known: the job's
    /// images, or `Cancelled` at the step that saw its flag.
    Finished {
        job: usize,
        result: Result<EngineOutput, EngineError>,
    },
    /// Every rank, once per batch. An error ends every job of the batch
    /// that has no outcome yet.
    Done {
        rank: usize,
        result: Result<(), EngineError>,
    },
}

/// The steps at which previews are made: 0, `every`, `2·every`, … up to `total`.
pub fn preview_steps(every: usize, total: usize) -> Vec<usize> {
    if every == 0 {
        return Vec::new();
    }
    (0..=total).step_by(every).collect()
}

/// Where rank `rank`'s images start in the job.
pub fn first_image(counts: &[usize], rank: usize) -> usize {
    counts[..rank].iter().sum()
}

/// Shares `n` images over `world` ranks: the first `n % world` ranks get one more.
pub fn share_images(n: usize, world: usize) -> Vec<usize> {
    (0..world).map(|r| n / world + usize::from(r < n % world)).collect()
}

/// The state of one rank thread. The collective is declared first so it is
/// dropped first, while the device its communicator uses is still alive.
pub struct Rank<C: Collective> {
    pub collective: C,
    pub pipeline: SdxlPipeline,
    pub loras: LoraFiles,
    /// The most device memory a job may plan for (`None`: what is free).
    pub memory_budget: Option<u64>,
}

/// The LoRA files this rank has parsed, by id, so that a LoRA used again is
/// not read again (at most [`LoraFiles::KEEP`] of them).
#[derive(Debug, Default)]
pub struct LoraFiles {
    parsed: HashMap<String, Arc<Lora>>,
}

impl LoraFiles {
    const KEEP: usize = 16;

    /// The job's LoRAs, parsed against this rank's model.
    pub(super) fn weights(
        &mut self,
        pipeline: &SdxlPipeline,
        loras: &[EngineLora],
    ) -> Result<Vec<LoraWeights>, EngineError> {
        loras
            .iter()
            .map(|l| {
                let lora = match self.parsed.get(&l.id) {
                    Some(lora) => lora.clone(),
                    None => {
                        let lora = Arc::new(pipeline.read_lora(&l.path).map_err(model_error)?);
                        if self.parsed.len() >= Self::KEEP {
                            self.parsed.clear();
                        }
                        self.parsed.insert(l.id.clone(), lora.clone());
                        lora
                    }
                };
                Ok(LoraWeights {
                    id: l.id.clone(),
                    lora,
                    scale: l.scale,
                })
            })
            .collect()
    }
}

impl<C: Collective> Rank<C> {
    pub(super) fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// Runs the rank's share of the batch and tells the group how it went.
    pub fn run(&mut self, job: &RankJob) {
        self.collective.begin_job(job.seq);
        let result = self.work(job);
        if let Err(err) = &result {
            // Tell the other ranks before replying, so none waits for us.
            let why = match err {
                EngineError::Cancelled => Abandon::Cancelled,
                other => Abandon::Failed(other.to_string()),
            };
            self.collective.abandon(why);
        }
        let _ = job.reply.send(RankReply::Done {
            rank: self.rank(),
            result,
        });
    }
}

/// How many images one UNet call of this rank takes. On the CPU one (its
/// compute does not grow faster batched, and an image's result is then
/// exactly the one it has alone, whatever else shares the job or the
/// batch); on a GPU as many as the free memory holds, from an estimate of
/// one image's activations at this size.
pub fn unet_images(pipeline: &SdxlPipeline, width: usize, height: usize) -> usize {
    let Some(free) = super::memory::device_free(pipeline.device()) else {
        return 1;
    };
    super::memory::micro_batch(&super::memory::ImageMemory::of(pipeline, width, height), 1, free)
}

/// `n` black images (-1 in the [-1, 1] range) of `h`×`w` on the CPU.
pub(super) fn blank(n: usize, c: usize, h: usize, w: usize) -> Result<Tensor, EngineError> {
    (Tensor::zeros((n, c, h, w), candle_core::DType::F32, &Device::Cpu).map_err(tensor_error)? - 1.0)
        .map_err(tensor_error)
}

/// Pads `t` (`[k, 3, h, w]`) with black images to `slots` images, so every
/// rank sends the same shape.
pub(super) fn pad_to(t: &Tensor, slots: usize, h: usize, w: usize) -> Result<Tensor, EngineError> {
    let t = t.to_dtype(candle_core::DType::F32).map_err(tensor_error)?;
    let k = t.dim(0).map_err(tensor_error)?;
    if k == slots {
        return Ok(t);
    }
    let fill = blank(slots - k, 3, h, w)?.to_device(t.device()).map_err(tensor_error)?;
    if k == 0 {
        return Ok(fill);
    }
    Tensor::cat(&[&t, &fill], 0).map_err(tensor_error)
}

pub(super) fn model_error(e: sdxl::ModelError) -> EngineError {
    match e {
        sdxl::ModelError::Input(msg) => EngineError::Invalid(msg),
        other => EngineError::Failed(other.to_string()),
    }
}

pub(super) fn tensor_error(e: candle_core::Error) -> EngineError {
    EngineError::Failed(sdxl::without_backtrace(e).to_string())
}

pub(super) fn collective_error(e: CollectiveError, step: usize) -> EngineError {
    match e {
        CollectiveError::Cancelled => EngineError::Cancelled,
        other => EngineError::Failed(format!("{other} (at step {step})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_shared_out_evenly_in_order() {
        assert_eq!(share_images(5, 2), vec![3, 2]);
        assert_eq!(share_images(3, 3), vec![1, 1, 1]);
        assert_eq!(share_images(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(first_image(&[3, 2], 1), 3);
    }

    #[test]
    fn previews_at_step_zero_and_every_n() {
        assert_eq!(preview_steps(5, 20), vec![0, 5, 10, 15, 20]);
        assert_eq!(preview_steps(3, 4), vec![0, 3]);
        assert!(preview_steps(0, 20).is_empty());
    }
}
