//! A rank's share of one batch: the images this rank makes of every job of
//! the batch go through one denoising loop (`SdxlPipeline::denoise_images`,
//! each image with its own prompt, guidance and draws), then each job's
//! images are decoded and gathered to rank 0, one job after the other.
//!
//! Every rank makes the same collective calls in the same order, whatever
//! it has seen of cancels: one gather at each step where some job of the
//! batch previews (each previewing job's slots in it, black where a job has
//! no image on this rank or was cancelled) and one gather per job at the
//! end. A cancel only changes what a rank computes and sends, never which
//! calls it makes; rank 0 reports a job cancelled at the step that sees its
//! flag, and the batch stops only once every job of it is cancelled.

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::collective::Collective;
use super::memory::{device_free, JobPlan, PeakSampler};
use super::rank::{
    blank, collective_error, first_image, model_error, pad_to, preview_steps, tensor_error, Rank, RankJob, RankPart,
    RankReply,
};
use crate::engine::{BatchShape, EngineError, EngineEvent, EngineJob, EngineOutput, GeneratedImage, StageTimings};
use sdxl::image_processor;
use sdxl::noise::ImageNoise;
use sdxl::pipeline::{DenoiseParams, ImageJob, Prepared, PromptEmbeds, SdxlPipeline, Source, StepState};

/// One job of the batch as this rank sees it.
struct Member<'a> {
    /// Its index in the batch (what replies name).
    index: usize,
    part: &'a RankPart,
    /// This rank's images of the job, and where they sit in the loop's batch.
    mine: usize,
    row: usize,
    /// The most images any rank has of the job: what every rank sends of
    /// it to a gather (NCCL needs one shape).
    slots: usize,
    /// The steps at which the job previews.
    previews: Vec<usize>,
    /// Seen cancelled by this rank (and, on rank 0, reported).
    cancelled: bool,
    timings: StageTimings,
}

/// Sizes every rank agrees on: `(height, width)` of an image and of a preview.
#[derive(Clone, Copy)]
struct Shapes {
    image: (usize, usize),
    preview: (usize, usize),
}

/// What the callbacks of one batch share.
struct Ctx<'a> {
    rj: &'a RankJob,
    rank: usize,
    pipeline: &'a SdxlPipeline,
    shapes: Shapes,
    /// How this rank's share of the batch fits its memory (memory.rs).
    plan: JobPlan,
    peak: Option<PeakSampler>,
}

impl Ctx<'_> {
    /// A model error as the job should see it: out of memory explained.
    fn model_error(&self, e: sdxl::ModelError) -> EngineError {
        self.plan.explain(model_error(e), self.pipeline.device())
    }

    fn reply(&self, reply: RankReply) {
        let _ = self.rj.reply.send(reply);
    }

    /// The elapsed time since `start`, once the device has done its work.
    fn sync(&self, start: Instant) -> Duration {
        let _ = self.pipeline.device().synchronize();
        start.elapsed()
    }

    /// Marks `m` cancelled once its flag is up; rank 0 reports it at once.
    fn see_cancel(&self, m: &mut Member) {
        if !m.cancelled && m.part.cancel.load(Ordering::SeqCst) {
            m.cancelled = true;
            if self.rank == 0 {
                self.reply(RankReply::Finished {
                    job: m.index,
                    result: Err(EngineError::Cancelled),
                });
            }
        }
    }

    /// [`Ctx::see_cancel`] for every job; `Cancelled` once all of them are,
    /// which ends the batch (every rank sees the same flags, so each one
    /// stops by its next step, or at its next collective call when another
    /// stopped first).
    fn see_cancels(&self, members: &mut [Member]) -> Result<(), EngineError> {
        for m in members.iter_mut() {
            self.see_cancel(m);
        }
        if members.iter().all(|m| m.cancelled) {
            Err(EngineError::Cancelled)
        } else {
            Ok(())
        }
    }
}

