//! The order of the queued jobs, beside RabbitMQ's: a sorted set
//! `{prefix}:queue:order` of job ids scored by priority, then by submit
//! order, as RabbitMQ's priority queue delivers them (highest priority
//! first, first in first out within one).
//!
//! How it is kept in step with the queue: the dispatcher adds a job after
//! writing its `queued` record and before publishing it; every record that
//! leaves `queued` (a worker starting it, a cancel, a publish that failed)
//! takes it out, in [`StatusStore::update`]; and a sweep drops entries whose
//! record is gone or no longer queued (a process that died between the
//! two writes). A worker takes one delivery at a time (prefetch 1) and
//! writes `running` at once, so the jobs ahead of one in this set are the
//! jobs RabbitMQ will deliver before it, whatever the number of workers.

use uuid::Uuid;

use super::{StatusStore, StatusStoreError};
use crate::names::MAX_PRIORITY;
use crate::status::{JobState, JobStatus};

/// A job's score: priority bands of 2^44 submits each, the highest
/// priority first; within a band, the submit sequence number. Exact in an
/// f64 (9 · 2^44 + 2^44 < 2^53).
const BAND: f64 = (1u64 << 44) as f64;

/// `KEYS[1]` the set, `KEYS[2]` the sequence counter; `ARGV[1]` the job id,
/// `ARGV[2]` the band's base score. Adds the job at the end of its band
/// (once: a second call keeps its place).
pub(super) const ENQUEUE: &str = r"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local seq = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + seq, ARGV[1])
return 1
";

fn band_base(priority: u8) -> f64 {
    f64::from(MAX_PRIORITY.saturating_sub(priority.min(MAX_PRIORITY))) * BAND
}

/// How many jobs wait, per priority.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// `by_priority[p]`: jobs of priority `p` waiting.
    pub by_priority: Vec<u64>,
}

impl QueueCounts {
    pub fn total(&self) -> u64 {
        self.by_priority.iter().sum()
    }
}

impl StatusStore {
    /// Puts a queued job at the end of its priority's line.
    pub async fn enqueue_order(&self, id: Uuid, priority: u8) -> Result<(), StatusStoreError> {
        let (set, seq) = (self.names.queue_order_key(), self.names.queue_sequence_key());
        let (script, base) = (self.enqueue_script.clone(), band_base(priority));
        let _: i64 = self
            .run(|mut c| {
                let (script, set, seq) = (script.clone(), set.clone(), seq.clone());
                async move {
                    script
                        .key(set)
                        .key(seq)
                        .arg(id.to_string())
                        .arg(base)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(())
    }

    /// Takes a job out of the line (it started, or ended while queued).
    pub async fn dequeue_order(&self, id: Uuid) -> Result<(), StatusStoreError> {
        let set = self.names.queue_order_key();
        let _: i64 = self
            .run(|mut c| {
                let set = set.clone();
                async move {
                    redis::cmd("ZREM")
                        .arg(set)
                        .arg(id.to_string())
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(())
    }

    /// How many queued jobs are ahead of `id` (`None`: it is not in line).
    pub async fn queue_position(&self, id: Uuid) -> Result<Option<u64>, StatusStoreError> {
        let set = self.names.queue_order_key();
        self.run(|mut c| {
            let set = set.clone();
            async move {
                redis::cmd("ZRANK")
                    .arg(set)
                    .arg(id.to_string())
                    .query_async(&mut c)
                    .await
            }
        })
        .await
    }

    /// Jobs waiting per priority (0 ..= [`MAX_PRIORITY`]).
    pub async fn queue_counts(&self) -> Result<QueueCounts, StatusStoreError> {
        let set = self.names.queue_order_key();
        let mut pipe = redis::pipe();
        for priority in 0..=MAX_PRIORITY {
            let base = band_base(priority);
            // Scores of the band are base + seq, seq >= 1.
            pipe.cmd("ZCOUNT").arg(&set).arg(format!("({base}")).arg(base + BAND);
        }
        let by_priority: Vec<u64> = self
            .run(|mut c| {
                let pipe = pipe.clone();
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        Ok(QueueCounts { by_priority })
    }

    /// Drops the entries whose record is gone or no longer `queued`; returns
    /// how many. Called now and then by the dispatcher.
    pub async fn sweep_order(&self) -> Result<usize, StatusStoreError> {
        let set = self.names.queue_order_key();
        let members: Vec<String> = self
            .run(|mut c| {
                let set = set.clone();
                async move { redis::cmd("ZRANGE").arg(set).arg(0).arg(-1).query_async(&mut c).await }
            })
            .await?;
        let mut stale = Vec::new();
        for chunk in members.chunks(256) {
            let keys: Vec<String> = chunk
                .iter()
                .filter_map(|m| m.parse::<Uuid>().ok())
                .map(|id| self.names.status_key(id))
                .collect();
            let records: Vec<Option<String>> = self
                .run(|mut c| {
                    let keys = keys.clone();
                    async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await }
                })
                .await?;
            for (member, record) in chunk.iter().zip(records) {
                let queued = record
                    .and_then(|r| serde_json::from_str::<JobStatus>(&r).ok())
                    .is_some_and(|s| s.state == JobState::Queued);
                if !queued {
                    stale.push(member.clone());
                }
            }
        }
        if !stale.is_empty() {
            let _: i64 = self
                .run(|mut c| {
                    let (set, stale) = (set.clone(), stale.clone());
                    async move { redis::cmd("ZREM").arg(set).arg(stale).query_async(&mut c).await }
                })
                .await?;
        }
        Ok(stale.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priorities_come_first_and_bands_do_not_overlap() {
        assert!(band_base(9) < band_base(8) && band_base(1) < band_base(0));
        assert_eq!(band_base(9), 0.0);
        assert_eq!(band_base(200), band_base(MAX_PRIORITY));
        // The last sequence number of a band stays below the next band.
        let last = band_base(0) + BAND - 1.0;
        assert!(last < 2f64.powi(53) && last > band_base(0));
        assert_eq!(last - band_base(0), BAND - 1.0, "exact in an f64");
    }
}
