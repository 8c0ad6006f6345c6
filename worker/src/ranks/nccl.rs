//! GPU ranks: the host meeting of [`HostSync`] first (so no rank enters NCCL
//! unless every rank is there and none has failed), then NCCL's `all_gather`
//! on each rank's own candle stream. NCCL has no gather; all-gather of the
//! padded image batch is small next to a generation.

use std::sync::Arc;

use candle_core::{DType, Device, Storage, Tensor};
use cudarc::nccl::safe::{Comm, Id};

use super::collective::{Collective, CollectiveError, HostSync, Seat};
use crate::engine::EngineError;

/// A new NCCL unique id, made once on the host and shared by every rank.
pub fn new_id() -> Result<Id, EngineError> {
    Id::new().map_err(|e| EngineError::Failed(format!("creating the NCCL id: {e:?}")))
}

/// One rank's NCCL communicator.
#[derive(Debug)]
pub struct NcclCollective {
    seat: Seat,
    comm: Comm,
    /// The rank's candle device: its stream is the communicator's.
    device: Device,
}

fn transport(e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Transport(format!("{e:?}"))
}

impl NcclCollective {
    /// Joins the communicator of `world` ranks. Every rank must call this;
    /// the host meeting first makes a rank that failed to load fail the others
    /// instead of leaving them blocked in NCCL's init.
    pub fn new(
        sync: Arc<HostSync>,
        rank: usize,
        world: usize,
        id: Id,
        device: &Device,
    ) -> Result<Self, CollectiveError> {
        sync.meet(0, 0, rank, None)?;
        let stream = device.as_cuda_device().map_err(transport)?.cuda_stream();
        let comm = Comm::from_rank(stream, rank, world, id).map_err(transport)?;
        Ok(Self {
            seat: Seat::new(sync, rank),
            comm,
            device: device.clone(),
        })
    }
}

impl Collective for NcclCollective {
    fn seat(&self) -> &Seat {
        &self.seat
    }

    fn seat_mut(&mut self) -> &mut Seat {
        &mut self.seat
    }

    fn gather(&mut self, t: &Tensor) -> Result<Option<Vec<Tensor>>, CollectiveError> {
        self.seat.meet(None)?;
        let t = t.to_dtype(DType::F32).and_then(|t| t.contiguous()).map_err(transport)?;
        let device = self.comm.stream();
        let t = if t.device().is_cuda() {
            t
        } else {
            // a rank with no images sends host-made black tiles
            t.to_device(&self.device).map_err(transport)?
        };
        let n = t.elem_count();
        let world = self.world_size();
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            return Err(CollectiveError::Transport("expected a CUDA tensor".into()));
        };
        let src = cuda.as_cuda_slice::<f32>().map_err(transport)?;
        let src = src.slice(layout.start_offset()..layout.start_offset() + n);
        let mut recv = device.alloc_zeros::<f32>(n * world).map_err(transport)?;
        self.comm.all_gather(&src, &mut recv).map_err(transport)?;
        if self.rank() != 0 {
            device.synchronize().map_err(transport)?;
            return Ok(None);
        }
        let host: Vec<f32> = device.clone_dtoh(&recv).map_err(transport)?;
        let shape = t.dims().to_vec();
        host.chunks(n)
            .map(|chunk| Tensor::from_slice(chunk, shape.as_slice(), &Device::Cpu).map_err(transport))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}
