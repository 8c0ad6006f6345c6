//! A memory-mapped single file served to the models under diffusers' names:
//! a candle `SimpleBackend` that resolves each requested diffusers key through
//! the checked [`ComponentMap`] and loads (and transforms) the file's tensor
//! only when the model asks for it.
//!
//! Nothing is copied up front: the file stays mapped, and identity tensors go
//! straight from the mapping to the target device, as with a diffusers folder.

use std::path::Path;
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Error, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::convert::{sgm_to_diffusers, vae_file_to_diffusers};
use super::map::{ComponentMap, SingleFileError, SingleFileMap};
use crate::checkpoint::file::{check_not_pickle, FileError, KeyShapes};
use crate::checkpoint::layout::{Component, ModelLayout, VaePlan};

/// An opened, checked single-file checkpoint.
pub struct SingleFile {
    file: Arc<MmapedSafetensors>,
    map: SingleFileMap,
}

impl std::fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFile")
            .field("map", &self.map)
            .finish_non_exhaustive()
    }
}

impl SingleFile {
    /// Maps the file and checks its keys and shapes against `layout` (see
    /// [`sgm_to_diffusers`] for the errors). Pickles are refused unopened.
    pub fn open(path: &Path, layout: &ModelLayout) -> std::result::Result<Self, SingleFileError> {
        let (file, keys) = map_file(path)?;
        let map = sgm_to_diffusers(keys, layout)?;
        Ok(Self { file, map })
    }

    /// Maps a standalone VAE file (the `--vae` a file without a VAE needs),
    /// in the LDM or the diffusers layout (see [`vae_file_to_diffusers`]).
    /// Only [`Component::Vae`] is served.
    pub fn open_vae(path: &Path, plan: &VaePlan) -> std::result::Result<Self, SingleFileError> {
        let (file, keys) = map_file(path)?;
        let map = vae_file_to_diffusers(keys, plan)?;
        Ok(Self { file, map })
    }

    pub fn map(&self) -> &SingleFileMap {
        &self.map
    }

    /// The backend for `component`; `None` for a VAE the layout left out.
    pub fn backend(&self, component: Component) -> Option<SingleFileBackend> {
        Some(SingleFileBackend {
            file: Arc::clone(&self.file),
            map: Arc::clone(self.map.component(component)?),
        })
    }

    /// A `VarBuilder` over `component`, for the model constructors that today
    /// take one over a diffusers folder's safetensors.
    pub fn var_builder(&self, component: Component, dtype: DType, device: &Device) -> Option<VarBuilder<'static>> {
        let backend: Box<dyn SimpleBackend> = Box::new(self.backend(component)?);
        Some(VarBuilder::from_backend(backend, dtype, device.clone()))
    }
}

/// Memory-maps a safetensors file (pickles refused) and lists its keys.
fn map_file(path: &Path) -> std::result::Result<(Arc<MmapedSafetensors>, KeyShapes), FileError> {
    check_not_pickle(path)?;
    // SAFETY: the mapping is read-only; as for every mmapped checkpoint in
    // candle, the file must not be truncated while it is mapped.
    let file = unsafe { MmapedSafetensors::new(path) }.map_err(|e| FileError::NotSafetensors {
        path: path.display().to_string(),
        message: crate::without_backtrace(e).to_string(),
    })?;
    let keys = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    Ok((Arc::new(file), keys))
}

/// Serves one component's tensors from the mapped file.
#[derive(Clone)]
pub struct SingleFileBackend {
    file: Arc<MmapedSafetensors>,
    map: Arc<ComponentMap>,
}

impl SingleFileBackend {
    /// Loads diffusers' `name`, transformed, on `device`, in the file's dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let entry = self.map.get(name).ok_or_else(|| {
            Error::CannotFindTensor {
                path: format!("{} `{name}`", self.map.component()),
            }
            .bt()
        })?;
        let source = self.file.load(&entry.source, device)?;
        entry.transform.apply(&source)
    }
}

impl SimpleBackend for SingleFileBackend {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = self.load(name, dev)?.to_dtype(dtype)?;
        if tensor.shape() != &s {
            let source = self.map.get(name).map(|m| m.source.as_str()).unwrap_or_default();
            Err(Error::UnexpectedShape {
                msg: format!("shape mismatch for {name} (from `{source}`)"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt())?
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.get(name).is_some()
    }
}
