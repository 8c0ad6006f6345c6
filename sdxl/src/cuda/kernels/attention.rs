//! Flash attention for head dim 64 (`kernels/attention.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};

use super::super::module::{kernel_with_shared_bytes, sm90a_attention, Module};
use super::super::op::{CudaOp, Elem, Launch3, OnCuda};
use super::{suffix, view, w};

/// `softmax(q kᵀ / √64) v` per head, for q `[b, n_q, heads·64]` and k, v
/// `[b, n_kv, heads·64]` (rows may be strided, e.g. views of a fused projection);
/// returns `[b, n_q, heads·64]`, contiguous. The block is [`flash_block`]'s.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let block = flash_block(q.device().as_cuda_device()?, k.dim(1)?);
    flash_attention_block(q, k, v, heads, block)
}

/// [`flash_attention`] with the block `block` (one of [`FLASH_BLOCKS`], and
/// [`FlashBlock::runs_on`] the device).
pub fn flash_attention_block(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, block: FlashBlock) -> Result<Tensor> {
    if !FLASH_BLOCKS.contains(&block) {
        bail!("flash attention: a block of {block} (built for {FLASH_BLOCKS:?})")
    }
    if !block.runs_on(q.device().as_cuda_device()?) {
        bail!("flash attention: {block} needs a compute capability 9.0 GPU and a build for it (CUDA_COMPUTE_CAP=90)")
    }
    q.apply_op3_no_bwd(k, v, &OnCuda(FlashAttention { heads, block }))
}

/// A flash-attention block shape, and the instructions its kernel is built on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashBlock {
    /// `kernels/attention.cu` on `mma.sync` (any GPU from compute capability
    /// 8.0): `warps` warps of `tiles` 16-row query tiles each.
    Mma { warps: usize, tiles: usize },
    /// `kernels/attention_sm90.cu` on Hopper's asynchronous `wgmma`
    /// (compute capability 9.0): `groups` warpgroups of 64 query rows each,
    /// K/V tiles of `keys` keys, in the order `schedule`.
    Wgmma {
        groups: usize,
        keys: usize,
        schedule: Schedule,
    },
}

/// How a wgmma block orders its copies, products and softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Every thread copies its share of each K/V tile, a barrier per tile;
    /// the next tile's `q kᵀ` runs during the softmax, `p v` after it.
    Synced,
    /// As `Synced`, with this tile's `p v` also in flight during the next
    /// tile's softmax (FlashAttention-3's intra-warpgroup overlap).
    Pipelined,
    /// One more warp copies the tiles and the warpgroups run unsynchronized
    /// (warp specialization).
    Producer,
}

impl FlashBlock {
    /// Query rows per block.
    pub fn rows(self) -> usize {
        match self {
            FlashBlock::Mma { warps, tiles } => 16 * tiles * warps,
            FlashBlock::Wgmma { groups, .. } => 64 * groups,
        }
    }

    /// Threads per block.
    fn threads(self) -> usize {
        match self {
            FlashBlock::Mma { warps, .. } => 32 * warps,
            FlashBlock::Wgmma { groups, schedule, .. } => {
                128 * groups + if schedule == Schedule::Producer { 32 } else { 0 }
            }
        }
    }

    /// Whether this block's kernel can run on `dev`.
    pub fn runs_on(self, dev: &CudaDevice) -> bool {
        match self {
            FlashBlock::Mma { .. } => true,
            FlashBlock::Wgmma { .. } => sm90a_attention(dev),
        }
    }

    /// Dynamic shared memory per block: the wgmma kernels' K/V stages (3, or
    /// 4 and their two barriers each with the producer), and 1024 bytes to
    /// align them; `smem_bytes` and `ws_smem_bytes` in attention_sm90.cu,
    /// which this must match. The mma.sync kernel's is static.
    fn shared_bytes(self, elem_bytes: usize) -> usize {
        match self {
            FlashBlock::Mma { .. } => 0,
            FlashBlock::Wgmma {
                keys,
                schedule: Schedule::Producer,
                ..
            } => 2 * 4 * keys * 64 * elem_bytes + 2 * 4 * 8 + 1024,
            FlashBlock::Wgmma { keys, .. } => 2 * 3 * keys * 64 * elem_bytes + 1024,
        }
    }

