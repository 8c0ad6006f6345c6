//! Webhook signing secrets, one per API key, in Redis: `whsec_` and the
//! base64 of 32 random bytes (Standard Webhooks' form), made on first use.
//! A rotation keeps the secret it replaces for [`PREVIOUS_SECRET_TTL`], and
//! deliveries are signed with both meanwhile, so that receivers can switch
//! without losing events.

use std::time::Duration;

use base64::Engine as _;
use rand::RngCore;

use super::{StatusStore, StatusStoreError};

/// How long a replaced secret still signs deliveries.
pub const PREVIOUS_SECRET_TTL: Duration = Duration::from_secs(24 * 3600);

/// A new secret: `whsec_` + base64 of 32 random bytes.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `KEYS[1]` the secret, `KEYS[2]` the previous one; `ARGV[1]` the new
/// secret, `ARGV[2]` the previous one's TTL in seconds. Returns the new one.
const ROTATE: &str = r"
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
if old then
  redis.call('SET', KEYS[2], old, 'EX', ARGV[2])
end
return ARGV[1]
";

impl StatusStore {
    /// The key's secret, made now if it has none.
    pub async fn webhook_secret(&self, owner: &str) -> Result<String, StatusStoreError> {
        let key = self.names.webhook_secret_key(owner);
        let fresh = new_secret();
        // SET NX GET (Redis 7): sets when missing, returns what was there.
        let existing: Option<String> = self
            .run(|mut c| {
                let (key, fresh) = (key.clone(), fresh.clone());
                async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(fresh)
                        .arg("NX")
                        .arg("GET")
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(existing.unwrap_or(fresh))
    }

    /// Replaces the key's secret; the old one signs for another day.
    pub async fn rotate_webhook_secret(&self, owner: &str) -> Result<String, StatusStoreError> {
        let key = self.names.webhook_secret_key(owner);
        let previous = format!("{key}:previous");
        let script = redis::Script::new(ROTATE);
        self.run(|mut c| {
            let (script, key, previous) = (script.clone(), key.clone(), previous.clone());
            async move {
                script
                    .key(key)
                    .key(previous)
                    .arg(new_secret())
                    .arg(PREVIOUS_SECRET_TTL.as_secs())
                    .invoke_async(&mut c)
                    .await
            }
        })
        .await
    }

    /// The secrets deliveries are signed with: the current one, and the one
    /// it replaced while that is kept.
    pub async fn webhook_signing_secrets(&self, owner: &str) -> Result<Vec<String>, StatusStoreError> {
        let current = self.webhook_secret(owner).await?;
        let previous_key = format!("{}:previous", self.names.webhook_secret_key(owner));
        let previous: Option<String> = self
            .run(|mut c| {
                let key = previous_key.clone();
                async move { redis::cmd("GET").arg(key).query_async(&mut c).await }
            })
            .await?;
        Ok(std::iter::once(current).chain(previous).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_the_standard_form() {
        let s = new_secret();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s.strip_prefix("whsec_").unwrap())
            .unwrap();
        assert_eq!(raw.len(), 32);
        assert_ne!(s, new_secret());
    }
}
