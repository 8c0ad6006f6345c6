//! Retrying transient failures with exponential backoff, for a bounded time.

use std::future::Future;
use std::time::{Duration, Instant};

use common::result_store::ResultStoreError;
use common::status_store::StatusStoreError;
use common::webhook::AnnounceError;

/// Errors that know whether trying again may help.
pub trait Transient: std::fmt::Display {
    fn is_transient(&self) -> bool;
}

impl Transient for StatusStoreError {
    fn is_transient(&self) -> bool {
        StatusStoreError::is_transient(self)
    }
}

/// A lost channel is not retried in place: the job is requeued and the
/// session reconnects.
impl Transient for AnnounceError {
    fn is_transient(&self) -> bool {
        matches!(self, AnnounceError::Store(e) if e.is_transient())
    }
}

impl Transient for ResultStoreError {
    fn is_transient(&self) -> bool {
        ResultStoreError::is_transient(self)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max_delay: Duration,
    /// Give up once this much time has passed since the first try.
    pub max_elapsed: Duration,
}

impl Backoff {
    pub fn new(max_elapsed: Duration) -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            max_elapsed,
        }
    }

    /// The delay before retry `n` (from 0): doubling, capped.
    pub fn delay(&self, n: u32) -> Duration {
        self.initial.saturating_mul(1u32 << n.min(16)).min(self.max_delay)
    }
}

/// Runs `op` until it succeeds, fails with a non-transient error, or the
/// backoff's time is up (then the last error is returned).
pub async fn retry<T, E, F, Fut>(backoff: Backoff, what: &str, mut op: F) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    let mut n = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && start.elapsed() < backoff.max_elapsed => {
                let delay = backoff.delay(n);
                tracing::warn!(error = %e, attempt = n + 1, ?delay, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[derive(Debug)]
    struct E(bool);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "transient={}", self.0)
        }
    }
    impl Transient for E {
        fn is_transient(&self) -> bool {
            self.0
        }
    }

    fn fast(max: u64) -> Backoff {
        Backoff {
            initial: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            max_elapsed: Duration::from_millis(max),
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = Cell::new(0);
        let r: Result<u32, E> = retry(fast(10_000), "op", || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 4 {
                    Err(E(true))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 4);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let calls = Cell::new(0);
        let r: Result<(), E> = retry(fast(10_000), "op", || {
            calls.set(calls.get() + 1);
            async { Err(E(false)) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test]
    async fn retrying_stops_after_the_window() {
        let start = Instant::now();
        let r: Result<(), E> = retry(fast(50), "op", || async { Err(E(true)) }).await;
        assert!(r.is_err());
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn delays_double_and_are_capped() {
        let b = Backoff::new(Duration::from_secs(60));
        assert_eq!(b.delay(0), Duration::from_millis(200));
        assert_eq!(b.delay(1), Duration::from_millis(400));
        assert_eq!(b.delay(10), Duration::from_secs(5));
    }
}
