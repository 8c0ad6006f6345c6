//! The LoRA registry, kept in the object store beside the results: each
//! LoRA is `loras/{name}.safetensors` and its record `loras/{name}.json`
//! (written after the file, deleted before it, so that a listed LoRA is
//! always whole). An upload is checked from its safetensors header (every
//! key a LoRA tensor of a type the worker runs), hashed, and described by
//! its record; a job names LoRAs, and the dispatcher pins each to the
//! sha256 of the file it was accepted with.

use std::sync::Arc;

use chrono::Utc;
pub use common::lora_record::LoraRecord;
use common::names::Names;
use common::result_store::{ResultStore, ResultStoreError};
use common::rules::{valid_lora_name, JobLora, ValidationError, LORA_NAME_MAX_CHARS};
use sha2::{Digest, Sha256};

/// The default cap on an uploaded LoRA (SDXL LoRAs run from a few MB to a
/// few hundred; the largest LoCon files approach a GB).
pub const DEFAULT_MAX_LORA_BYTES: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("a LoRA name must be 1 to {LORA_NAME_MAX_CHARS} of A-Z a-z 0-9 . _ - (not starting with `.`), got `{0}`")]
    BadName(String),
    #[error("a LoRA file must be at most {limit} bytes")]
    TooLarge { limit: usize },
    #[error("not a LoRA this service runs: {0}")]
    NotALora(String),
    #[error("no LoRA `{0}` in the registry")]
    NotFound(String),
    #[error("LoRA `{name}`'s record is unreadable: {reason}")]
    BadRecord { name: String, reason: String },
    #[error("object store: {0}")]
    Store(#[from] ResultStoreError),
}

/// The registry on one bucket.
#[derive(Clone)]
pub struct LoraRegistry {
    store: Arc<ResultStore>,
    max_bytes: usize,
}

impl LoraRegistry {
    pub fn new(store: Arc<ResultStore>, max_bytes: usize) -> Self {
        LoraRegistry { store, max_bytes }
    }

    /// The largest upload accepted.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Checks and stores a LoRA under `name`, replacing one of that name.
    pub async fn put(&self, name: &str, bytes: Vec<u8>, by: Option<&str>) -> Result<LoraRecord, RegistryError> {
        if !valid_lora_name(name) {
            return Err(RegistryError::BadName(name.chars().take(80).collect()));
        }
        if bytes.len() > self.max_bytes {
            return Err(RegistryError::TooLarge { limit: self.max_bytes });
        }
        let header = sdxl::lora::inspect_header(&bytes).map_err(|e| RegistryError::NotALora(e.to_string()))?;
        let record = LoraRecord {
            name: name.to_string(),
            bytes: bytes.len() as u64,
            sha256: hex(&Sha256::digest(&bytes)),
            format: header.format.to_string(),
            ranks: header.ranks,
            parts: header.components.iter().map(|c| c.name().to_string()).collect(),
            modules: header.modules,
            conv_modules: header.conv_modules,
            uploaded_at: Utc::now(),
            uploaded_by: by.map(str::to_string),
        };
        self.store
            .put(&Names::lora_object(name), bytes, "application/octet-stream")
            .await?;
        let json = serde_json::to_vec_pretty(&record).map_err(|e| RegistryError::BadRecord {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        self.store
            .put(&Names::lora_record_object(name), json, "application/json")
            .await?;
        tracing::info!(name, sha256 = %record.sha256, bytes = record.bytes, format = %record.format, "LoRA registered");
        Ok(record)
    }

    /// The record of `name`, if registered.
    pub async fn get(&self, name: &str) -> Result<Option<LoraRecord>, RegistryError> {
        if !valid_lora_name(name) {
            return Ok(None);
        }
        let Some(json) = self.store.get(&Names::lora_record_object(name)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|e| RegistryError::BadRecord {
                name: name.to_string(),
                reason: e.to_string(),
            })
    }

    /// Every registered LoRA, by name.
    pub async fn list(&self) -> Result<Vec<LoraRecord>, RegistryError> {
        let mut names: Vec<String> = self
            .store
            .list(Names::LORA_PREFIX)
            .await?
            .into_iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(Names::LORA_PREFIX)?;
                rest.strip_suffix(".json").map(str::to_string)
            })
            .collect();
        names.sort();
        let mut records = Vec::with_capacity(names.len());
        for name in names {
            if let Some(record) = self.get(&name).await? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Removes `name`; false when it was not registered.
    pub async fn delete(&self, name: &str) -> Result<bool, RegistryError> {
        if self.get(name).await?.is_none() {
            return Ok(false);
        }
        self.store.delete(&Names::lora_record_object(name)).await?;
        self.store.delete(&Names::lora_object(name)).await?;
        tracing::info!(name, "LoRA removed");
        Ok(true)
    }

    /// Checks that every LoRA of a job is registered and pins it to the
    /// file's sha256 (a job that pins one already must name the current file).
    pub async fn resolve(&self, loras: &mut [JobLora]) -> Result<(), ResolveError> {
        for (index, lora) in loras.iter_mut().enumerate() {
            let Some(record) = self.get(&lora.name).await? else {
                let mut known: Vec<String> = self.list().await?.into_iter().map(|r| r.name).collect();
                let more = known.len().saturating_sub(20);
                known.truncate(20);
                let mut known = if known.is_empty() {
                    "none yet (PUT /v1/loras/{name} adds one)".to_string()
                } else {
                    known.join(", ")
                };
                if more > 0 {
                    known.push_str(&format!(" and {more} more (GET /v1/loras)"));
                }
                return Err(ResolveError::Invalid(ValidationError::UnknownLora {
                    index,
                    name: lora.name.clone(),
                    known,
                }));
            };
            match &lora.sha256 {
                Some(pinned) if *pinned != record.sha256 => {
                    return Err(ResolveError::Invalid(ValidationError::LoraChanged {
                        index,
                        name: lora.name.clone(),
                        current: record.sha256,
                    }))
                }
                _ => lora.sha256 = Some(record.sha256),
            }
        }
        Ok(())
    }
}

/// Why a job's LoRAs could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Invalid(ValidationError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
