//! Memory that never takes the node down: what a rank's share of a job
//! needs on its device, and what the rank does with that figure.
//!
//! - before the job: refuse it with a plain error when even its smallest
//!   plan (one image per UNet call, the smaller VAE decode) cannot fit
//!   ([`JobPlan::new`]), so that nothing is allocated for it;
//! - while it runs: as many images per UNet call as fit
//!   ([`JobPlan::unet_images`]), and room for the VAE decode, which the
//!   pipeline decodes whole when that fits and in tiles when not
//!   ([`JobPlan::decode_room`]);
//! - when the device runs out all the same: say so plainly, with the
//!   figures and what to lower ([`JobPlan::explain`]);
//! - after: the peak the device reached ([`PeakSampler`]).
//!
//! Free memory is what the device reports, capped by the rank group's
//! memory budget when it has one. Without either (a CPU rank without a
//! budget) nothing is checked and the VAE decodes whole.

use candle_core::Device;
use sdxl::pipeline::{DecodeMemory, SdxlPipeline, VaeTiling};

use crate::engine::EngineError;

const GIB: u64 = 1 << 30;

/// Measured on an H100 in f16: about 150 KB of activations per latent pixel
/// for one image (its two guidance rows) in one UNet call, with our kernels.
/// Twice that in f32.
const UNET_BYTES_PER_LATENT_PIXEL_F16: u64 = 150 * 1024;

/// Kept free when deciding whether a job can run at all, for what the
/// estimates leave out (allocator rounding, cuBLAS and cuDNN handles, the
/// previews, the text encoders' activations).
pub const RESERVE: u64 = GIB;

/// What the micro-batches and the choice of decode may use out of `free`:
/// 2 GiB less, and four fifths of the rest. A smaller micro-batch or a
/// tiled decode costs little, so these choices leave a wide margin; only
/// the refusal of a job ([`RESERVE`]) cuts close.
pub fn usable(free: u64) -> u64 {
    free.saturating_sub(2 * GIB) / 10 * 8
}

/// Free device memory in bytes; `None` on the CPU.
pub fn device_free(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        return cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64);
    }
    let _ = device;
    None
}

/// The device's free memory capped by `budget`; `None` when neither is known.
pub fn within_budget(device_free: Option<u64>, budget: Option<u64>) -> Option<u64> {
    match (device_free, budget) {
        (Some(free), Some(budget)) => Some(free.min(budget)),
        (free, budget) => free.or(budget),
    }
}

/// What one image of a job takes on a rank's device, estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageMemory {
    /// The UNet's activations for this image in one call (both guidance rows).
    pub unet: u64,
    /// Its VAE decode, whole and tiled.
    pub decode: DecodeMemory,
    /// What stays on the device for it until the job ends: its latents with
    /// the sampler's copies of them, its text context's cross-attention keys
    /// and values, and its decoded image three times (the decoded list,
    /// their concatenation, the copy gathered to rank 0).
    pub held: u64,
}

impl ImageMemory {
    pub fn of(pipeline: &SdxlPipeline, width: usize, height: usize) -> Self {
        let (_, c, h, w) = pipeline.latent_shape(width, height);
        let (ih, iw) = pipeline.image_size(width, height);
        let unet = (h * w) as u64 * UNET_BYTES_PER_LATENT_PIXEL_F16 * pipeline.dtype().size_in_bytes() as u64 / 2;
        ImageMemory {
            unet,
            decode: pipeline.decode_memory(width, height),
            held: (c * h * w) as u64 * 4 * 4 + pipeline.context_bytes() + (3 * ih * iw) as u64 * 4 * 3,
        }
    }

    /// The decode `tiling` can choose at the least.
    fn least_decode(&self, tiling: VaeTiling) -> (u64, bool) {
        match (tiling, self.decode.tiled) {
            (VaeTiling::Off, _) | (_, None) => (self.decode.whole, false),
            (_, Some(tiled)) => (tiled, true),
        }
    }

    /// The least `images` of these need at the peak: all of them held, and
    /// the larger of one image's UNet call and its smaller decode.
    pub fn least(&self, images: usize, tiling: VaeTiling) -> u64 {
        images as u64 * self.held + self.unet.max(self.least_decode(tiling).0)
    }
}

