//! CUDA graphs for a fixed-shape forward pass (the UNet's once per step, the
//! TAESD preview decode's, the text encoders'): the UNet's ~1,250 kernel
//! launches recorded once and replayed with one launch,
//! so the host's per-launch cost (argument packing, driver calls) stops
//! leaving the GPU idle between kernels. `torch.compile(mode="reduce-overhead")`
//! does the same for diffusers' best recipe.
//!
//! A [`Graphs`] records a graph per input shape and keeps the latest: the
//! first call with a shape runs eagerly (a warm-up: cuDNN and cuBLASLt pick their algorithms, modules
//! load, nothing inside may synchronize with the host later); the second
//! copies the inputs into buffers of its own and records the forward on the
//! device's stream; every later call copies the new inputs into those
//! buffers, replays, and returns a copy of the output. An input that is the
//! very tensor (by [`Tensor::id`]) its buffer was last filled from is not
//! copied again — the UNet's context keys and values, the same at every step
//! of a loop — so a graph's inputs must not be written in place between
//! calls (candle's tensors are not, outside in-place kernels on fresh results). The recorded kernels
//! read the model's weights and write memory the graph allocated, so a graph
//! lives exactly as long as the model that owns its [`Graphs`]. Only the
//! latest shape's graph is kept, since each holds the memory of a forward's
//! activations: a job's steps share one shape, and a new shape drops the
//! previous graph, handing its memory back, when it records its own.
//!
//! A forward that cannot be recorded (an operation that synchronizes with
//! the host, say) ends the capture with an error and runs eagerly instead;
//! the next call records again, and after a second failure that shape runs
//! eagerly for good, with a warning.
//!
//! Host data a kernel reads must not be copied inside the graph: a recorded
//! copy would read the host buffer again at every replay, long after it was
//! freed. candle uploads the dims and strides of every strided operation
//! (a broadcast add, a strided copy) that way, so the warm-up and the
//! recording run under candle's upload cache
//! (`CudaDevice::enable_cuda_graph_htod_cache`): the warm-up uploads each
//! such small vector once and keeps it, keyed by its bytes, and the
//! recording reuses those device copies (a vector the warm-up did not see
//! fails the recording, which then falls back as above). The cache is the
//! thread's: a shape's warm-up and recording run on one thread (a rank's),
//! and the eager run after a failed recording fills this thread's cache,
//! so the retry finds what the first attempt missed.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::cuda_backend::DeviceId;
use candle_core::{DType, Device, Result, Tensor, TensorId};

/// The shapes and dtypes of a call's inputs, and the device they are on.
type Key = (Vec<(Vec<usize>, DType)>, DeviceId);

enum Entry {
    /// Ran eagerly (after `failures` failed recordings): the next call records.
    WarmedUp {
        failures: u8,
    },
    Ready(Recorded),
    /// Recording failed [`MAX_FAILURES`] times; runs eagerly.
    Eager,
}

/// Failed recordings of one shape before it runs eagerly for good.
const MAX_FAILURES: u8 = 2;

struct Recorded {
    graph: CudaGraph,
    inputs: Vec<Tensor>,
    /// The tensor each input buffer holds a copy of.
    copied: Vec<TensorId>,
    output: Tensor,
}

// A recorded graph is only launched under the `Graphs` mutex, and its
// buffers are candle tensors (Send + Sync); cudarc leaves `CudaGraph`
// !Send only because the driver does not synchronize graph objects itself.
unsafe impl Send for Recorded {}

/// The graphs of one model, one per input shape.
#[derive(Default)]
pub struct Graphs {
    entries: Mutex<HashMap<Key, Entry>>,
}

impl std::fmt::Debug for Graphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map(|e| e.len()).unwrap_or(0);
        write!(f, "Graphs({n} shapes)")
    }
}

