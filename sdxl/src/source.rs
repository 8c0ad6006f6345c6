//! Where a model's files come from: a local diffusers folder, or a Hugging Face
//! repo id resolved through the hf-hub crate's cache.
//!
//! How to reach the hub is the caller's [`HubOptions`] (the worker fills them
//! from `HF_HOME`, `HF_TOKEN` and `HF_HUB_OFFLINE`): this crate reads no
//! environment variable.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};

use super::ModelError;

/// The Hugging Face repo used when no model is named.
pub const DEFAULT_MODEL: &str = "stabilityai/stable-diffusion-xl-base-1.0";

/// A diffusers folder, local or on the hub, or configs compiled into the
/// binary (SDXL base's, for single-file checkpoints with no `--config`).
#[derive(Debug)]
pub enum ModelSource {
    Local(PathBuf),
    Hub(Box<HubRepo>),
    /// Files by relative path; configs and tokenizers only, no weights.
    Embedded(&'static [(&'static str, &'static [u8])]),
}

macro_rules! embedded {
    ($root:literal: $($rel:literal),* $(,)?) => {
        &[$(($rel, include_bytes!(concat!($root, "/", $rel)).as_slice())),*]
    };
}

/// The configs and tokenizers of `stabilityai/stable-diffusion-xl-base-1.0`
/// (diffusers 0.42.1), shipped in the binary: what a single-file SDXL
/// checkpoint is read with when no `--config` names others.
pub const SDXL_BASE_CONFIGS: &[(&str, &[u8])] = embedded!(
    "../configs/sdxl-base-1.0":
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
    "unet/config.json",
    "vae/config.json",
);

/// A hub repo and how to reach it.
#[derive(Debug)]
pub struct HubRepo {
    pub repo_id: String,
    pub revision: String,
    offline: bool,
    cache: Cache,
    api: Option<Api>,
    /// Files the repo has (from the hub's listing, or the cache when offline).
    listing: Option<Vec<String>>,
}

/// How to reach the Hugging Face hub.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// Use only what the cache already holds (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// A token for gated repos (`HF_TOKEN`); `None`: the cache's token file.
    pub token: Option<String>,
    /// The hub cache (`$HF_HOME/hub`); `None`: hf-hub's default,
    /// `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
}

/// Whether an `HF_HUB_OFFLINE` value asks for no network (the values
/// huggingface_hub accepts).
pub fn offline_value(value: Option<&str>) -> bool {
    matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("1" | "true" | "yes" | "on")
    )
}