/// How a rank runs its share of one job within the memory it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobPlan {
    /// Images per UNet call.
    pub unet_images: usize,
    budget: Option<u64>,
    image: ImageMemory,
    images: usize,
    size: (usize, usize),
    tiling: VaeTiling,
}

impl JobPlan {
    /// The plan of `images` images of `width`×`height` (the most any rank
    /// of the job has, so that ranks with the same free memory decide
    /// alike) out of `world` ranks, with `device_free` bytes free on the
    /// device (`None`: the CPU) and the group's `budget`. A job whose
    /// smallest plan needs more than what is free is refused
    /// ([`EngineError::Failed`]: poison, it would fail again anywhere alike).
    pub fn new(
        pipeline: &SdxlPipeline,
        (width, height): (usize, usize),
        (images, world): (usize, usize),
        device_free: Option<u64>,
        budget: Option<u64>,
    ) -> Result<Self, EngineError> {
        let image = ImageMemory::of(pipeline, width, height);
        let free = within_budget(device_free, budget);
        if let Some(free) = free {
            if let Err(short) = fits(&image, images, pipeline.vae_tiling(), free) {
                return Err(EngineError::Failed(short.message(
                    (width, height),
                    world,
                    budget.is_some(),
                )));
            }
        }
        Ok(JobPlan {
            // The CPU's compute does not grow faster batched, and an image is
            // then exactly the one it is alone: one per call there.
            unet_images: match free.filter(|_| device_free.is_some()) {
                Some(free) => micro_batch(&image, images, free),
                None => 1,
            },
            budget,
            image,
            images,
            size: (width, height),
            tiling: pipeline.vae_tiling(),
        })
    }

    /// `err` of this rank's own work as the job should see it: when the
    /// device ran out of memory, a plain statement of that with the job's
    /// estimate, what is free now (its tensors dropped) and what to lower,
    /// then the device's own words; any other error as it is.
    pub fn explain(&self, err: EngineError, device: &Device) -> EngineError {
        let original = match &err {
            EngineError::Failed(m) | EngineError::Invalid(m) if is_out_of_memory(m) => m.clone(),
            _ => return err,
        };
        // Freed blocks go back to the device at a synchronisation.
        let _ = device.synchronize();
        let free = within_budget(device_free(device), self.budget).map_or("unknown".to_string(), size);
        let (width, height) = self.size;
        EngineError::Failed(format!(
            "the device ran out of memory: {} image(s) of {width}×{height} on this rank need about {} by the \
             estimate and {free} is free now; lower num_images or width and height ({original})",
            self.images,
            size(self.image.least(self.images, self.tiling)),
        ))
    }

    /// The room the VAE decode may use, given what the device reports free
    /// once the UNet is done: the pipeline decodes whole when its estimate
    /// fits in it, else in tiles (`SdxlPipeline::decode_within`).
    pub fn decode_room(&self, device_free: Option<u64>) -> Option<u64> {
        within_budget(device_free, self.budget).map(usable)
    }
}

/// How many images one UNet call takes with `free` bytes, the job's held
/// images set aside: as many as [`usable`] holds, 1 to 64.
pub fn micro_batch(image: &ImageMemory, images: usize, free: u64) -> usize {
    let room = usable(free).saturating_sub(images as u64 * image.held);
    ((room / image.unet.max(1)) as usize).clamp(1, 64)
}

/// Why a job cannot fit, with the figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub images: usize,
    pub need: u64,
    pub free: u64,
    pub unet: u64,
    pub decode: u64,
    pub tiled: bool,
    pub held: u64,
    /// How many images of this size would fit (0: not even one).
    pub fitting: usize,
    /// What one image alone needs.
    pub one: u64,
}

/// Whether `images` of `image` fit in `free` bytes with their smallest plan.
pub fn fits(image: &ImageMemory, images: usize, tiling: VaeTiling, free: u64) -> Result<(), Shortfall> {
    let need = image.least(images, tiling) + RESERVE;
    if need <= free {
        return Ok(());
    }
    let one = image.least(1, tiling) + RESERVE;
    let fitting = if one > free {
        0
    } else {
        let peak = image.unet.max(image.least_decode(tiling).0);
        ((free - RESERVE - peak) / image.held.max(1)) as usize
    };
    let (decode, tiled) = image.least_decode(tiling);
    Err(Shortfall {
        images,
        need,
        free,
        unet: image.unet,
        decode,
        tiled,
        held: images as u64 * image.held,
        fitting: fitting.min(images.saturating_sub(1)),
        one,
    })
}

