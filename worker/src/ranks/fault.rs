//! Faults injected into one rank of the next job, for the tests of failure
//! handling (a rank that errors as after an out-of-memory, or stalls as a
//! hung device would). Compiled only into test builds and with the
//! `fault-injection` feature, never into a release worker.

use std::time::Duration;

use crate::engine::EngineError;

/// A fault for one rank of the next job.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub rank: usize,
    /// The denoising step after which it strikes.
    pub step: usize,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// The rank fails with this error, as after an out-of-memory.
    Error(String),
    /// The rank stops answering for this long, as a hung device would.
    Stall(Duration),
}

impl Fault {
    /// What the rank does when the fault strikes.
    pub(super) fn strike(&self) -> Result<(), EngineError> {
        match &self.kind {
            FaultKind::Error(msg) => Err(EngineError::Failed(msg.clone())),
            FaultKind::Stall(d) => {
                std::thread::sleep(*d);
                Ok(())
            }
        }
    }
}
