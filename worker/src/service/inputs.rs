//! What a job brings besides its prompt: its input images, fetched from its
//! own prefix in the object store (the dispatcher stored them there), and
//! its LoRAs, fetched from the registry into an on-disk cache shared by
//! every rank and every job of this worker ([`LoraCache`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use common::lora_record::LoraRecord;
use common::names::Names;
use common::result_store::ResultStore;
use common::rules::{JobLora, StoredImage, ValidJob};
use sha2::{Digest, Sha256};

use super::error::JobError;
use super::retry::{retry, Backoff};
use crate::engine::EngineLora;

/// A job's decoded inputs.
#[derive(Debug, Default)]
pub struct JobInputs {
    pub image: Option<Arc<image::RgbImage>>,
    pub mask: Option<Arc<image::GrayImage>>,
}

async fn fetch(store: &ResultStore, stored: &StoredImage, backoff: Backoff) -> Result<Vec<u8>, JobError> {
    retry(backoff, "fetching an input image", || store.get(&stored.key))
        .await?
        .ok_or_else(|| {
            JobError::Poison(format!(
                "the job's input `{}` is not in the object store (was the job deleted?)",
                stored.key
            ))
        })
}

fn check_size<P: image::Pixel>(
    what: &str,
    stored: &StoredImage,
    image: &image::ImageBuffer<P, Vec<P::Subpixel>>,
) -> Result<(), JobError> {
    if image.dimensions() != (stored.width, stored.height) {
        return Err(JobError::Poison(format!(
            "the job's {what} `{}` is {}×{}, its message says {}×{}",
            stored.key,
            image.width(),
            image.height(),
            stored.width,
            stored.height
        )));
    }
    Ok(())
}

/// Fetches and decodes the job's image and mask.
pub async fn fetch_images(store: &ResultStore, job: &ValidJob, backoff: Backoff) -> Result<JobInputs, JobError> {
    let mut inputs = JobInputs::default();
    let undecodable = |key: &str, e: image::ImageError| JobError::Poison(format!("the job's input `{key}`: {e}"));
    if let Some(stored) = &job.image {
        let bytes = fetch(store, stored, backoff).await?;
        let image = sdxl::image_processor::decode_rgb(&bytes).map_err(|e| undecodable(&stored.key, e))?;
        check_size("image", stored, &image)?;
        inputs.image = Some(Arc::new(image));
    }
    if let Some(stored) = &job.mask {
        let bytes = fetch(store, stored, backoff).await?;
        let mask = sdxl::image_processor::decode_mask(&bytes).map_err(|e| undecodable(&stored.key, e))?;
        check_size("mask", stored, &mask)?;
        inputs.mask = Some(Arc::new(mask));
    }
    Ok(inputs)
}

/// LoRA files by sha256 in one directory (`{sha256}.safetensors`), at most
/// `max_bytes` in all: the least recently used go first (a file's mtime is
/// its last use). One fetch at a time, so that two jobs never download the
/// same file twice.
pub struct LoraCache {
    dir: PathBuf,
    max_bytes: u64,
    lock: tokio::sync::Mutex<()>,
}