impl<C: Collective> Rank<C> {
    /// Runs this rank's share of `rj` (jobs with one [`BatchKey`]); rank 0
    /// reports each job's events and outcome as it goes.
    ///
    /// [`BatchKey`]: crate::engine::BatchKey
    pub(super) fn work(&mut self, rj: &RankJob) -> Result<(), EngineError> {
        // Every part agrees on what the loop shares (its batch key).
        let lead = &rj.parts[0].job;
        // The batch's LoRAs (or none) change the models every image of it uses.
        let loras = self.loras.weights(&self.pipeline, &lead.loras)?;
        self.pipeline.set_loras(&loras).map_err(model_error)?;
        let rank = self.rank();
        let pipeline = &self.pipeline;
        // Refused here, before anything is allocated for it, when even its
        // smallest plan cannot fit. Every rank plans for the most images any
        // rank has of the batch, so ranks with the same free memory agree.
        let world = lead_counts(rj).len();
        let most = (0..world)
            .map(|r| rj.parts.iter().map(|p| p.counts[r]).sum::<usize>())
            .max()
            .unwrap_or(0);
        let size = (lead.width, lead.height);
        let plan = JobPlan::new(
            pipeline,
            size,
            (most, world),
            device_free(pipeline.device()),
            self.memory_budget,
        )?;
        let params = DenoiseParams {
            width: lead.width,
            height: lead.height,
            num_inference_steps: lead.num_inference_steps,
            guidance_scale: lead.guidance_scale,
            sampler: lead.scheduler,
            unet_images: plan.unet_images,
        };
        let strength = lead.init_image.as_ref().map(|_| lead.strength);
        // What every rank counts to (img2img runs only the last steps; some
        // samplers' schedules are shorter than asked): the collectives at
        // preview steps must be the same calls on every rank.
        let steps = pipeline.steps_to_run(&params, strength).map_err(model_error)?;
        let mut row = 0;
        let mut members: Vec<Member> = rj
            .parts
            .iter()
            .enumerate()
            .map(|(index, part)| {
                let mine = part.counts[rank];
                let previews = if part.job.preview_every > 0 && pipeline.has_previews() {
                    preview_steps(part.job.preview_every, steps)
                } else {
                    Vec::new()
                };
                let m = Member {
                    index,
                    part,
                    mine,
                    row,
                    slots: part.counts.iter().copied().max().unwrap_or(0),
                    previews,
                    cancelled: false,
                    timings: StageTimings::default(),
                };
                row += mine;
                m
            })
            .collect();
        let mut rounds: Vec<usize> = members.iter().flat_map(|m| m.previews.iter().copied()).collect();
        rounds.sort_unstable();
        rounds.dedup();
        let ctx = Ctx {
            rj,
            rank,
            pipeline,
            shapes: Shapes {
                image: pipeline.image_size(lead.width, lead.height),
                preview: pipeline.preview_size(lead.width, lead.height).unwrap_or((8, 8)),
            },
            plan,
            peak: PeakSampler::start(pipeline.device()),
        };
        let collective = &mut self.collective;
        let latents = if row > 0 {
            Some(denoise(&ctx, collective, &mut members, &params, &rounds)?)
        } else {
            // A rank with no image still takes part in every collective call.
            for &step in &rounds {
                ctx.see_cancels(&mut members)?;
                let slots = members
                    .iter()
                    .filter(|m| m.previews.contains(&step))
                    .map(|m| m.slots)
                    .sum();
                let (ph, pw) = ctx.shapes.preview;
                collective
                    .gather(&blank(slots, 3, ph, pw)?)
                    .map_err(|e| collective_error(e, step))?;
            }
            None
        };
        let batch = BatchShape {
            jobs: rj.parts.len(),
            images: rj.parts.iter().map(|p| p.counts.iter().sum::<usize>()).sum(),
        };
        for m in &mut members {
            finish(&ctx, collective, m, latents.as_ref(), steps, batch)?;
        }
        if let Some(peak) = ctx.peak {
            peak.stop();
        }
        Ok(())
    }
}

/// The image counts of the batch's first job (every job has one per rank).
fn lead_counts(rj: &RankJob) -> &[usize] {
    &rj.parts[0].counts
}

/// What `job` starts from.
fn source(job: &EngineJob) -> Source<'_> {
    match (&job.init_image, &job.mask) {
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
    }
}

