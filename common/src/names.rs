//! The names both sides must agree on: the queue and its dead-letter
//! exchange and queue, the Redis keys and the event channel, the S3 keys.
//!
//! Everything hangs off two configurable roots, the queue name (`SDXL_QUEUE`)
//! and the Redis key prefix (`SDXL_REDIS_PREFIX`), so that tests can run side
//! by side each in its own namespace.

use uuid::Uuid;

use crate::rules::OutputFormat;

pub const DEFAULT_QUEUE: &str = "sdxl.jobs";
pub const DEFAULT_REDIS_PREFIX: &str = "sdxl";
/// Highest AMQP priority the queue honours (`x-max-priority`).
pub const MAX_PRIORITY: u8 = 9;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub queue: String,
    pub redis_prefix: String,
}

impl Default for Names {
    fn default() -> Self {
        Names::new(DEFAULT_QUEUE, DEFAULT_REDIS_PREFIX)
    }
}

impl Names {
    pub fn new(queue: impl Into<String>, redis_prefix: impl Into<String>) -> Self {
        Names {
            queue: queue.into(),
            redis_prefix: redis_prefix.into(),
        }
    }

    /// Where rejected (poison) jobs go: `{queue}.dlx`.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    /// The queue bound to the dead-letter exchange: `{queue}.dead`.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// Webhook events waiting to be delivered: `{queue}.webhooks`.
    pub fn webhook_queue(&self) -> String {
        format!("{}.webhooks", self.queue)
    }

    /// Where a webhook event waits `delay` before its next attempt:
    /// `{queue}.webhooks.retry-{ms}ms`.
    pub fn webhook_retry_queue(&self, delay: std::time::Duration) -> String {
        format!("{}.webhooks.retry-{}ms", self.queue, delay.as_millis())
    }

    /// Webhook events whose every attempt failed: `{queue}.webhooks.dead`.
    pub fn webhook_dead_queue(&self) -> String {
        format!("{}.webhooks.dead", self.queue)
    }

    /// An API key's webhook signing secret: `sdxl:webhook-secret:{key name}`
    /// (and the one it replaced, for a day, under `…:previous`).
    pub fn webhook_secret_key(&self, owner: &str) -> String {
        format!("{}:webhook-secret:{owner}", self.redis_prefix)
    }

    /// The status record: `sdxl:job:{id}`.
    pub fn status_key(&self, id: Uuid) -> String {
        format!("{}:job:{id}", self.redis_prefix)
    }

    /// Set when a cancel is requested: `sdxl:job:{id}:cancel`.
    pub fn cancel_key(&self, id: Uuid) -> String {
        format!("{}:job:{id}:cancel", self.redis_prefix)
    }

    /// Held by the worker running the job: `sdxl:job:{id}:lease`.
    pub fn lease_key(&self, id: Uuid) -> String {
        format!("{}:job:{id}:lease", self.redis_prefix)
    }

    /// The event channel: `sdxl:job:{id}:events`.
    pub fn events_channel(&self, id: Uuid) -> String {
        format!("{}:job:{id}:events", self.redis_prefix)
    }

    /// The queued jobs in delivery order (a sorted set): `sdxl:queue:order`.
    pub fn queue_order_key(&self) -> String {
        format!("{}:queue:order", self.redis_prefix)
    }

    /// The submit counter that orders jobs of one priority: `sdxl:queue:seq`.
    pub fn queue_sequence_key(&self) -> String {
        format!("{}:queue:seq", self.redis_prefix)
    }

    /// An `Idempotency-Key`: `sdxl:idempotency:{key}`.
    pub fn idempotency_key(&self, key: &str) -> String {
        format!("{}:idempotency:{key}", self.redis_prefix)
    }

    /// Every job, newest last (a sorted set of `{created_at ms}:{id}`
    /// members, see [`crate::job_index`]): `sdxl:jobs:all`.
    pub fn all_jobs_index(&self) -> String {
        format!("{}:jobs:all", self.redis_prefix)
    }

    /// The jobs of the API key named `owner`: `sdxl:jobs:owner:{owner}`.
    pub fn owner_jobs_index(&self, owner: &str) -> String {
        format!("{}:jobs:owner:{owner}", self.redis_prefix)
    }

    /// The rate-limit state (GCRA's theoretical arrival time) of the API key
    /// named `key`, shared by every dispatcher: `sdxl:ratelimit:{key}`.
    pub fn rate_limit_key(&self, key: &str) -> String {
        format!("{}:ratelimit:{key}", self.redis_prefix)
    }

    /// The grid object: `jobs/{id}/grid.{ext}`.
    pub fn grid_object(id: Uuid, format: OutputFormat) -> String {
        format!("jobs/{id}/grid.{}", format.extension())
    }

    /// Image `index` (from 0): `jobs/{id}/{index}.{ext}`.
    pub fn image_object(id: Uuid, index: usize, format: OutputFormat) -> String {
        format!("jobs/{id}/{index}.{}", format.extension())
    }

    /// A job's input image, stored by the dispatcher: `jobs/{id}/input.png`.
    pub fn input_object(id: Uuid) -> String {
        format!("jobs/{id}/input.png")
    }

    /// A job's inpainting mask: `jobs/{id}/mask.png`.
    pub fn mask_object(id: Uuid) -> String {
        format!("jobs/{id}/mask.png")
    }

    /// Where the LoRA registry keeps its files and their records.
    pub const LORA_PREFIX: &'static str = "loras/";

    /// A registered LoRA's file: `loras/{name}.safetensors`.
    pub fn lora_object(name: &str) -> String {
        format!("{}{name}.safetensors", Self::LORA_PREFIX)
    }

    /// Its record (size, sha256, format, …): `loras/{name}.json`, written
    /// after the file, so that a LoRA is listed only once it is whole.
    pub fn lora_record_object(name: &str) -> String {
        format!("{}{name}.json", Self::LORA_PREFIX)
    }

    /// The result manifest, written after the images: `jobs/{id}/result.json`.
    /// A redelivered job whose manifest exists is not generated or stored again.
    pub fn manifest_object(id: Uuid) -> String {
        format!("jobs/{id}/result.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_match_the_spec() {
        let n = Names::default();
        let id = Uuid::nil();
        assert_eq!(n.queue, "sdxl.jobs");
        assert_eq!(n.status_key(id), format!("sdxl:job:{id}"));
        assert_eq!(n.events_channel(id), format!("sdxl:job:{id}:events"));
        assert_eq!(n.dead_letter_exchange(), "sdxl.jobs.dlx");
        assert_eq!(
            Names::grid_object(id, OutputFormat::Jpeg),
            format!("jobs/{id}/grid.jpeg")
        );
        assert_eq!(
            Names::image_object(id, 2, OutputFormat::Png),
            format!("jobs/{id}/2.png")
        );
    }
}
