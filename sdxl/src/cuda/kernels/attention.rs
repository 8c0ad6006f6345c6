//! Flash attention for head dim 64 (`kernels/attention.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};

use super::super::module::{kernel, Module};
use super::super::op::{CudaOp, Elem, Launch3, OnCuda};
use super::{suffix, view, w};

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
    q.apply_op3_no_bwd(k, v, &OnCuda(FlashAttention { heads, warps }))
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

impl CudaOp for FlashAttention {
    const NAME: &'static str = "flash-attention-d64";
    const DTYPES: &'static [DType] = &[DType::F16, DType::BF16];
}

impl Launch3 for FlashAttention {
    fn launch<T: Elem>(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device();
        let name = format!("flash_attn_d64_w{}_{}", self.warps, suffix(T::DTYPE)?);
        let (b, n_q, inner) = ql.shape().dims3()?;
        let n_kv = kl.shape().dims()[1];
        let (qs, ks, vs) = (ql.stride(), kl.stride(), vl.stride());
        let (q, k, v) = (view::<T>(q, ql)?, view::<T>(k, kl)?, view::<T>(v, vl)?);
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(b * n_q * inner)? };
        let func = kernel(dev, Module::Attention, &name)?;
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