impl Graphs {
    /// How many shapes have a recorded graph (at most one).
    pub fn recorded(&self) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.values().filter(|e| matches!(e, Entry::Ready(_))).count()
    }

    /// `forward(inputs)`, through a graph recorded for these inputs' shapes
    /// (see the module docs) where the inputs are on a CUDA device and the
    /// `graphs` path is on; else `forward` itself. `forward` must be a pure
    /// function of its inputs and the model's weights, and launch its work on
    /// the device's stream only.
    pub fn run(&self, inputs: &[&Tensor], forward: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
        let owned = || inputs.iter().map(|t| (*t).clone()).collect::<Vec<_>>();
        let Device::Cuda(dev) = inputs[0].device() else {
            return forward(&owned());
        };
        if !crate::accel::Accel::current().graphs {
            return forward(&owned());
        }
        // every forward from here (warm-up, recording, eager fallback) keeps
        // candle's small uploads on the device: see the module docs
        let _uploads = dev.enable_cuda_graph_htod_cache();
        let key: Key = (
            inputs.iter().map(|t| (t.dims().to_vec(), t.dtype())).collect(),
            dev.id(),
        );
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get_mut(&key) {
            None => {
                entries.insert(key, Entry::WarmedUp { failures: 0 });
                drop(entries);
                forward(&owned())
            }
            Some(Entry::Eager) => {
                drop(entries);
                forward(&owned())
            }
            Some(Entry::Ready(recorded)) => {
                for ((buffer, copied), input) in recorded.inputs.iter().zip(&mut recorded.copied).zip(inputs) {
                    if *copied != input.id() {
                        buffer.slice_set(&input.contiguous()?, 0, 0)?;
                        *copied = input.id();
                    }
                }
                recorded.graph.launch().map_err(candle_core::Error::wrap)?;
                recorded.output.copy()
            }
            Some(&mut Entry::WarmedUp { failures }) => {
                let buffer = |t: &Tensor| -> Result<Tensor> {
                    let b = t.zeros_like()?;
                    b.slice_set(&t.contiguous()?, 0, 0)?;
                    Ok(b)
                };
                let buffers = inputs.iter().map(|t| buffer(t)).collect::<Result<Vec<_>>>()?;
                let stream = dev.cuda_stream();
                stream
                    .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(candle_core::Error::wrap)?;
                let output = forward(&buffers);
                // the capture ends whatever happened, so the stream is usable again
                let graph =
                    stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
                match (output, graph) {
                    (Ok(output), Ok(Some(graph))) => {
                        graph.launch().map_err(candle_core::Error::wrap)?;
                        let result = output.copy()?;
                        // one graph at a time: the previous shape's goes, with its memory
                        let mut dropped = false;
                        for entry in entries.values_mut() {
                            if matches!(entry, Entry::Ready(_)) {
                                *entry = Entry::WarmedUp { failures: 0 };
                                dropped = true;
                            }
                        }
                        if dropped {
                            trim(&stream);
                        }
                        entries.insert(
                            key,
                            Entry::Ready(Recorded {
                                graph,
                                inputs: buffers,
                                copied: inputs.iter().map(|t| t.id()).collect(),
                                output,
                            }),
                        );
                        Ok(result)
                    }
                    (output, graph) => {
                        let why = match (output, graph) {
                            (Err(e), _) => e.to_string(),
                            (_, Err(e)) => e.to_string(),
                            _ => "the capture recorded nothing".to_string(),
                        };
                        let failures = failures + 1;
                        if failures < MAX_FAILURES {
                            tracing::debug!("CUDA graph capture failed ({why}); recording again next call");
                            entries.insert(key, Entry::WarmedUp { failures });
                        } else {
                            tracing::warn!("CUDA graph capture failed ({why}); this shape runs launch by launch");
                            entries.insert(key, Entry::Eager);
                        }
                        drop(entries);
                        forward(&owned())
                    }
                }
            }
        }
    }
}

/// Hands the memory of dropped graphs back to the device (graph allocations
/// live in a pool of their own until trimmed).
fn trim(stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    // Safety: the device handle is the stream's context's, alive while the stream is.
    let result = unsafe { sys::cuDeviceGraphMemTrim(stream.context().cu_device()) };
    if result != sys::CUresult::CUDA_SUCCESS {
        tracing::debug!("cuDeviceGraphMemTrim: {result:?}");
    }
}
