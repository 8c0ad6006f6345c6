//! The record of a LoRA in the registry (`loras/{name}.json`, beside its
//! file): what `GET /v1/loras` lists, and where a worker reads the sha256 of
//! a LoRA a job names without pinning one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A registered LoRA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoraRecord {
    pub name: String,
    pub bytes: u64,
    /// Hex digest of the file; jobs are pinned to it.
    pub sha256: String,
    /// `kohya`, `peft` or `diffusers (legacy)`.
    pub format: String,
    /// The distinct ranks of its modules.
    pub ranks: Vec<usize>,
    /// What it changes: `unet`, `text_encoder`, `text_encoder_2`.
    pub parts: Vec<String>,
    pub modules: usize,
    /// Of which on convolutions (LoCon).
    pub conv_modules: usize,
    pub uploaded_at: DateTime<Utc>,
    /// The API key name that uploaded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded_by: Option<String>,
}