impl Shortfall {
    /// The error a job gets: what it needs, what is free, what to lower.
    pub fn message(&self, (width, height): (usize, usize), world: usize, budgeted: bool) -> String {
        let lower = if self.images == 1 {
            "lower width and height".to_string()
        } else if self.fitting == 0 {
            format!(
                "lower width and height: one image of {width}×{height} alone needs {}",
                size(self.one)
            )
        } else {
            format!(
                "lower num_images to at most {} ({} on each of {world} ranks), or width and height",
                self.fitting * world,
                self.fitting
            )
        };
        format!(
            "not enough device memory: {} image(s) of {width}×{height} on this rank need about {} \
             (the UNet {} with one image per call, the VAE decode {} {}, {} held for the images, \
             and {} kept in reserve) but {} is free{}; {lower}",
            self.images,
            size(self.need),
            size(self.unet),
            size(self.decode),
            if self.tiled { "tiled" } else { "whole" },
            size(self.held),
            size(RESERVE),
            size(self.free),
            if budgeted { " within the memory budget" } else { "" },
        )
    }
}

/// Whether an error is the device running out of memory (CUDA's driver,
/// cuBLAS or cuDNN failing to allocate), by its message: that is all
/// that is left of it once it crossed the model's error types.
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out_of_memory") || m.contains("out of memory") || m.contains("alloc_failed")
}

/// Bytes as GiB (or MiB below one GiB), one decimal.
pub fn size(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    }
}

/// The most memory in use on a device while it runs, sampled every 2 ms
/// from a thread of its own (device-wide: what `nvidia-smi` counts, other
/// processes included); nothing on the CPU. Dropped without [`Self::stop`]
/// (a job that failed), the thread ends by itself.
#[derive(Debug)]
pub struct PeakSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakSampler {
    #[cfg(feature = "cuda")]
    pub fn start(device: &Device) -> Option<Self> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let ctx = device.as_cuda_device().ok()?.cuda_stream().context().clone();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let peak = std::sync::Arc::new(AtomicU64::new(0));
        let (flag, seen) = (stop.clone(), peak.clone());
        let thread = std::thread::Builder::new()
            .name("memory-peak".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((free, total)) = ctx.mem_get_info() {
                        seen.fetch_max(total.saturating_sub(free) as u64, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            })
            .ok()?;
        Some(Self {
            stop,
            peak,
            thread: Some(thread),
        })
    }

    #[cfg(not(feature = "cuda"))]
    pub fn start(device: &Device) -> Option<Self> {
        let _ = device;
        None
    }

