//! GEGLU, 2× upsampling, the concatenation of channels-last images and
//! in-place bias (+ residual) (+ ReLU) adds (`kernels/sdxl.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::{bail, CudaStorage, Layout, Result, Shape, Tensor};

use super::super::module::{kernel, Module};
use super::super::op::{CudaOp, Elem, Launch1, Launch2, LaunchInPlace, OnCuda};
use super::{aligned, aligned_like, channels_last, suffix, view, w};

/// 256-thread blocks for a grid-stride loop over `items` (one item a
/// thread while the grid lasts, at most 2^20 blocks).
fn grid_stride(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// GEGLU over the last dimension: `x[.., :n] * gelu_erf(x[.., n:])`.
pub fn geglu(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&OnCuda(Geglu))
}

struct Geglu;

impl CudaOp for Geglu {
    const NAME: &'static str = "geglu";
}

impl Launch1 for Geglu {
    fn launch<T: Elem>(&self, h: &CudaStorage, hl: &Layout) -> Result<(CudaStorage, Shape)> {
        if hl.shape().dims().last().is_none_or(|d| !d.is_multiple_of(2)) {
            bail!("geglu: the last dimension of {:?} is not even", hl.shape())
        }
        let dev = h.device();
        let mut dims = hl.shape().dims().to_vec();
        let last = dims.len() - 1;
        let inner = dims[last] / 2;
        dims[last] = inner;
        let rows: usize = dims[..last].iter().product();
        let h = view::<T>(h, hl)?;
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * inner)? };
        let vec = inner.is_multiple_of(8) && hl.start_offset().is_multiple_of(8);
        let per_thread = if vec { 8 } else { 1 };
        let cfg = grid_stride(rows * inner / per_thread);
        let func = kernel(dev, Module::Sdxl, &format!("geglu_{}", suffix(T::DTYPE)?))?;
        let (rows_i, inner_i, vec) = (rows as i64, inner as i32, i32::from(vec));
        let mut builder = func.builder();
        builder.arg(&h).arg(&out).arg(&rows_i).arg(&inner_i).arg(&vec);
        w(unsafe { builder.launch(cfg) })?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(dims)))
    }
}

/// Nearest-neighbour upsampling by 2 of `[…, h, w]` into `[…, 2h, 2w]`, as
/// `upsample_nearest2d(2h, 2w)`. A channels-last image with channels in
/// 8-element vectors stays channels-last; any other input is made
/// contiguous first.
pub fn upsample_nearest2x(xs: &Tensor) -> Result<Tensor> {
    if channels_last(xs) && xs.dim(1)?.is_multiple_of(8) && xs.layout().start_offset().is_multiple_of(8) {
        let y = xs.permute((0, 2, 3, 1))?.apply_op1_no_bwd(&OnCuda(Upsample2xNhwc))?;
        return y.permute((0, 3, 1, 2));
    }
    xs.contiguous()?.apply_op1_no_bwd(&OnCuda(Upsample2x))
}

/// [`Upsample2x`] of channels-last storage, seen as a contiguous `[b, h, w, c]`.
struct Upsample2xNhwc;

impl CudaOp for Upsample2xNhwc {
    const NAME: &'static str = "upsample-nearest-2x-nhwc";
}

impl Launch1 for Upsample2xNhwc {
    fn launch<T: Elem>(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (b, h, wd, c) = xl.shape().dims4()?;
        let n = xl.shape().elem_count();
        let xv = view::<T>(x, xl)?;
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(4 * n)? };
        let nv = n / 8;
        let cfg = grid_stride(nv);
        let func = kernel(
            &dev,
            Module::Sdxl,
            &format!("upsample_nearest2x_nhwc_{}", suffix(T::DTYPE)?),
        )?;
        let (nv_i, w_i, cv_i) = (nv as i64, wd as i32, (c / 8) as i32);
        let mut builder = func.builder();
        builder.arg(&xv).arg(&out).arg(&nv_i).arg(&w_i).arg(&cv_i);
        w(unsafe { builder.launch(cfg) })?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, 2 * h, 2 * wd, c)),
        ))
    }
}

struct Upsample2x;

impl CudaOp for Upsample2x {
    const NAME: &'static str = "upsample-nearest-2x";
}