    /// The kernel's module and name, less the dtype suffix: `flash_attn_d64_w8`,
    /// `flash_attn_d64_w4m2` for two tiles a warp, `flash_wgmma_d64_g2n64`,
    /// `flash_wgmma_d64_g1n128p` (pipelined), `flash_wgmma_d64_ws2n64`
    /// (producer warp).
    fn kernel(self) -> (Module, String) {
        match self {
            FlashBlock::Mma { warps, tiles: 1 } => (Module::Attention, format!("flash_attn_d64_w{warps}")),
            FlashBlock::Mma { warps, tiles } => (Module::Attention, format!("flash_attn_d64_w{warps}m{tiles}")),
            FlashBlock::Wgmma { groups, keys, schedule } => {
                let (kind, order) = match schedule {
                    Schedule::Synced => ("g", ""),
                    Schedule::Pipelined => ("g", "p"),
                    Schedule::Producer => ("ws", ""),
                };
                (
                    Module::AttentionSm90,
                    format!("flash_wgmma_d64_{kind}{groups}n{keys}{order}"),
                )
            }
        }
    }

    /// `SDXL_FLASH_BLOCK`'s spelling: `8`, `4`, or `4x2` (4 warps of 2 tiles)
    /// for mma.sync; `wg2` (2 warpgroups, tiles of 64 keys) or `wg2x128`
    /// (tiles of 128 keys) for wgmma, `wg1p`, `wg1x128p` pipelined, `ws2`,
    /// `ws2x128` with a producer warp.
    fn parse(value: &str) -> Option<FlashBlock> {
        let value = value.trim();
        let wgmma = match (value.strip_prefix("ws"), value.strip_prefix("wg")) {
            (Some(rest), _) => Some((rest, Schedule::Producer)),
            (_, Some(rest)) => Some(match rest.strip_suffix('p') {
                Some(rest) => (rest, Schedule::Pipelined),
                None => (rest, Schedule::Synced),
            }),
            _ => None,
        };
        let block = if let Some((rest, schedule)) = wgmma {
            let (groups, keys) = rest.split_once('x').unwrap_or((rest, "64"));
            FlashBlock::Wgmma {
                groups: groups.parse().ok()?,
                keys: keys.parse().ok()?,
                schedule,
            }
        } else {
            let (warps, tiles) = match value.split_once('x') {
                Some((w, t)) => (w.parse().ok()?, t.parse().ok()?),
                None => (value.parse().ok()?, 1),
            };
            FlashBlock::Mma { warps, tiles }
        };
        Some(block).filter(|b| FLASH_BLOCKS.contains(b))
    }
}

impl std::fmt::Display for FlashBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlashBlock::Mma { warps, tiles } => write!(f, "mma.sync, {warps} warps × {} rows", 16 * tiles),
            FlashBlock::Wgmma { groups, keys, schedule } => {
                let schedule = match schedule {
                    Schedule::Synced => "",
                    Schedule::Pipelined => ", pipelined",
                    Schedule::Producer => " and a producer warp",
                };
                write!(f, "wgmma, {groups} warpgroups × 64 rows{schedule}, {keys}-key tiles")
            }
        }
    }
}

/// The blocks the flash kernels are built for: on mma.sync, 4 and 8 warps of
/// 16 query rows and 4 warps of 32 (each K/V fragment read from shared memory
/// serves two products); on wgmma, 1 to 3 warpgroups of 64 rows with tiles of
/// 64 keys, and 1 or 2 with tiles of 128 (253 registers a thread: no room
/// for a third warpgroup), each of 1 or 2 warpgroups also pipelined; with a
/// producer warp, 2 or 3 warpgroups of 64 keys and 2 of 128.
pub const FLASH_BLOCKS: [FlashBlock; 15] = [
    FlashBlock::Mma { warps: 4, tiles: 1 },
    FlashBlock::Mma { warps: 8, tiles: 1 },
    FlashBlock::Mma { warps: 4, tiles: 2 },
    wgmma(1, 64, Schedule::Synced),
    wgmma(2, 64, Schedule::Synced),
    wgmma(3, 64, Schedule::Synced),
    wgmma(1, 128, Schedule::Synced),
    wgmma(2, 128, Schedule::Synced),
    wgmma(1, 64, Schedule::Pipelined),
    wgmma(2, 64, Schedule::Pipelined),
    wgmma(1, 128, Schedule::Pipelined),
    wgmma(2, 128, Schedule::Pipelined),
    wgmma(2, 64, Schedule::Producer),
    wgmma(3, 64, Schedule::Producer),
    wgmma(2, 128, Schedule::Producer),
];

