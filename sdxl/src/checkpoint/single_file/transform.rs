//! How one diffusers tensor is made from one tensor of a single-file
//! checkpoint: as is, a row block of a fused matrix, a transpose, or a 1×1
//! convolution read as a linear layer.
//!
//! Each transform knows the shape it turns a source shape into (to check a
//! file before loading anything) and the source shape an SGM file stores for
//! a given diffusers shape (to name the expected shape in errors and to build
//! the SGM key list of a config in tests).

use candle_core::{Result, Tensor};

/// The operation from a source tensor to its diffusers tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transform {
    Identity,
    /// Rows `index·n .. (index+1)·n` of a tensor made of `of` equal row
    /// blocks. OpenCLIP fuses q, k and v into one `in_proj_weight`
    /// `[3·hidden, hidden]` (and `in_proj_bias` `[3·hidden]`), in that order;
    /// transformers keeps separate `q_proj`, `k_proj`, `v_proj`.
    Rows {
        index: usize,
        of: usize,
    },
    /// A 2-D transpose. OpenCLIP stores `text_projection` as a matrix applied
    /// as `x @ P` (`[hidden, projection]`); transformers' `Linear` stores
    /// `[projection, hidden]`. For SDXL both sides are 1280, so shapes cannot
    /// catch a missing transpose: it must be applied by key.
    Transpose,
    /// `[out, in, 1, 1]` → `[out, in]`. SGM's VAE mid-block attention uses 1×1
    /// convolutions for q, k, v and `proj_out`; diffusers uses linear layers,
    /// which compute the same thing on the same numbers.
    Conv1x1ToLinear,
}

impl Transform {
    /// The diffusers shape this transform makes from `source`, or `None` when
    /// `source` cannot be transformed so.
    pub fn output_shape(&self, source: &[usize]) -> Option<Vec<usize>> {
        match *self {
            Transform::Identity => Some(source.to_vec()),
            Transform::Rows { index, of } => {
                let (&rows, rest) = source.split_first()?;
                (index < of && rows.is_multiple_of(of)).then(|| {
                    let mut shape = vec![rows / of];
                    shape.extend_from_slice(rest);
                    shape
                })
            }
            Transform::Transpose => match source {
                [a, b] => Some(vec![*b, *a]),
                _ => None,
            },
            Transform::Conv1x1ToLinear => match source {
                [o, i, 1, 1] => Some(vec![*o, *i]),
                _ => None,
            },
        }
    }

    /// The source shape an SGM file stores for the diffusers shape `target`.
    pub fn source_shape(&self, target: &[usize]) -> Vec<usize> {
        match *self {
            Transform::Identity => target.to_vec(),
            Transform::Rows { of, .. } => {
                let mut shape = target.to_vec();
                if let Some(rows) = shape.first_mut() {
                    *rows *= of;
                }
                shape
            }
            Transform::Transpose => target.iter().rev().copied().collect(),
            Transform::Conv1x1ToLinear => {
                let mut shape = target.to_vec();
                shape.extend([1, 1]);
                shape
            }
        }
    }

    /// Applies the transform. The result is contiguous, so it can be used
    /// (and moved between devices) like a freshly loaded tensor.
    pub fn apply(&self, t: &Tensor) -> Result<Tensor> {
        match *self {
            Transform::Identity => Ok(t.clone()),
            Transform::Rows { index, of } => {
                let rows = t.dim(0)?;
                if !rows.is_multiple_of(of) || index >= of {
                    candle_core::bail!("cannot take row block {index} of {of} from {} rows", rows);
                }
                let n = rows / of;
                t.narrow(0, index * n, n)?.contiguous()
            }
            Transform::Transpose => t.t()?.contiguous(),
            Transform::Conv1x1ToLinear => {
                let (o, i, _, _) = t.dims4()?;
                t.reshape((o, i))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shapes_round_trip() {
        let cases = [
            (Transform::Identity, vec![3, 4]),
            (Transform::Rows { index: 2, of: 3 }, vec![16, 8]),
            (Transform::Rows { index: 0, of: 3 }, vec![16]),
            (Transform::Transpose, vec![5, 7]),
            (Transform::Conv1x1ToLinear, vec![6, 6]),
        ];
        for (t, target) in cases {
            let source = t.source_shape(&target);
            assert_eq!(t.output_shape(&source), Some(target), "{t:?}");
        }
        assert_eq!(Transform::Rows { index: 0, of: 3 }.output_shape(&[16, 8]), None);
        assert_eq!(Transform::Conv1x1ToLinear.output_shape(&[6, 6, 3, 3]), None);
    }

    #[test]
    fn rows_and_transpose_pick_the_right_numbers() -> Result<()> {
        let t = Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((6, 2))?;
        let k = Transform::Rows { index: 1, of: 3 }.apply(&t)?;
        assert_eq!(k.to_vec2::<f32>()?, vec![vec![4., 5.], vec![6., 7.]]);
        let tt = Transform::Transpose.apply(&t)?;
        assert_eq!(tt.dims(), &[2, 6]);
        assert_eq!(tt.to_vec2::<f32>()?[1][..3], [1., 3., 5.]);
        let conv = Tensor::arange(0f32, 4., &Device::Cpu)?.reshape((2, 2, 1, 1))?;
        assert_eq!(
            Transform::Conv1x1ToLinear.apply(&conv)?.to_vec2::<f32>()?,
            vec![vec![0., 1.], vec![2., 3.]]
        );
        Ok(())
    }
}