impl Launch1 for Upsample2x {
    fn launch<T: Elem>(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let mut dims = xl.shape().dims().to_vec();
        let r = dims.len();
        if r < 2 {
            bail!("upsample: input of rank {r} (needs at least 2)")
        }
        let (n, width) = (xl.shape().elem_count(), dims[r - 1]);
        dims[r - 2] *= 2;
        dims[r - 1] *= 2;
        let xv = view::<T>(x, xl)?;
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(4 * n)? };
        let cfg = grid_stride(n);
        let func = kernel(&dev, Module::Sdxl, &format!("upsample_nearest2x_{}", suffix(T::DTYPE)?))?;
        let (n_i, w_i) = (n as i64, width as i32);
        let mut builder = func.builder();
        builder.arg(&xv).arg(&out).arg(&n_i).arg(&w_i);
        w(unsafe { builder.launch(cfg) })?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
    }
}

/// `cat([a, b], 1)` of two channels-last images `[n, c, h, w]` (the same
/// `n`, `h`, `w` and dtype; channels in 8-element vectors, 16-byte aligned):
/// a channels-last image of `ca + cb` channels. `None` where the inputs are
/// not such (the caller then takes candle's cat).
pub fn cat_channels(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let fits = |t: &Tensor| {
        channels_last(t) && t.dim(1).is_ok_and(|c| c.is_multiple_of(8)) && t.layout().start_offset().is_multiple_of(8)
    };
    let (an, _, ah, aw) = a.dims4()?;
    let (bn, _, bh, bw) = b.dims4()?;
    if !fits(a) || !fits(b) || (an, ah, aw) != (bn, bh, bw) || a.dtype() != b.dtype() {
        return Ok(None);
    }
    let rows = |t: &Tensor| t.permute((0, 2, 3, 1));
    let y = rows(a)?.apply_op2_no_bwd(&rows(b)?, &OnCuda(CatChannelsNhwc))?;
    Ok(Some(y.permute((0, 3, 1, 2))?))
}

/// [`cat_channels`] on the `[n, h, w, c]` views of the two images' storage.
struct CatChannelsNhwc;

impl CudaOp for CatChannelsNhwc {
    const NAME: &'static str = "cat-channels-nhwc";
}

impl Launch2 for CatChannelsNhwc {
    fn launch<T: Elem>(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = a.device().clone();
        let (n, h, wd, ca) = al.shape().dims4()?;
        let cb = bl.shape().dims4()?.3;
        let pixels = n * h * wd;
        let (av, bv) = (ca / 8, cb / 8);
        let nv = pixels * (av + bv);
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(nv * 8)? };
        let cfg = grid_stride(nv);
        let func = kernel(&dev, Module::Sdxl, &format!("cat_channels_nhwc_{}", suffix(T::DTYPE)?))?;
        let (av_i, bv_i) = (
            i32::try_from(av).map_err(candle_core::Error::wrap)?,
            i32::try_from(bv).map_err(candle_core::Error::wrap)?,
        );
        let (a, b) = (view::<T>(a, al)?, view::<T>(b, bl)?);
        let nv_i = nv as i64;
        let mut builder = func.builder();
        builder.arg(&a).arg(&b).arg(&out).arg(&nv_i).arg(&av_i).arg(&bv_i);
        w(unsafe { builder.launch(cfg) })?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, h, wd, ca + cb))))
    }
}

/// `xs += bias` in place, broadcast over every dimension but `channel_dim`
/// (and, for a per-sample bias of `batch·c` elements, over the dimensions after
/// it), plus `residual` (same shape) in the same pass when given. `xs` must be
/// contiguous, or a channels-last image with `channel_dim` 1 (the residual
/// then channels-last too), and own its storage: a fresh layer output.
pub fn bias_add_inplace(xs: &Tensor, bias: &Tensor, residual: Option<&Tensor>, channel_dim: usize) -> Result<()> {
    bias_add_act_inplace(xs, bias, residual, channel_dim, false)
}

