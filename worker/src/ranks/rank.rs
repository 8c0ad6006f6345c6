//! One rank: an OS thread that owns its device and its pipeline, and runs its
//! share of each job. Rank 0 also assembles previews and the final grid from
//! what the others send it, and is the only one that replies to the service.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::collective::{Abandon, Collective, CollectiveError};
use crate::engine::{EngineError, EngineEvent, EngineJob, EngineLora, EngineOutput, GeneratedImage, StageTimings};
use sdxl::image_processor;
use sdxl::lora::Lora;
use sdxl::noise::ImageNoise;
use sdxl::pipeline::LoraWeights;
use sdxl::pipeline::{DenoiseParams, SdxlPipeline, Source};

#[cfg(any(test, feature = "fault-injection"))]
use super::fault::Fault;

/// One job as every rank receives it.
#[derive(Debug, Clone)]
pub struct RankJob {
    pub seq: u64,
    pub job: Arc<EngineJob>,
    /// Images of each rank; rank r makes images `sum(counts[..r])..` of the job.
    pub counts: Arc<Vec<usize>>,
    pub cancel: Arc<AtomicBool>,
    #[cfg(any(test, feature = "fault-injection"))]
    pub fault: Option<Fault>,
    pub reply: Sender<RankReply>,
}

/// What ranks send back while and after they work.
#[derive(Debug)]
pub enum RankReply {
    /// From rank 0 only.
    Event(EngineEvent),
    /// From rank 0 only: every image's preview at `step`, to be laid out,
    /// blurred and encoded off the rank thread while it denoises on.
    PreviewTiles {
        step: usize,
        total_steps: usize,
        timestep: f32,
        tiles: Vec<image::RgbImage>,
    },
    /// Every rank, once per job; rank 0's carries the output.
    Done {
        rank: usize,
        result: Result<Option<EngineOutput>, EngineError>,
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
    fn weights(&mut self, pipeline: &SdxlPipeline, loras: &[EngineLora]) -> Result<Vec<LoraWeights>, EngineError> {
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
    fn rank(&self) -> usize {
        self.collective.rank()
    }

    /// Runs the rank's share of `job` and tells the group how it went.
    pub fn run(&mut self, job: &RankJob) {
        self.collective.begin_job(job.seq);
        let result = self.work(job);
        let result = match result {
            Ok(out) => Ok(out),
            Err(err) => {
                // Tell the other ranks before replying, so none waits for us.
                let why = match &err {
                    EngineError::Cancelled => Abandon::Cancelled,
                    other => Abandon::Failed(other.to_string()),
                };
                self.collective.abandon(why);
                Err(err)
            }
        };
        let _ = job.reply.send(RankReply::Done {
            rank: self.rank(),
            result,
        });
    }

    fn work(&mut self, rj: &RankJob) -> Result<Option<EngineOutput>, EngineError> {
        let job = &rj.job;
        // The job's LoRAs (or none) change the models every image of it uses.
        let loras = self.loras.weights(&self.pipeline, &job.loras)?;
        self.pipeline.set_loras(&loras).map_err(model_error)?;
        let rank = self.rank();
        let counts = &rj.counts;
        let mine = counts[rank];
        let slots = counts.iter().copied().max().unwrap_or(0);
        // Refused here, before anything is allocated for it, when even its
        // smallest plan cannot fit (memory.rs).
        let free = free_memory(self.pipeline.device());
        let size = (job.width, job.height);
        let plan = super::memory::JobPlan::new(&self.pipeline, size, (slots, counts.len()), free, self.memory_budget)?;
        let peak = super::memory::PeakSampler::start(self.pipeline.device());
        let params = DenoiseParams {
            width: job.width,
            height: job.height,
            num_inference_steps: job.num_inference_steps,
            guidance_scale: job.guidance_scale,
            sampler: job.scheduler,
            unet_images: plan.unet_images,
        };
        let pipeline = &self.pipeline;
        let device = pipeline.device().clone();
        let sync = |start: Instant| -> Duration {
            let _ = device.synchronize();
            start.elapsed()
        };
        let mut timings = StageTimings::default();
        let source = match (&job.init_image, &job.mask) {
            (Some(image), Some(mask)) => Source::Inpaint {
                image,
                mask,
                strength: job.strength,
            },
            (Some(image), None) => Source::Image {
                image,
                strength: job.strength,
            },
            _ => Source::Text,
        };
        let strength = job.init_image.as_ref().map(|_| job.strength);
        // What every rank counts to (img2img runs only the last steps; some
        // samplers' schedules are shorter than asked): the collectives at
        // preview steps must be the same calls on every rank.
        let steps = pipeline.steps_to_run(&params, strength).map_err(model_error)?;
        let previews = if job.preview_every > 0 && pipeline.has_previews() {
            preview_steps(job.preview_every, steps)
        } else {
            Vec::new()
        };
        // Every rank sends tensors of the same shape, images or not (NCCL needs it).
        let (ih, iw) = pipeline.image_size(job.width, job.height);
        let (ph, pw) = pipeline.preview_size(job.width, job.height).unwrap_or((8, 8));

        let final_images = if mine > 0 {
            let t = Instant::now();
            let embeds = pipeline
                .encode_prompt(&job.prompt, job.negative_prompt.as_deref(), params.do_cfg())
                .map_err(model_error)?;
            timings.text_encode = sync(t);
            // Every draw of image i from its own seed: the same image on any
            // rank, at any batch position.
            let first = first_image(counts, rank);
            let noise: Vec<ImageNoise> = (first..first + mine)
                .map(|i| ImageNoise::from_seed(job.seed.wrapping_add(i as u64)))
                .collect();
            let t = Instant::now();
            let prepared = pipeline
                .prepare(&source, job.width, job.height, &noise)
                .map_err(|e| plan.explain(model_error(e), &device))?;
            timings.image_encode = sync(t);

            let t = Instant::now();
            let mut failure: Option<EngineError> = None;
            let mut preview_time = Duration::ZERO;
            let collective = &mut self.collective;
            let latents = pipeline
                .denoise(&embeds, &noise, &params, prepared.start(), &mut |state| {
                    let p0 = previews.contains(&state.step).then(Instant::now);
                    let step_result = on_step(rj, collective, pipeline, &previews, (slots, ph, pw), state);
                    if let Some(p0) = p0 {
                        preview_time += p0.elapsed();
                    }
                    match step_result {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(e) => {
                            failure = Some(e);
                            ControlFlow::Break(())
                        }
                    }
                })
                .map_err(|e| plan.explain(model_error(e), &device))?;
            timings.denoise = sync(t);
            timings.preview = preview_time;
            let latents = match (latents, failure) {
                (Some(l), None) => l,
                (_, Some(e)) => return Err(e),
                (None, None) => return Err(EngineError::Failed("denoising stopped".into())),
            };
            let t = Instant::now();
            let room = plan.decode_room(free_memory(&device));
            let images = pipeline
                .decode_within(&latents, room)
                .map_err(|e| plan.explain(model_error(e), &device))?;
            timings.decode = sync(t);
            timings.peak_memory = peak.and_then(super::memory::PeakSampler::stop);
            images
        } else {
            // A rank with no image still takes part in every collective call.
            for &step in &previews {
                check_cancel(rj)?;
                self.collective
                    .gather(&blank(slots, 3, ph, pw)?)
                    .map_err(|e| collective_error(e, step))?;
            }
            blank(0, 3, ih, iw)?
        };

        let padded = pad_to(&final_images, slots, ih, iw)?;
        let gathered = self
            .collective
            .gather(&padded)
            .map_err(|e| collective_error(e, steps))?;
        let Some(all) = gathered else {
            return Ok(None);
        };
        let mut images = Vec::new();
        for (r, t) in all.iter().enumerate() {
            let rgb = image_processor::from_signed_unit(&t.narrow(0, 0, counts[r]).map_err(tensor_error)?)
                .map_err(tensor_error)?;
            let first = first_image(counts, r);
            images.extend(rgb.into_iter().enumerate().map(|(j, image)| GeneratedImage {
                seed: job.seed.wrapping_add((first + j) as u64),
                image,
            }));
        }
        let plain: Vec<_> = images.iter().map(|g| g.image.clone()).collect();
        Ok(Some(EngineOutput {
            grid: crate::imaging::make_grid(&plain, 2),
            images,
            timings,
        }))
    }
}

/// How many images one UNet call of this rank takes. On the CPU one (its
/// compute does not grow faster batched, and an image's result is then
/// exactly the one it has alone, whatever else shares the job or the
/// batch); on a GPU as many as the free memory holds, from an estimate of
/// one image's activations at this size.
pub fn unet_images(pipeline: &SdxlPipeline, width: usize, height: usize) -> usize {
    let Some(free) = free_memory(pipeline.device()) else {
        return 1;
    };
    super::memory::micro_batch(&super::memory::ImageMemory::of(pipeline, width, height), 1, free)
}

/// Free device memory in bytes; `None` on the CPU.
fn free_memory(device: &Device) -> Option<u64> {
    super::memory::device_free(device)
}

/// Between two steps: progress, the injected fault, cancel, and previews.
fn on_step<C: Collective>(
    rj: &RankJob,
    collective: &mut C,
    pipeline: &SdxlPipeline,
    previews: &[usize],
    (slots, ph, pw): (usize, usize, usize),
    state: &sdxl::pipeline::StepState,
) -> Result<(), EngineError> {
    let rank = collective.rank();
    if rank == 0 && state.step > 0 {
        let _ = rj.reply.send(RankReply::Event(EngineEvent::Progress {
            step: state.step,
            total_steps: state.total_steps,
        }));
    }
    #[cfg(any(test, feature = "fault-injection"))]
    if let Some(fault) = rj.fault.as_ref().filter(|f| f.rank == rank && f.step == state.step) {
        fault.strike()?;
    }
    check_cancel(rj)?;
    if !previews.contains(&state.step) {
        return Ok(());
    }
    let preview = pipeline
        .preview(state.latents)
        .map_err(model_error)?
        .ok_or_else(|| EngineError::Failed("no preview decoder".into()))?;
    let padded = pad_to(&preview, slots, ph, pw)?;
    let gathered = collective
        .gather(&padded)
        .map_err(|e| collective_error(e, state.step))?;
    if let Some(all) = gathered {
        let mut tiles = Vec::new();
        for (r, t) in all.iter().enumerate() {
            let n = rj.counts[r];
            tiles.extend(
                image_processor::from_signed_unit(&t.narrow(0, 0, n).map_err(tensor_error)?).map_err(tensor_error)?,
            );
        }
        let _ = rj.reply.send(RankReply::PreviewTiles {
            step: state.step,
            total_steps: state.total_steps,
            timestep: state.timestep,
            tiles,
        });
    }
    Ok(())
}

fn check_cancel(rj: &RankJob) -> Result<(), EngineError> {
    if rj.cancel.load(Ordering::SeqCst) {
        Err(EngineError::Cancelled)
    } else {
        Ok(())
    }
}

/// `n` black images (-1 in the [-1, 1] range) of `h`×`w` on the CPU.
fn blank(n: usize, c: usize, h: usize, w: usize) -> Result<Tensor, EngineError> {
    (Tensor::zeros((n, c, h, w), candle_core::DType::F32, &Device::Cpu).map_err(tensor_error)? - 1.0)
        .map_err(tensor_error)
}

/// Pads `t` (`[k, 3, h, w]`) with black images to `slots` images, so every
/// rank sends the same shape.
fn pad_to(t: &Tensor, slots: usize, h: usize, w: usize) -> Result<Tensor, EngineError> {
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

fn model_error(e: sdxl::ModelError) -> EngineError {
    match e {
        sdxl::ModelError::Input(msg) => EngineError::Invalid(msg),
        other => EngineError::Failed(other.to_string()),
    }
}

fn tensor_error(e: candle_core::Error) -> EngineError {
    EngineError::Failed(sdxl::without_backtrace(e).to_string())
}

fn collective_error(e: CollectiveError, step: usize) -> EngineError {
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