const fn wgmma(groups: usize, keys: usize, schedule: Schedule) -> FlashBlock {
    FlashBlock::Wgmma { groups, keys, schedule }
}

/// The defaults on compute capability 9.0 (see [`flash_block`]): for at least
/// [`LONG_KEYS`] keys, and for fewer. Pipelined: 311 against 296 TFLOP/s at
/// SDXL's 4096 tokens, 199 against 196 at 1024 (one H100, BENCHMARKS.md).
const HOPPER_LONG: FlashBlock = wgmma(1, 128, Schedule::Pipelined);
const HOPPER_SHORT: FlashBlock = wgmma(1, 64, Schedule::Pipelined);
/// Where 128-key tiles start to pay: from SDXL's 64×64 latents' 4096 tokens
/// (measured on an H100, BENCHMARKS.md); its 1024 tokens fill the GPU
/// better with the smaller tiles' twice as many blocks.
const LONG_KEYS: usize = 2048;
/// The default elsewhere: each K/V tile in shared memory serves 128 queries.
const MMA_BLOCK: FlashBlock = FlashBlock::Mma { warps: 8, tiles: 1 };

/// The flash-attention block for `n_kv` keys on `dev`: `SDXL_FLASH_BLOCK`
/// (see [`FlashBlock::parse`]; the older name `SDXL_FLASH_WARPS` is read too)
/// where it names one that runs on `dev`, or two separated by a comma, for
/// at least [`LONG_KEYS`] keys and for fewer (`wg1x128p,wg1p`); else, on
/// compute capability 9.0 and a build for it, wgmma ([`HOPPER_LONG`] or
/// [`HOPPER_SHORT`]), and mma.sync with 8 warps of 16 rows on any other GPU.
pub fn flash_block(dev: &CudaDevice, n_kv: usize) -> FlashBlock {
    static ASKED: std::sync::OnceLock<Option<(FlashBlock, FlashBlock)>> = std::sync::OnceLock::new();
    let asked = ASKED.get_or_init(|| {
        ["SDXL_FLASH_BLOCK", "SDXL_FLASH_WARPS"]
            .iter()
            .find_map(|name| std::env::var(name).ok())
            .and_then(|v| parse_pair(&v))
    });
    let long = n_kv >= LONG_KEYS;
    match *asked {
        Some((block, _)) if long && block.runs_on(dev) => block,
        Some((_, block)) if !long && block.runs_on(dev) => block,
        _ if !sm90a_attention(dev) => MMA_BLOCK,
        _ if long => HOPPER_LONG,
        _ => HOPPER_SHORT,
    }
}