/// Every image this rank makes of the batch, through one loop: each job's
/// prompt encoded and its start prepared (timed per job), then the loop
/// with progress, cancels and previews between steps. The final latents.
fn denoise<C: Collective>(
    ctx: &Ctx,
    collective: &mut C,
    members: &mut [Member],
    params: &DenoiseParams,
    rounds: &[usize],
) -> Result<Tensor, EngineError> {
    let pipeline = ctx.pipeline;
    let mut embeds: Vec<(usize, PromptEmbeds, Vec<ImageNoise>)> = Vec::new();
    let mut prepared: Vec<(Prepared, usize)> = Vec::new();
    for (i, m) in members.iter_mut().enumerate().filter(|(_, m)| m.mine > 0) {
        let job = &m.part.job;
        let t = Instant::now();
        let e = pipeline
            .encode_prompt(&job.prompt, job.negative_prompt.as_deref(), params.do_cfg())
            .map_err(|e| ctx.model_error(e))?;
        m.timings.text_encode = ctx.sync(t);
        // Every draw of image i from its own seed: the same image on any
        // rank, at any batch position, in any batch.
        let first = first_image(&m.part.counts, ctx.rank);
        let noise: Vec<ImageNoise> = (first..first + m.mine)
            .map(|i| ImageNoise::from_seed(job.seed.wrapping_add(i as u64)))
            .collect();
        let t = Instant::now();
        let p = pipeline
            .prepare(&source(job), job.width, job.height, &noise)
            .map_err(|e| ctx.model_error(e))?;
        m.timings.image_encode = ctx.sync(t);
        embeds.push((i, e, noise));
        prepared.push((p, m.mine));
    }
    let images: Vec<ImageJob> = embeds
        .iter()
        .flat_map(|(i, embeds, noise)| {
            let guidance_scale = members[*i].part.job.guidance_scale;
            noise.iter().map(move |noise| ImageJob {
                embeds,
                guidance_scale,
                noise,
            })
        })
        .collect();
    let parts: Vec<(&Prepared, usize)> = prepared.iter().map(|(p, n)| (p, *n)).collect();
    let start = Prepared::join(&parts).map_err(model_error)?;

    let t = Instant::now();
    let mut failure: Option<EngineError> = None;
    let mut preview_time = vec![Duration::ZERO; members.len()];
    let latents = pipeline
        .denoise_images(&images, params, start.start(), &mut |state| match on_step(
            ctx,
            collective,
            members,
            rounds,
            state,
            &mut preview_time,
        ) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        })
        .map_err(|e| ctx.model_error(e))?;
    let denoise = ctx.sync(t);
    for (m, preview) in members.iter_mut().zip(preview_time) {
        m.timings.denoise = denoise;
        m.timings.preview = preview;
    }
    match (latents, failure) {
        (Some(l), None) => Ok(l),
        (_, Some(e)) => Err(e),
        (None, None) => Err(EngineError::Failed("denoising stopped".into())),
    }
}

