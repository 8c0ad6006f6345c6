//! What a submit must pass before it is validated and queued, so that no
//! client can flood the GPUs: a per-key rate limit (`429` with
//! `Retry-After`) and a cap on the queue's depth (`503` while more jobs wait
//! than the cap).
//!
//! The rate limit is shared by every dispatcher on one Redis prefix (GCRA in
//! one Lua script, `common::rate_limit`): a key gets the same rate from two
//! dispatchers behind a load balancer as from one. When Redis does not
//! answer, the submit is let through with a warning: it then fails on
//! writing its `queued` record anyway (503), and refusing it as rate limited
//! would give the client a wrong reason and a wrong wait.
//!
//! The queue cap is per process: the depth is read from RabbitMQ every
//! [`DEPTH_POLL`] by a background task, not on every submit (a passive
//! declare per request would cost a round trip), so the cap can be
//! overshot by what arrives within one poll (per dispatcher).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::queue;
use common::rate_limit::{Gcra, SharedRateLimit};
use common::status_store::StatusStore;
use common::Names;

/// How often the dispatcher reads the queue's depth.
pub const DEPTH_POLL: Duration = Duration::from_millis(250);

/// Submits per minute per key, with a burst, counted in Redis.
pub struct RateLimit {
    limiter: Option<SharedRateLimit>,
}

impl RateLimit {
    /// `per_minute` 0: no limit.
    pub fn new(store: StatusStore, per_minute: u32, burst: u32) -> Self {
        RateLimit {
            limiter: Gcra::per_minute(per_minute, burst).map(|gcra| SharedRateLimit::new(store, gcra)),
        }
    }

    /// Takes one submit from `key`'s allowance, or says how long until one
    /// is there. Redis unreachable: allowed (see the module's comment).
    pub async fn check(&self, key: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        match limiter.check(key).await {
            Ok(None) => Ok(()),
            Ok(Some(wait)) => Err(wait),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the rate limit in Redis: letting the submit through");
                Ok(())
            }
        }
    }
}

/// The queue's depth as last read, and the cap.
#[derive(Clone)]
pub struct QueueCap {
    cap: u64,
    depth: Arc<AtomicU64>,
}

const UNKNOWN: u64 = u64::MAX;

impl QueueCap {
    /// `cap` 0: no cap (and nothing is polled).
    pub fn new(cap: u64) -> Self {
        QueueCap {
            cap,
            depth: Arc::new(AtomicU64::new(UNKNOWN)),
        }
    }

    /// Starts the task that keeps the depth current.
    pub fn spawn_poller(&self, amqp_url: String, names: Names) {
        if self.cap == 0 {
            return;
        }
        let depth = self.depth.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = poll(&amqp_url, &names, &depth).await {
                    tracing::warn!(error = %e, "cannot read the queue depth; retrying");
                }
                depth.store(UNKNOWN, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// `Some(depth)` when the queue is at or over the cap. An unknown depth
    /// (RabbitMQ unreachable) lets the submit through: its publish will say.
    pub fn full(&self) -> Option<u64> {
        let depth = self.depth.load(Ordering::Relaxed);
        (self.cap > 0 && depth != UNKNOWN && depth >= self.cap).then_some(depth)
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// The depth last read (`None`: unknown or not polled).
    pub fn depth(&self) -> Option<u64> {
        let depth = self.depth.load(Ordering::Relaxed);
        (depth != UNKNOWN).then_some(depth)
    }
}

async fn poll(url: &str, names: &Names, depth: &AtomicU64) -> Result<(), queue::QueueError> {
    let conn = queue::connect(url, "sdxl-dispatcher queue-depth").await?;
    let channel = conn.create_channel().await?;
    queue::declare_topology(&channel, names).await?;
    loop {
        let (ready, _) = queue::queue_depths(&channel, names).await?;
        depth.store(ready.into(), Ordering::Relaxed);
        tokio::time::sleep(DEPTH_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_needs_a_known_depth() {
        let cap = QueueCap::new(10);
        assert_eq!(cap.full(), None, "unknown depth");
        cap.depth.store(9, Ordering::Relaxed);
        assert_eq!(cap.full(), None);
        cap.depth.store(10, Ordering::Relaxed);
        assert_eq!(cap.full(), Some(10));
        let off = QueueCap::new(0);
        off.depth.store(1_000_000, Ordering::Relaxed);
        assert_eq!(off.full(), None);
    }
}
