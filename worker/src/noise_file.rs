//! `--init-noise FILE`: random draws given by name instead of the seed's
//! (how the tests replay diffusers' own draws). A file names its tensors as
//! the reference folders do — `init`, `step.K`, `vae_sample`,
//! `vae_sample.1` — or holds one tensor of any name, the initial noise.
//! Every name must be a draw the job takes and every shape the job's latent
//! shape; otherwise the error names the tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdxl::noise::Draw;

use crate::args::UsageError;

/// The tensors of a noise file, by name.
#[derive(Debug)]
pub struct NoiseFile {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl NoiseFile {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            UsageError(format!(
                "--init-noise {}: not a readable safetensors file ({})",
                path.display(),
                sdxl::without_backtrace(e)
            ))
        })?;
        Ok(NoiseFile {
            path: path.to_path_buf(),
            tensors: tensors.into_iter().collect(),
        })
    }

    /// The draws the file gives a job whose draws are `draws`, each checked
    /// to be one of them and to have the latent shape `chw` (for an image
    /// of `size` = (width, height)).
    pub fn for_job(
        &self,
        draws: &[Draw],
        (c, h, w): (usize, usize, usize),
        (width, height): (usize, usize),
    ) -> Result<Vec<(Draw, Tensor)>, UsageError> {
        let file = self.path.display();
        let allowed = || draws.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ");
        let named: Vec<(&String, Draw)> = match self.tensors.len() {
            0 => return Err(UsageError(format!("--init-noise {file}: the file holds no tensor"))),
            // One tensor of another name: the initial noise, as before draws had names.
            1 => {
                let (name, _) = self.tensors.iter().next().expect("one tensor");
                vec![(name, Draw::parse(name).unwrap_or(Draw::Init))]
            }
            _ => self
                .tensors
                .keys()
                .map(|name| {
                    Draw::parse(name).map(|d| (name, d)).ok_or_else(|| {
                        UsageError(format!(
                            "--init-noise {file}: tensor `{name}` is not a draw name (this job takes: {})",
                            allowed()
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        named
            .into_iter()
            .map(|(name, draw)| {
                if !draws.contains(&draw) {
                    return Err(UsageError(format!(
                        "--init-noise {file}: tensor `{name}` is not a draw of this job (it takes: {})",
                        allowed()
                    )));
                }
                let t = &self.tensors[name];
                if t.dims() != [1, c, h, w] {
                    return Err(UsageError(format!(
                        "--init-noise {file}: tensor `{name}` has shape {:?}, expected [1, {c}, {h}, {w}] for {width}x{height}",
                        t.dims()
                    )));
                }
                let t = t.to_dtype(DType::F32).map_err(|e| UsageError(format!("--init-noise {file}: {e}")))?;
                Ok((draw, t))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(names: &[&str], shape: (usize, usize, usize, usize)) -> NoiseFile {
        NoiseFile {
            path: "noise.safetensors".into(),
            tensors: names
                .iter()
                .map(|n| (n.to_string(), Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()))
                .collect(),
        }
    }

    const JOB: [Draw; 3] = [Draw::Init, Draw::Step(0), Draw::Step(1)];

    #[test]
    fn names_are_draws_of_the_job() {
        let f = file(&["init", "step.0", "step.1"], (1, 4, 2, 2));
        assert_eq!(f.for_job(&JOB, (4, 2, 2), (16, 16)).unwrap().len(), 3);
        let e = file(&["init", "step.7"], (1, 4, 2, 2))
            .for_job(&JOB, (4, 2, 2), (16, 16))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`step.7`") && e.contains("init, step.0, step.1"), "{e}");
        let e = file(&["init", "latents"], (1, 4, 2, 2))
            .for_job(&JOB, (4, 2, 2), (16, 16))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`latents`"), "{e}");
    }

    #[test]
    fn one_tensor_of_any_name_is_the_initial_noise_and_shapes_are_checked() {
        let f = file(&["init_noise"], (1, 4, 2, 2));
        let given = f.for_job(&JOB, (4, 2, 2), (16, 16)).unwrap();
        assert_eq!(given[0].0, Draw::Init);
        let e = f.for_job(&JOB, (4, 2, 4), (32, 16)).unwrap_err().to_string();
        assert!(
            e.contains("`init_noise` has shape [1, 4, 2, 2], expected [1, 4, 2, 4] for 32x16"),
            "{e}"
        );
    }
}
