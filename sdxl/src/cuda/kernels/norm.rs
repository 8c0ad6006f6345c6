//! Group norm (with an optional pre-norm bias), on NCHW or channels-last
//! storage, and layer norm (`kernels/sdxl.cu`).

use std::ops::Deref;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

use super::super::module::{kernel, Module};
use super::super::op::{CudaOp, Elem, Launch3, OnCuda};
use super::{channels_last, suffix, view, w};

/// diffusers' `GroupNorm` on `[b, c, …]`, followed by SiLU when `silu`;
/// statistics in f32 whatever the storage type. A channels-last input (see
/// [`channels_last`]) gives a channels-last output; any other is made
/// contiguous first and gives a contiguous one.
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
    let nhwc = channels_last(xs) && nhwc_supports(xs, groups);
    let xs = if nhwc { xs.clone() } else { xs.contiguous()? };
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
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    if nhwc {
        // the [b, h, w, c] view is contiguous
        let y = xs
            .permute((0, 2, 3, 1))?
            .apply_op3_no_bwd(&weight, &bias, &OnCuda(GroupNormNhwc(op)))?;
        return y.permute((0, 3, 1, 2));
    }
    xs.apply_op3_no_bwd(&weight, &bias, &OnCuda(op))
}

/// Whether the channels-last kernels take `xs`: 8-channel vectors, at most
/// 4096 channels (a block holds a pixel's channels), 16-byte aligned.
fn nhwc_supports(xs: &Tensor, groups: usize) -> bool {
    let c = xs.dims().get(1).copied().unwrap_or(0);
    c.is_multiple_of(8)
        && c <= 4096
        && groups > 0
        && c.is_multiple_of(groups)
        && xs.layout().start_offset().is_multiple_of(8)
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

impl GroupNormOp {
    /// The pre-norm bias's storage (read-locked, held while a launch reads
    /// it) and layout.
    fn pre_storage(&self) -> Option<(impl Deref<Target = Storage> + '_, &Layout)> {
        self.pre.as_ref().map(|(p, _)| p.storage_and_layout())
    }

    /// Elements from one sample's pre-norm bias to the next's: `channels`
    /// for a bias per sample, 0 for one shared by all.
    fn pre_stride(&self, channels: usize) -> i64 {
        match self.pre {
            Some((_, true)) => channels as i64,
            _ => 0,
        }
    }
}

/// The pre-norm bias as the kernels read it (`None`: no bias).
fn pre_view<'a, T: Elem, S: Deref<Target = Storage>>(
    held: &'a Option<(S, &Layout)>,
) -> Result<Option<CudaView<'a, T>>> {
    match held {
        None => Ok(None),
        Some((st, l)) => match &**st {
            Storage::Cuda(s) => Ok(Some(view::<T>(s, l)?)),
            _ => bail!("group norm: the pre-norm bias is not on the GPU"),
        },
    }
}

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
        let held = self.pre_storage();
        let pre = pre_view::<T, _>(&held)?;
        let pre_bs = self.pre_stride(channels);
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

/// [`GroupNormOp`] on channels-last storage, seen as a contiguous
/// `[b, h, w, c]`.
struct GroupNormNhwc(GroupNormOp);

impl CudaOp for GroupNormNhwc {
    const NAME: &'static str = "group-norm-nhwc";
}

impl Launch3 for GroupNormNhwc {
    fn launch<T: Elem>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = &self.0;
        let dev = x.device();
        let (batch, h, wd, c) = xl.shape().dims4()?;
        let hw = h * wd;
        let cpg = c / op.groups;
        let tx = c / 8;
        let rows = (256 / tx).max(1);
        // about four blocks per SM of an H100 over the batch, each thread at
        // most 32 pixels
        let target_splits = 528usize.div_ceil(batch.max(1));
        let chunk = rows * hw.div_ceil(rows * target_splits).clamp(1, 32);
        let splits = hw.div_ceil(chunk).max(1);
        let sfx = suffix(T::DTYPE)?;
        let (x, g, b) = (view::<T>(x, xl)?, view::<T>(g, gl)?, view::<T>(b, bl)?);
        let held = op.pre_storage();
        let pre = pre_view::<T, _>(&held)?;
        let pre_bs = op.pre_stride(c);
        let null: u64 = 0;
        let partial: CudaSlice<f32> = unsafe { dev.alloc::<f32>(batch * splits * op.groups * 2)? };
        let stats: CudaSlice<f32> = unsafe { dev.alloc::<f32>(batch * op.groups * 2)? };
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(batch * hw * c)? };
        let tiles = LaunchConfig {
            grid_dim: (splits as u32, batch as u32, 1),
            block_dim: (tx as u32, rows as u32, 1),
            shared_mem_bytes: (2 * rows * c * std::mem::size_of::<f32>()) as u32,
        };
        let (hw_i, c_i, cpg_i, groups_i) = (hw as i64, c as i32, cpg as i32, op.groups as i32);
        let (chunk_i, splits_i, silu) = (chunk as i64, splits as i32, i32::from(op.silu));
        // x, the pre-norm bias (or null) and its per-sample stride lead
        // every kernel's arguments
        macro_rules! push_pre {
            ($builder:expr) => {{
                $builder.arg(&x);
                match &pre {
                    Some(p) => $builder.arg(p),
                    None => $builder.arg(&null),
                };
                $builder.arg(&pre_bs);
            }};
        }
        let stats_fn = kernel(dev, Module::Sdxl, &format!("group_norm_nhwc_stats_{sfx}"))?;
        let mut builder = stats_fn.builder();
        push_pre!(builder);
        builder.arg(&partial).arg(&hw_i).arg(&c_i).arg(&cpg_i).arg(&groups_i);
        builder.arg(&chunk_i).arg(&splits_i);
        w(unsafe { builder.launch(tiles) })?;
        let finalize = kernel(dev, Module::Sdxl, &format!("group_norm_nhwc_finalize_{sfx}"))?;
        let mut builder = finalize.builder();
        push_pre!(builder);
        builder
            .arg(&partial)
            .arg(&stats)
            .arg(&hw_i)
            .arg(&c_i)
            .arg(&cpg_i)
            .arg(&groups_i);
        builder.arg(&splits_i).arg(&op.eps);
        let per_group = LaunchConfig {
            grid_dim: (op.groups as u32, batch as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        w(unsafe { builder.launch(per_group) })?;
        let apply = kernel(dev, Module::Sdxl, &format!("group_norm_nhwc_apply_{sfx}"))?;
        let mut builder = apply.builder();
        push_pre!(builder);
        builder
            .arg(&g)
            .arg(&b)
            .arg(&stats)
            .arg(&out)
            .arg(&hw_i)
            .arg(&c_i)
            .arg(&cpg_i);
        builder.arg(&groups_i).arg(&chunk_i).arg(&silu);
        w(unsafe {
            builder.launch(LaunchConfig {
                shared_mem_bytes: 0,
                ..tiles
            })
        })?;
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