/// [`bias_add_inplace`], then a ReLU on the sum when `relu`, in the same pass.
pub fn bias_add_act_inplace(
    xs: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    channel_dim: usize,
    relu: bool,
) -> Result<()> {
    if channel_dim == 1 && channels_last(xs) && !xs.is_contiguous() {
        return bias_add_nhwc(xs, bias, residual, relu);
    }
    let dims = xs.dims();
    let c = dims[channel_dim];
    let batch: usize = dims[..channel_dim].iter().product();
    let inner: usize = dims[channel_dim + 1..].iter().product();
    let per_sample = match bias.elem_count() {
        n if n == c => false,
        n if n == batch * c => true,
        n => bail!("bias of {n} elements for {c} channels (batch {batch})"),
    };
    if !aligned(xs) {
        bail!("in-place bias add needs a contiguous, aligned tensor")
    }
    let op = BiasAdd {
        inner,
        c,
        per_sample,
        rows_per_sample: 1,
        relu,
    };
    launch_bias_add(xs, bias, residual, op)
}

/// [`bias_add_inplace`] on a channels-last image: its storage is `[b·h·w, c]`
/// rows, `h·w` of them per sample.
fn bias_add_nhwc(xs: &Tensor, bias: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<()> {
    let (b, c, h, wd) = xs.dims4()?;
    let per_sample = match bias.elem_count() {
        n if n == c => false,
        n if n == b * c => true,
        n => bail!("bias of {n} elements for {c} channels (batch {b})"),
    };
    if !xs.layout().start_offset().is_multiple_of(8) {
        bail!("in-place bias add needs an aligned tensor")
    }
    if let Some(r) = residual {
        if !aligned_like(r, xs) {
            bail!("in-place residual add on a channels-last output needs an aligned channels-last residual")
        }
    }
    let op = BiasAdd {
        inner: 1,
        c,
        per_sample,
        rows_per_sample: h * wd,
        relu,
    };
    let rows = |t: &Tensor| t.permute((0, 2, 3, 1));
    let residual = residual.map(rows).transpose()?;
    launch_bias_add(&rows(xs)?, bias, residual.as_ref(), op)
}

fn launch_bias_add(xs: &Tensor, bias: &Tensor, residual: Option<&Tensor>, op: BiasAdd) -> Result<()> {
    let bias = bias.contiguous()?;
    match residual {
        None => xs.inplace_op2(&bias, &OnCuda(op)),
        Some(r) => {
            if r.dims() != xs.dims() {
                bail!("residual {:?} for an output of {:?}", r.dims(), xs.dims())
            }
            if !aligned(r) {
                bail!("in-place residual add needs a contiguous, aligned residual")
            }
            xs.inplace_op3(&bias, r, &OnCuda(op))
        }
    }
}

struct BiasAdd {
    inner: usize,
    c: usize,
    per_sample: bool,
    /// Rows of `c` that share a sample's bias (`h·w` on channels-last storage).
    rows_per_sample: usize,
    /// A ReLU on the sum.
    relu: bool,
}

impl CudaOp for BiasAdd {
    const NAME: &'static str = "bias-add";
}

impl LaunchInPlace for BiasAdd {
    fn launch<T: Elem>(
        &self,
        x: &mut CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        res: Option<(&CudaStorage, &Layout)>,
    ) -> Result<()> {
        let dev = x.device().clone();
        let n = xl.shape().elem_count();
        let b = view::<T>(b, bl)?;
        let res = res.map(|(r, rl)| view::<T>(r, rl)).transpose()?;
        let mut xv = x.as_cuda_slice_mut::<T>()?.slice_mut(xl.start_offset()..);
        let cfg = LaunchConfig {
            grid_dim: ((n / 8).div_ceil(256).clamp(1, 132 * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = kernel(&dev, Module::Sdxl, &format!("bias_add_{}", suffix(T::DTYPE)?))?;
        let (n, inner, c) = (n as i64, self.inner as i64, self.c as i32);
        let bias_bs: i64 = if self.per_sample { self.c as i64 } else { 0 };
        let rps = self.rows_per_sample.max(1) as i64;
        let null: u64 = 0;
        let mut builder = func.builder();
        builder.arg(&mut xv).arg(&b);
        match &res {
            Some(r) => builder.arg(r),
            None => builder.arg(&null),
        };
        let relu = i32::from(self.relu);
        builder.arg(&n).arg(&inner).arg(&c).arg(&bias_bs).arg(&rps).arg(&relu);
        w(unsafe { builder.launch(cfg) })?;
        Ok(())
    }
}
