//! GEGLU, 2× upsampling and in-place bias (+ residual) adds (`kernels/sdxl.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};

use super::super::module::{kernel, Module};
use super::{suffix, view, w};

use super::aligned;

/// GEGLU over the last dimension: `x[.., :n] * gelu_erf(x[.., n:])`.
pub fn geglu(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&Geglu)
}

struct Geglu;

impl Geglu {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        h: &CudaStorage,
        hl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let mut dims = hl.shape().dims().to_vec();
        let last = dims.len() - 1;
        let inner = dims[last] / 2;
        dims[last] = inner;
        let rows: usize = dims[..last].iter().product();
        let h = view::<T>(h, hl)?;
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * inner)? };
        let vec = inner.is_multiple_of(8) && hl.start_offset().is_multiple_of(8);
        let per_thread = if vec { 8 } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: ((rows * inner / per_thread).div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = kernel(dev, Module::Sdxl, &format!("geglu_{}", suffix(T::DTYPE)?))?;
        let (rows_i, inner_i, vec) = (rows as i64, inner as i32, i32::from(vec));
        let mut builder = func.builder();
        builder.arg(&h).arg(&out).arg(&rows_i).arg(&inner_i).arg(&vec);
        w(unsafe { builder.launch(cfg) })?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(dims)))
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("the fused GEGLU runs on CUDA only")
    }

    fn cuda_fwd(&self, h: &CudaStorage, hl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = h.device().clone();
        if hl.shape().dims().last().is_none_or(|d| !d.is_multiple_of(2)) {
            bail!("geglu: the last dimension of {:?} is not even", hl.shape())
        }
        match h.dtype() {
            DType::F16 => self.launch::<f16>(&dev, h, hl),
            DType::BF16 => self.launch::<bf16>(&dev, h, hl),
            DType::F32 => self.launch::<f32>(&dev, h, hl),
            other => bail!("geglu: no kernel for {other:?}"),
        }
    }
}

/// Nearest-neighbour upsampling by 2 of `[…, h, w]` (made contiguous first)
/// into `[…, 2h, 2w]`, as `upsample_nearest2d(2h, 2w)`.
pub fn upsample_nearest2x(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&Upsample2x)
}

struct Upsample2x;

impl Upsample2x {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
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
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = kernel(&dev, Module::Sdxl, &format!("upsample_nearest2x_{}", suffix(T::DTYPE)?))?;
        let (n_i, w_i) = (n as i64, width as i32);
        let mut builder = func.builder();
        builder.arg(&xv).arg(&out).arg(&n_i).arg(&w_i);
        w(unsafe { builder.launch(cfg) })?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
    }
}

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("the 2x upsampling kernel runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F16 => self.launch::<f16>(x, xl),
            DType::BF16 => self.launch::<bf16>(x, xl),
            DType::F32 => self.launch::<f32>(x, xl),
            other => bail!("upsample: no kernel for {other:?}"),
        }
    }
}

/// `xs += bias` in place, broadcast over every dimension but `channel_dim`
/// (and, for a per-sample bias of `batch·c` elements, over the dimensions after
/// it), plus `residual` (same shape) in the same pass when given. `xs` must be
/// contiguous and own its storage: a fresh layer output.
pub fn bias_add_inplace(xs: &Tensor, bias: &Tensor, residual: Option<&Tensor>, channel_dim: usize) -> Result<()> {
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
    let bias = bias.contiguous()?;
    let op = BiasAdd { inner, c, per_sample };
    match residual {
        None => xs.inplace_op2(&bias, &op),
        Some(r) => {
            if r.dims() != dims {
                bail!("residual {:?} for an output of {:?}", r.dims(), dims)
            }
            if !aligned(r) {
                bail!("in-place residual add needs a contiguous, aligned residual")
            }
            xs.inplace_op3(&bias, r, &op)
        }
    }
}

struct BiasAdd {
    inner: usize,
    c: usize,
    per_sample: bool,
}

impl BiasAdd {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
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
        let null: u64 = 0;
        let mut builder = func.builder();
        builder.arg(&mut xv).arg(&b);
        match &res {
            Some(r) => builder.arg(r),
            None => builder.arg(&null),
        };
        builder.arg(&n).arg(&inner).arg(&c).arg(&bias_bs);
        w(unsafe { builder.launch(cfg) })?;
        Ok(())
    }

    fn dispatch(
        &self,
        x: &mut CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        res: Option<(&CudaStorage, &Layout)>,
    ) -> Result<()> {
        if b.dtype() != x.dtype() || res.is_some_and(|(r, _)| r.dtype() != x.dtype()) {
            bail!("bias add: operands of different dtypes")
        }
        match x.dtype() {
            DType::F16 => self.launch::<f16>(x, xl, b, bl, res),
            DType::BF16 => self.launch::<bf16>(x, xl, b, bl, res),
            DType::F32 => self.launch::<f32>(x, xl, b, bl, res),
            other => bail!("bias add: no kernel for {other:?}"),
        }
    }
}

impl candle_core::InplaceOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("the in-place bias add runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &mut CudaStorage, xl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<()> {
        self.dispatch(x, xl, b, bl, None)
    }
}

impl candle_core::InplaceOp3 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-residual-add"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("the in-place bias add runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &mut CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        r: &CudaStorage,
        rl: &Layout,
    ) -> Result<()> {
        self.dispatch(x, xl, b, bl, Some((r, rl)))
    }
}
