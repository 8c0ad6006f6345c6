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
    flash_attention_block(q, k, v, heads, flash_block())
}

/// [`flash_attention`] with the block shape `block` (one of [`FLASH_BLOCKS`]).
pub fn flash_attention_block(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, block: FlashBlock) -> Result<Tensor> {
    if !FLASH_BLOCKS.contains(&block) {
        bail!("flash attention: a block of {block} (built for {FLASH_BLOCKS:?})")
    }
    q.apply_op3_no_bwd(k, v, &OnCuda(FlashAttention { heads, block }))
}

/// A flash-attention block: `warps` warps of `tiles` 16-row query tiles each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashBlock {
    pub warps: usize,
    pub tiles: usize,
}

impl FlashBlock {
    /// Query rows per block.
    pub fn rows(self) -> usize {
        16 * self.tiles * self.warps
    }

    /// The kernel's name part: `w8`, or `w4m2` for two tiles a warp.
    fn kernel(self) -> String {
        match self.tiles {
            1 => format!("w{}", self.warps),
            t => format!("w{}m{t}", self.warps),
        }
    }

    /// `SDXL_FLASH_WARPS`'s spelling: `8`, `4`, or `4x2` (4 warps of 2 tiles).
    fn parse(value: &str) -> Option<FlashBlock> {
        let (warps, tiles) = match value.trim().split_once('x') {
            Some((w, t)) => (w.parse().ok()?, t.parse().ok()?),
            None => (value.trim().parse().ok()?, 1),
        };
        Some(FlashBlock { warps, tiles }).filter(|b| FLASH_BLOCKS.contains(b))
    }
}

impl std::fmt::Display for FlashBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} warps × {} rows", self.warps, 16 * self.tiles)
    }
}

/// The block shapes the flash kernel is built for: 4 and 8 warps of 16
/// query rows, and 4 warps of 32 (each K/V fragment read from shared memory
/// serves two products).
pub const FLASH_BLOCKS: [FlashBlock; 3] = [
    FlashBlock { warps: 4, tiles: 1 },
    FlashBlock { warps: 8, tiles: 1 },
    FlashBlock { warps: 4, tiles: 2 },
];

/// The flash-attention block: `SDXL_FLASH_WARPS` (`4`, `8` or `4x2`), else
/// 8 warps of 16 rows. At 8 each K/V tile in shared memory serves 128
/// queries instead of 64, which halves the kernel's K/V reads; `4x2` serves
/// 128 queries with 4 warps and halves the shared-memory reads per product;
/// 4 is the earlier kernel's shape, kept for comparison on other GPUs.
pub fn flash_block() -> FlashBlock {
    static BLOCK: std::sync::OnceLock<FlashBlock> = std::sync::OnceLock::new();
    *BLOCK.get_or_init(|| {
        std::env::var("SDXL_FLASH_WARPS")
            .ok()
            .and_then(|v| FlashBlock::parse(&v))
            .unwrap_or(FlashBlock { warps: 8, tiles: 1 })
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
    block: FlashBlock,
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
        let name = format!("flash_attn_d64_{}_{}", self.block.kernel(), suffix(T::DTYPE)?);
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
        let rows = self.block.rows();
        let cfg = LaunchConfig {
            grid_dim: (n_q.div_ceil(rows) as u32, self.heads as u32, b as u32),
            block_dim: (32 * self.block.warps as u32, 1, 1),
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

#[cfg(test)]
mod tests {
    use super::{FlashBlock, FLASH_BLOCKS};

    #[test]
    fn block_spellings() {
        assert_eq!(FlashBlock::parse("8"), Some(FLASH_BLOCKS[1]));
        assert_eq!(FlashBlock::parse(" 4x2 "), Some(FLASH_BLOCKS[2]));
        assert_eq!(FlashBlock::parse("4x1"), Some(FLASH_BLOCKS[0]));
        assert_eq!(FlashBlock::parse("16"), None);
        assert_eq!(FLASH_BLOCKS[2].kernel(), "w4m2");
        assert_eq!(FLASH_BLOCKS[1].kernel(), "w8");
        assert_eq!(FLASH_BLOCKS.map(FlashBlock::rows), [64, 128, 128]);
    }
}