/// Between two steps: each running job's progress, the injected fault,
/// cancels, and the previews of the jobs that preview at this step (one
/// gather for all of them).
fn on_step<C: Collective>(
    ctx: &Ctx,
    collective: &mut C,
    members: &mut [Member],
    rounds: &[usize],
    state: &StepState,
    preview_time: &mut [Duration],
) -> Result<(), EngineError> {
    if ctx.rank == 0 && state.step > 0 {
        for m in members.iter().filter(|m| !m.cancelled) {
            ctx.reply(RankReply::Event {
                job: m.index,
                event: EngineEvent::Progress {
                    step: state.step,
                    total_steps: state.total_steps,
                },
            });
        }
    }
    #[cfg(any(test, feature = "fault-injection"))]
    if let Some(fault) = ctx
        .rj
        .fault
        .as_ref()
        .filter(|f| f.rank == ctx.rank && f.step == state.step)
    {
        fault.strike()?;
    }
    ctx.see_cancels(members)?;
    if !rounds.contains(&state.step) {
        return Ok(());
    }
    let (ph, pw) = ctx.shapes.preview;
    let device = ctx.pipeline.device();
    let mut payload = Vec::new();
    // (member, its first slot in the payload)
    let mut at = Vec::new();
    let mut offset = 0;
    for (i, m) in members.iter().enumerate() {
        if !m.previews.contains(&state.step) {
            continue;
        }
        let t = Instant::now();
        let tiles = if m.mine > 0 && !m.cancelled {
            let latents = state.latents.narrow(0, m.row, m.mine).map_err(tensor_error)?;
            let preview = ctx
                .pipeline
                .preview(&latents)
                .map_err(model_error)?
                .ok_or_else(|| EngineError::Failed("no preview decoder".into()))?;
            pad_to(&preview, m.slots, ph, pw)?
        } else {
            on(blank(m.slots, 3, ph, pw)?, device)?
        };
        preview_time[i] += t.elapsed();
        payload.push(tiles);
        at.push((i, offset));
        offset += m.slots;
    }
    let payload = match payload.len() {
        1 => payload.pop().expect("one job's tiles"),
        _ => Tensor::cat(&payload, 0).map_err(tensor_error)?,
    };
    let t = Instant::now();
    let gathered = collective
        .gather(&payload)
        .map_err(|e| collective_error(e, state.step))?;
    if let Some(all) = gathered {
        for &(i, offset) in &at {
            let m = &members[i];
            if m.cancelled {
                continue;
            }
            let mut tiles = Vec::new();
            for (r, t) in all.iter().enumerate() {
                let rows = t.narrow(0, offset, m.part.counts[r]).map_err(tensor_error)?;
                tiles.extend(image_processor::from_signed_unit(&rows).map_err(tensor_error)?);
            }
            ctx.reply(RankReply::PreviewTiles {
                job: m.index,
                step: state.step,
                total_steps: state.total_steps,
                timestep: state.timestep,
                tiles,
            });
        }
    }
    let gather = t.elapsed();
    for &(i, _) in &at {
        preview_time[i] += gather;
    }
    Ok(())
}

/// `t` on `device` (black tiles are made on the host).
fn on(t: Tensor, device: &Device) -> Result<Tensor, EngineError> {
    t.to_device(device).map_err(tensor_error)
}

/// One job's end: its images decoded on every rank that has some (none
/// where it was cancelled), gathered to rank 0, which reports its output.
fn finish<C: Collective>(
    ctx: &Ctx,
    collective: &mut C,
    m: &mut Member,
    latents: Option<&Tensor>,
    steps: usize,
    batch: BatchShape,
) -> Result<(), EngineError> {
    ctx.see_cancel(m);
    let (ih, iw) = ctx.shapes.image;
    let decoded = match latents {
        Some(latents) if m.mine > 0 && !m.cancelled => {
            let t = Instant::now();
            let rows = latents.narrow(0, m.row, m.mine).map_err(tensor_error)?;
            // Whole when the estimate fits what is free now, else in tiles.
            let room = ctx.plan.decode_room(device_free(ctx.pipeline.device()));
            let images = ctx
                .pipeline
                .decode_within(&rows, room)
                .map_err(|e| ctx.model_error(e))?;
            m.timings.decode = ctx.sync(t);
            m.timings.peak_memory = ctx.peak.as_ref().map(PeakSampler::so_far);
            pad_to(&images, m.slots, ih, iw)?
        }
        _ => blank(m.slots, 3, ih, iw)?,
    };
    let gathered = collective.gather(&decoded).map_err(|e| collective_error(e, steps))?;
    let Some(all) = gathered else {
        return Ok(());
    };
    if m.cancelled {
        return Ok(());
    }
    let job = &m.part.job;
    let mut images = Vec::new();
    for (r, t) in all.iter().enumerate() {
        let rows = t.narrow(0, 0, m.part.counts[r]).map_err(tensor_error)?;
        let rgb = image_processor::from_signed_unit(&rows).map_err(tensor_error)?;
        let first = first_image(&m.part.counts, r);
        images.extend(rgb.into_iter().enumerate().map(|(j, image)| GeneratedImage {
            seed: job.seed.wrapping_add((first + j) as u64),
            image,
        }));
    }
    let plain: Vec<_> = images.iter().map(|g| g.image.clone()).collect();
    ctx.reply(RankReply::Finished {
        job: m.index,
        result: Ok(EngineOutput {
            grid: crate::imaging::make_grid(&plain, 2),
            images,
            timings: m.timings.clone(),
            batch,
        }),
    });
    Ok(())
}