/// Whether `name` reads as a hub repo id (`owner/name`, optionally `@revision`)
/// rather than a path. An existing path always wins.
pub fn looks_like_repo_id(name: &str) -> bool {
    let id = name.split('@').next().unwrap_or(name);
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

impl ModelSource {
    /// A local folder when `name` exists on disk (or is not repo-shaped),
    /// otherwise a hub repo id with an optional `@revision`.
    pub fn resolve(name: &str, hub: &HubOptions) -> Result<Self, ModelError> {
        let path = Path::new(name);
        if path.exists() || !looks_like_repo_id(name) {
            if !path.is_dir() {
                return Err(ModelError::MissingFile {
                    path: name.to_string(),
                    message: "no such model folder (give a diffusers folder or a hub repo id such as stabilityai/stable-diffusion-xl-base-1.0)".into(),
                });
            }
            return Ok(ModelSource::Local(path.to_path_buf()));
        }
        let (repo_id, revision) = match name.split_once('@') {
            Some((id, rev)) => (id.to_string(), rev.to_string()),
            None => (name.to_string(), "main".to_string()),
        };
        let offline = hub.offline;
        let cache = match &hub.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::default(),
        };
        let api = if offline {
            None
        } else {
            let token = hub.token.clone().filter(|t| !t.is_empty()).or_else(|| cache.token());
            Some(
                ApiBuilder::from_cache(cache.clone())
                    .with_token(token)
                    .with_progress(false)
                    .build()
                    .map_err(|e| ModelError::Hub(e.to_string()))?,
            )
        };
        let mut hub = HubRepo {
            repo_id,
            revision,
            offline,
            cache,
            api,
            listing: None,
        };
        hub.listing = hub.list_files()?;
        Ok(ModelSource::Hub(Box::new(hub)))
    }

    /// A human-readable name for logs.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Local(p) => p.display().to_string(),
            ModelSource::Hub(h) => format!("{}@{} (hub)", h.repo_id, h.revision),
            ModelSource::Embedded(_) => "SDXL base configs (built in)".into(),
        }
    }

    /// The bytes of `rel`, or `None` when the source has no such file.
    pub fn read_optional(&self, rel: &str) -> Result<Option<Vec<u8>>, ModelError> {
        if let ModelSource::Embedded(files) = self {
            return Ok(files.iter().find(|(name, _)| *name == rel).map(|(_, b)| b.to_vec()));
        }
        let Some(path) = self.optional_file(rel)? else {
            return Ok(None);
        };
        std::fs::read(&path)
            .map(Some)
            .map_err(|e| ModelError::missing_file(&path, e))
    }

    /// The bytes of `rel`; an error names the missing file.
    pub fn read(&self, rel: &str) -> Result<Vec<u8>, ModelError> {
        self.read_optional(rel)?.ok_or_else(|| ModelError::MissingFile {
            path: self.display_path(rel),
            message: "not found".into(),
        })
    }

    /// `rel` parsed as JSON, naming the file in every error.
    pub fn read_json<T: serde::de::DeserializeOwned>(&self, rel: &str) -> Result<T, ModelError> {
        let bytes = self.read(rel)?;
        serde_json::from_slice(&bytes).map_err(|e| ModelError::Config {
            file: self.display_path(rel),
            message: e.to_string(),
        })
    }

    /// The local path of `rel` (`unet/config.json`), downloading it from the hub
    /// when needed; an error names the missing file.
    pub fn file(&self, rel: &str) -> Result<PathBuf, ModelError> {
        self.optional_file(rel)?.ok_or_else(|| ModelError::MissingFile {
            path: self.display_path(rel),
            message: "not found".into(),
        })
    }

    /// Like [`ModelSource::file`], but `None` when the model has no such file.
    pub fn optional_file(&self, rel: &str) -> Result<Option<PathBuf>, ModelError> {
        match self {
            ModelSource::Local(root) => {
                let p = root.join(rel);
                Ok(p.is_file().then_some(p))
            }
            ModelSource::Hub(hub) => hub.get(rel),
            // Configs only: the weights come from elsewhere (a single file).
            ModelSource::Embedded(_) => Ok(None),
        }
    }

    fn display_path(&self, rel: &str) -> String {
        match self {
            ModelSource::Local(root) => root.join(rel).display().to_string(),
            ModelSource::Hub(h) => format!("{}/{} (hub repo {})", h.repo_id, rel, h.revision),
            ModelSource::Embedded(_) => format!("{rel} (built-in SDXL base configs)"),
        }
    }

    /// The safetensors files of one component, in the order to load them:
    /// `{base}[.{variant}].safetensors`, or the shards its
    /// `.safetensors.index.json` names.
    pub fn safetensors(&self, component: &str, base: &str, variant: Option<&str>) -> Result<Vec<PathBuf>, ModelError> {
        let dir = if component.is_empty() {
            String::new()
        } else {
            format!("{component}/")
        };
        let stem = match variant {
            Some(v) => format!("{dir}{base}.{v}"),
            None => format!("{dir}{base}"),
        };
        let single = format!("{stem}.safetensors");
        if let Some(p) = self.optional_file(&single)? {
            return Ok(vec![p]);
        }
        let index_rel = format!("{stem}.safetensors.index.json");
        let Some(index) = self.optional_file(&index_rel)? else {
            return Err(ModelError::MissingFile {
                path: self.display_path(&single),
                message: format!(
                    "neither it nor {index_rel} exists{}",
                    if variant.is_some() {
                        " (is the variant right? drop --variant to use the default weights)"
                    } else {
                        ""
                    }
                ),
            });
        };
        let shards = shard_names(&index)?;
        shards.iter().map(|name| self.file(&format!("{dir}{name}"))).collect()
    }
}

/// The distinct shard file names of a `*.safetensors.index.json`, in order.
pub fn shard_names(index: &Path) -> Result<Vec<String>, ModelError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index: Index = super::config::read_json(index)?;
    let mut names: Vec<String> = index.weight_map.into_values().collect();
    names.sort();
    names.dedup();
    for name in &names {
        if name.contains('/') || name.contains("..") {
            return Err(ModelError::Config {
                file: "safetensors index".into(),
                message: format!("shard name {name:?} must be a plain file name"),
            });
        }
    }
    Ok(names)
}

