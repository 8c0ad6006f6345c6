//! candle custom ops over our own CUDA kernels (`sdxl/kernels/sdxl.cu`,
//! compiled to a fatbin by build.rs, loaded by `module.rs`): flash attention for head dim 64, group norm
//! (+SiLU, and a producing convolution's bias), GEGLU and 2× upsampling. Each op checks the layout it needs and returns a fresh
//! contiguous tensor.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use half::{bf16, f16};

use super::module::{kernel, Module};

pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        other => bail!("no CUDA kernel for {other:?}"),
    })
}

pub(crate) fn view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

pub(crate) fn w<T>(r: std::result::Result<T, impl std::error::Error + Send + Sync + 'static>) -> Result<T> {
    r.map_err(candle_core::Error::wrap)
}

/// `softmax(q kᵀ / √64) v` per head, for q `[b, n_q, heads·64]` and k, v
/// `[b, n_kv, heads·64]` (rows may be strided, e.g. views of a fused projection);
/// returns `[b, n_q, heads·64]`, contiguous.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    flash_attention_warps(q, k, v, heads, flash_warps())
}

/// [`flash_attention`] with `warps` (4 or 8) warps per block, 16 query rows each.
pub fn flash_attention_warps(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, warps: usize) -> Result<Tensor> {
    if !FLASH_WARPS.contains(&warps) {
        bail!("flash attention: {warps} warps per block (built for {FLASH_WARPS:?})")
    }
    q.apply_op3_no_bwd(k, v, &FlashAttention { heads, warps })
}

/// The block sizes the flash kernel is built for, in warps.
pub const FLASH_WARPS: [usize; 2] = [4, 8];

/// Warps per flash-attention block: `SDXL_FLASH_WARPS` (4 or 8), else 8. At 8
/// each K/V tile in shared memory serves 128 queries instead of 64, which
/// halves the kernel's K/V reads; 4 is the earlier kernel's shape, kept for
/// comparison on other GPUs.
pub fn flash_warps() -> usize {
    static WARPS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *WARPS.get_or_init(|| {
        std::env::var("SDXL_FLASH_WARPS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|w| FLASH_WARPS.contains(w))
            .unwrap_or(8)
    })
}

/// Whether [`flash_attention`] can take these inputs as they are laid out.
pub fn flash_attention_supports(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    let ok_dtype = matches!(q.dtype(), DType::F16 | DType::BF16) && k.dtype() == q.dtype() && v.dtype() == q.dtype();
    let inner_ok = |t: &Tensor| t.dims().len() == 3 && t.dims()[2] == heads * 64;
    let aligned = |t: &Tensor| {
        let l = t.layout();
        let s = l.stride();
        s.len() == 3
            && s[2] == 1
            && s[1].is_multiple_of(8)
            && s[0].is_multiple_of(8)
            && l.start_offset().is_multiple_of(8)
    };
    q.device().is_cuda()
        && ok_dtype
        && [q, k, v].iter().all(|t| inner_ok(t) && aligned(t))
        && k.dims()[..2] == v.dims()[..2]
        && q.dims()[0] == k.dims()[0]
}

struct FlashAttention {
    heads: usize,
    warps: usize,
}

impl FlashAttention {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        name: &str,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, n_q, inner) = ql.shape().dims3()?;
        let n_kv = kl.shape().dims()[1];
        let (qs, ks, vs) = (ql.stride(), kl.stride(), vl.stride());
        let (q, k, v) = (view::<T>(q, ql)?, view::<T>(k, kl)?, view::<T>(v, vl)?);
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(b * n_q * inner)? };
        let func = kernel(dev, Module::Sdxl, name)?;
        let (n_q_i, n_kv_i) = (n_q as i32, n_kv as i32);
        let (q_bs, q_rs) = (qs[0] as i64, qs[1] as i32);
        let (k_bs, k_rs) = (ks[0] as i64, ks[1] as i32);
        let (v_bs, v_rs) = (vs[0] as i64, vs[1] as i32);
        let (o_bs, o_rs) = ((n_q * inner) as i64, inner as i32);
        let scale_log2 = std::f32::consts::LOG2_E / 8.0; // 1/sqrt(64), in the exp2 domain
        let rows = 16 * self.warps;
        let cfg = LaunchConfig {
            grid_dim: (n_q.div_ceil(rows) as u32, self.heads as u32, b as u32),
            block_dim: (32 * self.warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(&q).arg(&k).arg(&v).arg(&out);
        builder.arg(&n_q_i).arg(&n_kv_i);
        builder
            .arg(&q_bs)
            .arg(&q_rs)
            .arg(&k_bs)
            .arg(&k_rs)
            .arg(&v_bs)
            .arg(&v_rs)
            .arg(&o_bs)
            .arg(&o_rs);
        builder.arg(&scale_log2);
        w(unsafe { builder.launch(cfg) })?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((b, n_q, inner)),
        ))
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention-d64"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("flash attention runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        match q.dtype() {
            DType::F16 => self.launch::<f16>(
                &dev,
                &format!("flash_attn_d64_w{}_f16", self.warps),
                q,
                ql,
                k,
                kl,
                v,
                vl,
            ),
            DType::BF16 => {
                let name = format!("flash_attn_d64_w{}_bf16", self.warps);
                self.launch::<bf16>(&dev, &name, q, ql, k, kl, v, vl)
            }
            other => bail!("flash attention: no kernel for {other:?}"),
        }
    }
}

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
    xs.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
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
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
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

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("the fused group norm runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        if g.dtype() != x.dtype() || b.dtype() != x.dtype() {
            bail!("group norm: weight {:?} and input {:?} differ", g.dtype(), x.dtype())
        }
        match x.dtype() {
            DType::F16 => self.launch::<f16>(&dev, x, xl, g, gl, b, bl),
            DType::BF16 => self.launch::<bf16>(&dev, x, xl, g, gl, b, bl),
            DType::F32 => self.launch::<f32>(&dev, x, xl, g, gl, b, bl),
            other => bail!("group norm: no kernel for {other:?}"),
        }
    }
}

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

/// Contiguous and starting on a 16-byte boundary (8 elements of any dtype we use).
pub fn aligned(t: &Tensor) -> bool {
    t.is_contiguous() && t.layout().start_offset().is_multiple_of(8)
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

/// `torch.nn.LayerNorm` over the last dimension (≤ 2048 and a multiple of 8,
/// see [`layer_norm_supports`]), statistics in f32.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    xs.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &LayerNormOp { eps: eps as f32 },
    )
}

pub fn layer_norm_supports(xs: &Tensor) -> bool {
    let n = xs.dims().last().copied().unwrap_or(0);
    n > 0 && n <= 2048 && n.is_multiple_of(8) && matches!(xs.dtype(), DType::F16 | DType::BF16 | DType::F32)
}

struct LayerNormOp {
    eps: f32,
}

impl LayerNormOp {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
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

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("the layer-norm kernel runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if g.dtype() != x.dtype() || b.dtype() != x.dtype() {
            bail!("layer norm: weight and input dtypes differ")
        }
        match x.dtype() {
            DType::F16 => self.launch::<f16>(x, xl, g, gl, b, bl),
            DType::BF16 => self.launch::<bf16>(x, xl, g, gl, b, bl),
            DType::F32 => self.launch::<f32>(x, xl, g, gl, b, bl),
            other => bail!("layer norm: no kernel for {other:?}"),
        }
    }
}