    /// The peak so far, in bytes (the jobs of a batch end one after another).
    pub fn so_far(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The peak in bytes, also logged.
    pub fn stop(mut self) -> Option<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take()?.join().ok()?;
        let peak = self.so_far();
        tracing::info!(peak = %size(peak), "device memory in use at the peak of the job");
        Some(peak)
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2048² SDXL image in f16 with an f32 VAE, as `ImageMemory::of` gives it.
    fn sdxl_2048() -> ImageMemory {
        ImageMemory {
            unet: 256 * 256 * UNET_BYTES_PER_LATENT_PIXEL_F16,
            decode: DecodeMemory {
                whole: 15_032_385_536,
                tiled: Some(3_934_257_152),
            },
            held: 4 * 256 * 256 * 16 + 3 * 2048 * 2048 * 12,
        }
    }

    #[test]
    fn sixteen_2048_images_fit_a_24_gb_card_tiled_and_an_80_gb_one_whole() {
        let image = sdxl_2048();
        // a 24 GB card with SDXL loaded: about 16 GiB free
        let free = 16 * GIB;
        assert!(fits(&image, 16, VaeTiling::Auto, free).is_ok());
        assert_eq!(micro_batch(&image, 16, free), 1);
        assert!(image.decode.whole > usable(free), "decoded in tiles there");
        let off = fits(&image, 16, VaeTiling::Off, free).unwrap_err();
        assert!(!off.tiled && off.decode == image.decode.whole);
        // an H100 with SDXL loaded: about 72 GiB free
        let free = 72 * GIB;
        assert!(image.decode.whole <= usable(free), "decoded whole there");
        assert_eq!(micro_batch(&image, 16, free), 5);
    }

    #[test]
    fn a_job_that_cannot_fit_says_what_it_needs_and_what_to_lower() {
        let image = sdxl_2048();
        // one image alone is the UNet's 9.4 GiB plus the reserve: 8 GiB is too little
        let short = fits(&image, 4, VaeTiling::Auto, 8 * GIB).unwrap_err();
        assert_eq!(short.fitting, 0);
        let msg = short.message((2048, 2048), 2, false);
        assert!(
            msg.starts_with("not enough device memory: 4 image(s) of 2048×2048"),
            "{msg}"
        );
        assert!(msg.contains("the UNet 9.4 GiB with one image per call"), "{msg}");
        assert!(msg.contains("the VAE decode 3.7 GiB tiled"), "{msg}");
        assert!(msg.contains("but 8.0 GiB is free; lower width and height"), "{msg}");
        // with room for the peak but not for every held image: lower num_images
        let free = image.least(1, VaeTiling::Auto) + RESERVE + 3 * image.held;
        let short = fits(&image, 64, VaeTiling::Auto, free).unwrap_err();
        assert_eq!(short.fitting, 4);
        let msg = short.message((2048, 2048), 2, true);
        assert!(msg.contains("is free within the memory budget"), "{msg}");
        assert!(
            msg.ends_with("lower num_images to at most 8 (4 on each of 2 ranks), or width and height"),
            "{msg}"
        );
        assert!(fits(&image, 4, VaeTiling::Auto, free).is_ok());
        // README's example
        let short = fits(&image, 8, VaeTiling::Auto, (10.9 * GIB as f64) as u64).unwrap_err();
        assert_eq!(
            short.message((2048, 2048), 2, false),
            "not enough device memory: 8 image(s) of 2048×2048 on this rank need about 11.5 GiB (the UNet \
             9.4 GiB with one image per call, the VAE decode 3.7 GiB tiled, 1.2 GiB held for the images, and \
             1.0 GiB kept in reserve) but 10.9 GiB is free; lower num_images to at most 6 (3 on each of 2 ranks), \
             or width and height"
        );
    }

    #[test]
    fn free_memory_is_capped_by_the_budget() {
        assert_eq!(within_budget(Some(10), Some(4)), Some(4));
        assert_eq!(within_budget(Some(3), Some(4)), Some(3));
        assert_eq!(within_budget(None, Some(4)), Some(4));
        assert_eq!(within_budget(Some(10), None), Some(10));
        assert_eq!(within_budget(None, None), None);
        assert_eq!(usable(GIB), 0);
        assert_eq!(usable(12 * GIB), 8 * GIB);
    }

    #[test]
    fn running_out_of_memory_is_said_plainly_and_other_errors_pass() {
        let plan = JobPlan {
            unet_images: 1,
            budget: Some(20 * GIB),
            image: sdxl_2048(),
            images: 2,
            size: (2048, 2048),
            tiling: VaeTiling::Auto,
        };
        let oom = EngineError::Failed("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into());
        let msg = plan.explain(oom, &Device::Cpu).to_string();
        assert!(
            msg.starts_with("generation failed: the device ran out of memory: 2 image(s) of 2048×2048"),
            "{msg}"
        );
        assert!(
            msg.contains("need about 9.7 GiB by the estimate and 20.0 GiB is free now"),
            "{msg}"
        );
        assert!(
            msg.contains("lower num_images or width and height (DriverError"),
            "{msg}"
        );
        let other = plan.explain(EngineError::Failed("shape mismatch".into()), &Device::Cpu);
        assert_eq!(other.to_string(), "generation failed: shape mismatch");
        assert!(matches!(
            plan.explain(EngineError::Cancelled, &Device::Cpu),
            EngineError::Cancelled
        ));
    }

    #[test]
    fn out_of_memory_errors_are_recognised() {
        for m in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "cuBLAS: CUBLAS_STATUS_ALLOC_FAILED",
            "cuDNN forward: CUDNN_STATUS_ALLOC_FAILED",
        ] {
            assert!(is_out_of_memory(m), "{m}");
        }
        assert!(!is_out_of_memory("shape mismatch in matmul"));
        assert_eq!(size(3 * GIB / 2), "1.5 GiB");
        assert_eq!(size(512 << 20), "512.0 MiB");
    }
}