impl LoraCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(LoraCache {
            dir,
            max_bytes,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The local files of a job's LoRAs, downloaded where missing. A LoRA the
    /// job did not pin (published without the dispatcher) is pinned to the
    /// registry's current record.
    pub async fn fetch_all(
        &self,
        store: &ResultStore,
        loras: &[JobLora],
        backoff: Backoff,
    ) -> Result<Vec<EngineLora>, JobError> {
        let _one_at_a_time = self.lock.lock().await;
        let mut out = Vec::with_capacity(loras.len());
        for lora in loras {
            let sha256 = match &lora.sha256 {
                Some(sha) => sha.clone(),
                None => self.current_sha(store, &lora.name, backoff).await?,
            };
            let path = self.dir.join(format!("{sha256}.safetensors"));
            if path.is_file() {
                touch(&path);
            } else {
                self.download(store, &lora.name, &sha256, &path, backoff).await?;
            }
            out.push(EngineLora {
                id: sha256,
                path,
                scale: lora.scale,
            });
        }
        let keep: Vec<&Path> = out.iter().map(|l| l.path.as_path()).collect();
        self.evict(&keep);
        Ok(out)
    }

    async fn current_sha(&self, store: &ResultStore, name: &str, backoff: Backoff) -> Result<String, JobError> {
        let key = Names::lora_record_object(name);
        let json = retry(backoff, "reading a LoRA record", || store.get(&key))
            .await?
            .ok_or_else(|| JobError::Poison(format!("LoRA `{name}` is not in the registry")))?;
        let record: LoraRecord = serde_json::from_slice(&json)
            .map_err(|e| JobError::Poison(format!("LoRA `{name}`'s record `{key}` is unreadable: {e}")))?;
        Ok(record.sha256)
    }

    async fn download(
        &self,
        store: &ResultStore,
        name: &str,
        sha256: &str,
        path: &Path,
        backoff: Backoff,
    ) -> Result<(), JobError> {
        let key = Names::lora_object(name);
        let bytes = retry(backoff, "downloading a LoRA", || store.get(&key))
            .await?
            .ok_or_else(|| JobError::Poison(format!("LoRA `{name}` is no longer in the registry")))?;
        let got: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        if got != sha256 {
            return Err(JobError::Poison(format!(
                "LoRA `{name}` in the registry is not the file this job was accepted with \
                 (its sha256 is {got}, the job's {sha256}): it was replaced since; submit the job again"
            )));
        }
        let dir = self.dir.clone();
        let path = path.to_path_buf();
        let bytes_len = bytes.len();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // Written aside and renamed: a crash never leaves half a file under the final name.
            let tmp = tempfile::NamedTempFile::new_in(&dir)?;
            std::fs::write(tmp.path(), &bytes)?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        })
        .await
        .map_err(|e| JobError::Transient(format!("writing the LoRA cache: {e}")))?
        .map_err(|e| JobError::Transient(format!("writing LoRA `{name}` to {}: {e}", self.dir.display())))?;
        tracing::info!(name, sha256, bytes = bytes_len, "LoRA downloaded into the cache");
        Ok(())
    }

    /// Removes the least recently used files until the cache fits, never
    /// one of `keep` (the running job's).
    fn evict(&self, keep: &[&Path]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if keep.contains(&path.as_path()) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    total -= len;
                    tracing::info!(path = %path.display(), bytes = len, "LoRA evicted from the cache");
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not evict a LoRA"),
            }
        }
    }
}

/// Marks a cached file used now.
fn touch(path: &Path) {
    let now = std::fs::File::options()
        .append(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = now {
        tracing::warn!(path = %path.display(), error = %e, "could not mark a cached LoRA used");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn eviction_drops_the_least_recently_used_and_keeps_the_running_job_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LoraCache::new(dir.path().to_path_buf(), 250).unwrap();
        let file = |name: &str, age_s: u64| {
            let path = dir.path().join(format!("{name}.safetensors"));
            std::fs::write(&path, [0u8; 100]).unwrap();
            let when = SystemTime::now() - Duration::from_secs(age_s);
            std::fs::File::options()
                .append(true)
                .open(&path)
                .unwrap()
                .set_modified(when)
                .unwrap();
            path
        };
        let oldest = file("a", 300);
        let old = file("b", 200);
        let new = file("c", 100);
        let kept = file("d", 400);
        cache.evict(&[kept.as_path()]);
        assert!(!oldest.exists() && !old.exists(), "the two least recently used go");
        assert!(new.exists() && kept.exists());
        touch(&new);
        assert!(std::fs::metadata(&new).unwrap().modified().unwrap() > SystemTime::now() - Duration::from_secs(5));
    }
}
