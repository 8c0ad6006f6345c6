//! What a submit must pass before it is validated and queued, so that no
//! client can flood the GPUs: a per-key rate limit (a token bucket per API
//! key name: `429` with `Retry-After`) and a cap on the queue's depth (`503`
//! while more jobs wait than the cap).
//!
//! Both are per dispatcher process: with several dispatchers behind a load
//! balancer the rate a key gets is the sum of theirs. The queue depth is
//! read from RabbitMQ every [`DEPTH_POLL`] by a background task, not on
//! every submit (a passive declare per request would cost a round trip), so
//! the cap can be overshot by what arrives within one poll.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::queue;
use common::Names;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How often the dispatcher reads the queue's depth.
pub const DEPTH_POLL: Duration = Duration::from_millis(250);

/// Submits per minute per key, with a burst.
pub struct RateLimit {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl RateLimit {
    /// `per_minute` 0: no limit.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_minute).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst))
        });
        RateLimit {
            limiter,
            clock: DefaultClock::default(),
        }
    }

    /// Takes one submit from `key`'s bucket, or says how long until one is there.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&key.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Drops the buckets that are full again (called now and then, so that
    /// many one-off keys do not grow the map for ever).
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
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
    fn a_key_gets_its_burst_then_waits_and_other_keys_are_not_affected() {
        let limit = RateLimit::new(60, 3);
        for _ in 0..3 {
            assert!(limit.check("alice").is_ok());
        }
        let wait = limit.check("alice").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(limit.check("bob").is_ok());
    }

    #[test]
    fn zero_means_no_limit() {
        let limit = RateLimit::new(0, 0);
        assert!((0..10_000).all(|_| limit.check("k").is_ok()));
    }

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
