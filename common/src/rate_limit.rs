//! A rate limit shared by every dispatcher: GCRA (the generic cell rate
//! algorithm, the one `governor` runs in process) with its one number of
//! state per key, the theoretical arrival time (TAT), in Redis under
//! `{prefix}:ratelimit:{key}`, read and written by one Lua script so that
//! two dispatchers cannot both take the last token. The script reads the
//! clock with Redis' `TIME`: the dispatchers' clocks do not matter.
//!
//! With the emission interval T = 60 s / rate and the tolerance τ = burst·T,
//! a request at `now` is allowed iff max(TAT, now) + T − now ≤ τ; then
//! TAT = max(TAT, now) + T. A refused request changes nothing and waits the
//! excess, max(TAT, now) + T − now − τ. A key at rest holds `burst` tokens
//! and one comes back every T.

use std::time::Duration;

use crate::names::Names;
use crate::status_store::{StatusStore, StatusStoreError};

/// `KEYS[1]` the key's TAT (µs since the epoch, Redis' clock); `ARGV[1]` T
/// and `ARGV[2]` τ in µs. Returns 0 when allowed (TAT stored, expiring when
/// the bucket is full again), else the µs to wait.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local excess = new_tat - now - tolerance
if excess > 0 then
  return excess
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return 0
";

/// The arithmetic's two numbers, in whole microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// T: one request per this.
    pub interval_us: u64,
    /// τ = burst·T.
    pub tolerance_us: u64,
}

impl Gcra {
    /// `per_minute` requests a minute after a burst of `burst` (taken as at
    /// least 1); `None` for 0: no limit.
    pub fn per_minute(per_minute: u32, burst: u32) -> Option<Gcra> {
        if per_minute == 0 {
            return None;
        }
        let interval_us = (60_000_000 / u64::from(per_minute)).max(1);
        Some(Gcra {
            interval_us,
            tolerance_us: interval_us * u64::from(burst.max(1)),
        })
    }
}

/// The shared limiter: one script call per check.
#[derive(Clone)]
pub struct SharedRateLimit {
    store: StatusStore,
    gcra: Gcra,
    script: redis::Script,
}

impl SharedRateLimit {
    pub fn new(store: StatusStore, gcra: Gcra) -> Self {
        SharedRateLimit {
            store,
            gcra,
            script: redis::Script::new(GCRA),
        }
    }

    fn names(&self) -> &Names {
        self.store.names()
    }

    /// Takes one request from `key`'s allowance: `Ok(None)` when allowed,
    /// `Ok(Some(wait))` when refused; an error when Redis could not say.
    pub async fn check(&self, key: &str) -> Result<Option<Duration>, StatusStoreError> {
        let redis_key = self.names().rate_limit_key(key);
        let (script, gcra) = (self.script.clone(), self.gcra);
        let wait_us: u64 = self
            .store
            .run(|mut c| {
                let (script, redis_key) = (script.clone(), redis_key.clone());
                async move {
                    script
                        .key(redis_key)
                        .arg(gcra.interval_us)
                        .arg(gcra.tolerance_us)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok((wait_us > 0).then(|| Duration::from_micros(wait_us)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_and_the_tolerance() {
        assert_eq!(Gcra::per_minute(0, 20), None);
        assert_eq!(
            Gcra::per_minute(6, 3),
            Some(Gcra {
                interval_us: 10_000_000,
                tolerance_us: 30_000_000
            })
        );
        // A burst of 0 is a burst of 1, as `governor` took it.
        assert_eq!(Gcra::per_minute(120, 0).unwrap().tolerance_us, 500_000);
        assert_eq!(Gcra::per_minute(u32::MAX, 1).unwrap().interval_us, 1);
    }

    /// Against the real Redis (127.0.0.1:6379, or `REDIS_URL`), in a prefix
    /// of its own; skipped with a message when no Redis answers.
    #[tokio::test]
    async fn a_burst_then_the_rate_and_two_limiters_share_one_allowance() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("unit:{}", uuid::Uuid::new_v4().simple());
        let names = Names::new("unused", prefix);
        let Ok(store) = StatusStore::connect(&url, names, Duration::from_secs(60)).await else {
            eprintln!("skipped: no Redis at {url}");
            return;
        };
        // Two "dispatchers": two limiters on two connections.
        let other = StatusStore::connect(&url, store.names().clone(), Duration::from_secs(60))
            .await
            .unwrap();
        let gcra = Gcra::per_minute(60, 4).unwrap();
        let (a, b) = (SharedRateLimit::new(store, gcra), SharedRateLimit::new(other, gcra));
        for i in 0..4 {
            let limiter = if i % 2 == 0 { &a } else { &b };
            assert_eq!(limiter.check("alice").await.unwrap(), None, "submit {i}");
        }
        let wait = b.check("alice").await.unwrap().expect("the 5th is refused");
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(a.check("bob").await.unwrap(), None, "another key has its own");
        // One comes back after T (1 s), on either limiter.
        tokio::time::sleep(wait + Duration::from_millis(20)).await;
        assert_eq!(a.check("alice").await.unwrap(), None);
        assert!(b.check("alice").await.unwrap().is_some());
    }
}