impl HubRepo {
    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }

    /// The repo's file list: from the hub, or `None` offline (then each file is
    /// looked up in the cache by name).
    fn list_files(&self) -> Result<Option<Vec<String>>, ModelError> {
        let Some(api) = &self.api else {
            return Ok(None);
        };
        let info = api
            .repo(self.repo())
            .info()
            .map_err(|e| ModelError::Hub(format!("listing {}: {e}", self.repo_id)))?;
        Ok(Some(info.siblings.into_iter().map(|s| s.rfilename).collect()))
    }

    fn get(&self, rel: &str) -> Result<Option<PathBuf>, ModelError> {
        if let Some(p) = self.cache.repo(self.repo()).get(rel) {
            return Ok(Some(p));
        }
        if self.offline {
            return Ok(None);
        }
        if let Some(listing) = &self.listing {
            if !listing.iter().any(|f| f == rel) {
                return Ok(None);
            }
        }
        let api = self
            .api
            .as_ref()
            .ok_or_else(|| ModelError::Hub("no hub client".into()))?;
        api.repo(self.repo())
            .get(rel)
            .map(Some)
            .map_err(|e| ModelError::Hub(format!("downloading {}/{rel}: {e}", self.repo_id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        assert!(looks_like_repo_id("stabilityai/stable-diffusion-xl-base-1.0"));
        assert!(looks_like_repo_id("madebyollin/sdxl-vae-fp16-fix@main"));
        assert!(!looks_like_repo_id("./models/sdxl"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("plainname"));
    }

    #[test]
    fn the_built_in_configs_are_sdxl_base() {
        let source = ModelSource::Embedded(SDXL_BASE_CONFIGS);
        let unet: crate::config::UNetConfig = source.read_json("unet/config.json").unwrap();
        assert_eq!(unet.block_out_channels, vec![320, 640, 1280]);
        assert!(source.read("tokenizer_2/merges.txt").unwrap().len() > 100_000);
        assert!(source
            .read_optional("unet/diffusion_pytorch_model.safetensors")
            .unwrap()
            .is_none());
        let err = source.read("nope.json").unwrap_err().to_string();
        assert!(err.contains("nope.json") && err.contains("built-in"), "{err}");
    }

    #[test]
    fn offline_values() {
        assert!(offline_value(Some("1")));
        assert!(offline_value(Some("TRUE")));
        assert!(!offline_value(Some("0")));
        assert!(!offline_value(None));
    }

    #[test]
    fn offline_hub_repo_reads_only_the_cache() {
        // A fake HF_HOME cache with one snapshot: the offline path must find its
        // files by name and report the others as absent, without any network.
        let home = tempfile::tempdir().unwrap();
        let repo_dir = home.path().join("hub/models--owner--model");
        let snap = repo_dir.join("snapshots/abc123");
        std::fs::create_dir_all(snap.join("unet")).unwrap();
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs/main"), "abc123").unwrap();
        std::fs::write(snap.join("model_index.json"), "{}").unwrap();
        std::fs::write(snap.join("unet/diffusion_pytorch_model.safetensors.index.json"),
            r#"{"weight_map":{"a":"diffusion_pytorch_model-00002-of-00002.safetensors","b":"diffusion_pytorch_model-00001-of-00002.safetensors"}}"#).unwrap();
        for n in ["00001", "00002"] {
            std::fs::write(
                snap.join(format!("unet/diffusion_pytorch_model-{n}-of-00002.safetensors")),
                "x",
            )
            .unwrap();
        }
        let hub = HubRepo {
            repo_id: "owner/model".into(),
            revision: "main".into(),
            offline: true,
            cache: Cache::new(home.path().join("hub")),
            api: None,
            listing: None,
        };
        let source = ModelSource::Hub(Box::new(hub));
        assert!(source.file("model_index.json").unwrap().ends_with("model_index.json"));
        let err = source.file("vae/config.json").unwrap_err().to_string();
        assert!(err.contains("vae/config.json"), "{err}");
        let shards = source.safetensors("unet", "diffusion_pytorch_model", None).unwrap();
        assert_eq!(shards.len(), 2);
        assert!(shards[0].ends_with("diffusion_pytorch_model-00001-of-00002.safetensors"));
        let err = source
            .safetensors("unet", "diffusion_pytorch_model", Some("fp16"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("diffusion_pytorch_model.fp16.safetensors"), "{err}");
    }
}
