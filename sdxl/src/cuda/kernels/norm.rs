//! Group norm (with an optional pre-norm bias) and layer norm (`kernels/sdxl.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};

use super::super::module::{kernel, Module};
use super::super::op::{CudaOp, Elem, Launch3, OnCuda};
use super::{suffix, view, w};

/// diffusers' `GroupNorm` on `[b, c, …]` (made contiguous first), followed by
/// SiLU when `silu`; statistics in f32 whatever the storage type.
pub fn group_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    group_norm_biased(xs, None, weight, bias, groups, eps, silu)
}

/// [`group_norm`] of `xs + pre[:, :, None, None]` without that add's own
/// pass over `xs` (the sum is rounded to the storage type, as the add would
/// store it): a convolution's bias `[c]`, or a bias per sample `[b, c]` (the
/// UNet's time embedding added), folded into the norm that reads the output.
pub fn group_norm_biased(
    xs: &Tensor,
    pre: Option<&Tensor>,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    let (b, c) = (xs.dim(0)?, xs.dim(1)?);
    let pre = match pre {
        None => None,
        Some(p) if p.dtype() != xs.dtype() => {
            bail!(
                "group norm: pre-norm bias {:?} for an input of {:?}",
                p.dtype(),
                xs.dtype()
            )
        }
        Some(p) => match p.elem_count() {
            n if n == c => Some((p.contiguous()?, false)),
            n if n == b * c => Some((p.contiguous()?, true)),
            n => bail!("group norm: a pre-norm bias of {n} elements for {c} channels (batch {b})"),
        },
    };
    let op = GroupNormOp {
        groups,
        eps: eps as f32,
        silu,
        pre,
    };
    xs.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &OnCuda(op))
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
    /// The pre-norm bias, contiguous, and whether it is per sample.
    pre: Option<(Tensor, bool)>,
}

/// Elements each block of the group-norm kernels covers (about 32 per thread).
const GN_CHUNK: usize = 8192;

impl CudaOp for GroupNormOp {
    const NAME: &'static str = "group-norm";
}

impl Launch3 for GroupNormOp {
    fn launch<T: Elem>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let dims = xl.shape().dims();
        let (batch, channels) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        if !channels.is_multiple_of(self.groups) {
            bail!(
                "group norm: {channels} channels do not split into {} groups",
                self.groups
            )
        }
        let cpg = channels / self.groups;
        let group_size = cpg * hw;
        let vec = hw.is_multiple_of(8) && xl.start_offset().is_multiple_of(8);
        let splits = group_size.div_ceil(GN_CHUNK).max(1);
        let mut chunk = group_size.div_ceil(splits);
        if vec {
            chunk = chunk.next_multiple_of(8);
        }
        let n_groups = batch * self.groups;
        let sfx = suffix(T::DTYPE)?;
        let (x, g, b) = (view::<T>(x, xl)?, view::<T>(g, gl)?, view::<T>(b, bl)?);
        let pre_guard = self.pre.as_ref().map(|(p, _)| p.storage_and_layout());
        let pre = match &pre_guard {
            None => None,
            Some((st, l)) => match &**st {
                candle_core::Storage::Cuda(s) => Some(view::<T>(s, l)?),
                _ => bail!("group norm: the pre-norm bias is not on the GPU"),
            },
        };
        let pre_bs: i64 = match self.pre {
            Some((_, true)) => channels as i64,
            _ => 0,
        };
        let null: u64 = 0;
        let partial: CudaSlice<f32> = unsafe { dev.alloc::<f32>(n_groups * splits * 2)? };
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(batch * group_size * self.groups)? };
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, n_groups as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (gs, ch, sp) = (group_size as i64, chunk as i64, splits as i32);
        let (groups, cpg, hw, silu, vec) = (
            self.groups as i32,
            cpg as i32,
            hw as i64,
            i32::from(self.silu),
            i32::from(vec),
        );
        let stats = kernel(dev, Module::Sdxl, &format!("group_norm_stats_{sfx}"))?;
        let mut builder = stats.builder();
        builder.arg(&x);
        match &pre {
            Some(p) => builder.arg(p),
            None => builder.arg(&null),
        };
        builder.arg(&pre_bs).arg(&partial).arg(&gs).arg(&ch).arg(&sp);
        builder.arg(&groups).arg(&cpg).arg(&hw).arg(&vec);
        w(unsafe { builder.launch(cfg) })?;
        let apply = kernel(dev, Module::Sdxl, &format!("group_norm_apply_{sfx}"))?;
        let mut builder = apply.builder();
        builder.arg(&x);
        match &pre {
            Some(p) => builder.arg(p),
            None => builder.arg(&null),
        };
        builder.arg(&pre_bs).arg(&g).arg(&b).arg(&partial).arg(&out);
        builder.arg(&gs).arg(&ch).arg(&sp).arg(&groups).arg(&cpg).arg(&hw);
        builder.arg(&self.eps).arg(&silu).arg(&vec);
        w(unsafe { builder.launch(cfg) })?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), xl.shape().clone()))
    }
}

/// `torch.nn.LayerNorm` over the last dimension (≤ 2048 and a multiple of 8,
/// see [`layer_norm_supports`]), statistics in f32.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    xs.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &OnCuda(LayerNormOp { eps: eps as f32 }),
    )
}

pub fn layer_norm_supports(xs: &Tensor) -> bool {
    let n = xs.dims().last().copied().unwrap_or(0);
    n > 0 && n <= 2048 && n.is_multiple_of(8) && matches!(xs.dtype(), DType::F16 | DType::BF16 | DType::F32)
}

struct LayerNormOp {
    eps: f32,
}

impl CudaOp for LayerNormOp {
    const NAME: &'static str = "layer-norm";
}

impl Launch3 for LayerNormOp {
    fn launch<T: Elem>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = *xl.shape().dims().last().expect("rank >= 1");
        let rows = xl.shape().elem_count() / n;
        let (xv, gv, bv) = (view::<T>(x, xl)?, view::<T>(g, gl)?, view::<T>(b, bl)?);
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * n)? };
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = kernel(&dev, Module::Sdxl, &format!("layer_norm_{}", suffix(T::DTYPE)?))?;
        let (rows_i, n_i) = (rows as i64, n as i32);
        let mut builder = func.builder();
        builder
            .arg(&xv)
            .arg(&gv)
            .arg(&bv)
            .arg(&out)
            .arg(&rows_i)
            .arg(&n_i)
            .arg(&self.eps);
        w(unsafe { builder.launch(cfg) })?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}