/// `SDXL_FLASH_BLOCK`'s value: one block for every key count, or two (long,
/// short) separated by a comma.
fn parse_pair(value: &str) -> Option<(FlashBlock, FlashBlock)> {
    match value.split_once(',') {
        Some((long, short)) => Some((FlashBlock::parse(long)?, FlashBlock::parse(short)?)),
        None => FlashBlock::parse(value).map(|block| (block, block)),
    }
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
        let (module, kernel_name) = self.block.kernel();
        let name = format!("{kernel_name}_{}", suffix(T::DTYPE)?);
        let (b, n_q, inner) = ql.shape().dims3()?;
        let n_kv = kl.shape().dims()[1];
        let (qs, ks, vs) = (ql.stride(), kl.stride(), vl.stride());
        let (q, k, v) = (view::<T>(q, ql)?, view::<T>(k, kl)?, view::<T>(v, vl)?);
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(b * n_q * inner)? };
        let shared = self.block.shared_bytes(T::DTYPE.size_in_bytes()) as u32;
        let func = kernel_with_shared_bytes(dev, module, &name, shared)?;
        let (n_q_i, n_kv_i) = (n_q as i32, n_kv as i32);
        let (q_bs, q_rs) = (qs[0] as i64, qs[1] as i32);
        let (k_bs, k_rs) = (ks[0] as i64, ks[1] as i32);
        let (v_bs, v_rs) = (vs[0] as i64, vs[1] as i32);
        let (o_bs, o_rs) = ((n_q * inner) as i64, inner as i32);
        let scale_log2 = std::f32::consts::LOG2_E / 8.0; // 1/sqrt(64), in the exp2 domain
        let rows = self.block.rows();
        let cfg = LaunchConfig {
            grid_dim: (n_q.div_ceil(rows) as u32, self.heads as u32, b as u32),
            block_dim: (self.block.threads() as u32, 1, 1),
            shared_mem_bytes: shared,
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
    use super::{parse_pair, wgmma, FlashBlock, Schedule, FLASH_BLOCKS};

    #[test]
    fn block_spellings() {
        assert_eq!(FlashBlock::parse("8"), Some(FLASH_BLOCKS[1]));
        assert_eq!(FlashBlock::parse(" 4x2 "), Some(FLASH_BLOCKS[2]));
        assert_eq!(FlashBlock::parse("4x1"), Some(FLASH_BLOCKS[0]));
        assert_eq!(FlashBlock::parse("wg2"), Some(wgmma(2, 64, Schedule::Synced)));
        assert_eq!(FlashBlock::parse("wg1x128"), Some(wgmma(1, 128, Schedule::Synced)));
        assert_eq!(FlashBlock::parse("wg1x128p"), Some(wgmma(1, 128, Schedule::Pipelined)));
        assert_eq!(FlashBlock::parse("wg2p"), Some(wgmma(2, 64, Schedule::Pipelined)));
        assert_eq!(FlashBlock::parse("ws2x128"), Some(wgmma(2, 128, Schedule::Producer)));
        assert_eq!(FlashBlock::parse("wg3p"), None);
        assert_eq!(FlashBlock::parse("ws2p"), None);
        assert_eq!(FlashBlock::parse("16"), None);
        assert_eq!(FlashBlock::parse("wg4"), None);
        assert_eq!(FlashBlock::parse("wg3x128"), None);
        assert_eq!(FlashBlock::parse("ws1"), None);
        assert_eq!(
            parse_pair("wg1x128p, wg1p"),
            Some((wgmma(1, 128, Schedule::Pipelined), wgmma(1, 64, Schedule::Pipelined)))
        );
        assert_eq!(parse_pair("8"), Some((FLASH_BLOCKS[1], FLASH_BLOCKS[1])));
        assert_eq!(parse_pair("wg1x128p,16"), None);
        assert_eq!(FLASH_BLOCKS[2].kernel().1, "flash_attn_d64_w4m2");
        assert_eq!(FLASH_BLOCKS[1].kernel().1, "flash_attn_d64_w8");
        assert_eq!(FLASH_BLOCKS[4].kernel().1, "flash_wgmma_d64_g2n64");
        assert_eq!(FLASH_BLOCKS[10].kernel().1, "flash_wgmma_d64_g1n128p");
        assert_eq!(FLASH_BLOCKS[14].kernel().1, "flash_wgmma_d64_ws2n128");
        assert_eq!(
            FLASH_BLOCKS.map(FlashBlock::rows),
            [64, 128, 128, 64, 128, 192, 64, 128, 64, 128, 64, 128, 128, 192, 128]
        );
        assert_eq!(
            FLASH_BLOCKS.map(FlashBlock::threads),
            [128, 256, 128, 128, 256, 384, 128, 256, 128, 256, 128, 256, 288, 416, 288]
        );
        // attention_sm90.cu's smem_bytes and ws_smem_bytes: the K/V stages,
        // the producer's barriers, and the alignment slack
        assert_eq!(FLASH_BLOCKS[4].shared_bytes(2), 50176);
        assert_eq!(FLASH_BLOCKS[7].shared_bytes(2), 99328);
        assert_eq!(FLASH_BLOCKS[10].shared_bytes(2), 99328);
        assert_eq!(FLASH_BLOCKS[14].shared_bytes(2), 132160);
        assert_eq!(FLASH_BLOCKS[1].shared_bytes(2), 0);
    }
}
