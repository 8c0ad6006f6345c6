//! Multi-head scaled dot-product attention over `[batch, tokens, heads·dim]`:
//! our flash kernel on CUDA where it applies, candle's ops elsewhere (a
//! block of queries at a time when the scores would not fit), and CLIP's
//! causal variant.

use candle_core::{DType, Device, Result, Tensor, D};

#[cfg(feature = "cuda")]
use crate::accel::{on_cuda, Accel};

/// Multi-head scaled dot-product attention over `[batch, tokens, heads*dim]`
/// inputs, returning the same layout. Softmax runs in f32 for half types.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_cuda(q) && Accel::current().attention && crate::cuda::kernels::flash_attention_supports(q, k, v, heads) {
        return crate::cuda::kernels::flash_attention(q, k, v, heads);
    }
    attention_candle(q, k, v, heads)
}

/// Above this many attention scores (batch × heads × queries × keys) the
/// scores are made a block of queries at a time. The VAE's mid-block
/// attention at 2048² has 65536² = 2³² scores: one tensor of them overflows
/// the 32-bit element counts of candle's CUDA launches (and takes 16 GiB in
/// f32). Every size up to 1024² stays one block, as before.
const MAX_SCORES_AT_ONCE: usize = 1 << 31;
/// The scores of one block of queries when they are split.
const SCORES_PER_BLOCK: usize = 1 << 28;

/// [`attention`] with candle's ops: heads split out, scores materialised
/// (a block of queries at a time past [`MAX_SCORES_AT_ONCE`]).
pub fn attention_candle(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    attention_in_blocks(q, k, v, heads, MAX_SCORES_AT_ONCE, SCORES_PER_BLOCK)
}

/// How many scores (batch × heads × queries × keys) [`attention_candle`]
/// holds at once for `batch_heads` × `n_q` queries over `n_kv` keys: all of
/// them up to [`MAX_SCORES_AT_ONCE`], else a block of queries. The VAE's
/// memory estimate (`vae::decode_bytes`) counts with it.
pub fn attention_scores_at_once(batch_heads: usize, n_q: usize, n_kv: usize) -> usize {
    batch_heads * n_kv * block_queries(batch_heads * n_kv, n_q, MAX_SCORES_AT_ONCE, SCORES_PER_BLOCK)
}

/// Queries per block: all `n_q` when their scores fit in `max_at_once`, else
/// as many as fit in `per_block` (at least one).
fn block_queries(scores_per_query: usize, n_q: usize, max_at_once: usize, per_block: usize) -> usize {
    if scores_per_query.saturating_mul(n_q) <= max_at_once {
        n_q
    } else {
        (per_block / scores_per_query.max(1)).clamp(1, n_q.max(1))
    }
}

fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    max_at_once: usize,
    per_block: usize,
) -> Result<Tensor> {
    let (b, n_q, inner) = q.dims3()?;
    let n_kv = k.dim(1)?;
    let head_dim = inner / heads;
    let split =
        |t: &Tensor, n: usize| -> Result<Tensor> { t.reshape((b, n, heads, head_dim))?.transpose(1, 2)?.contiguous() };
    let (q, k, v) = (split(q, n_q)?, split(k, n_kv)?, split(v, n_kv)?);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let dtype = q.dtype();
    let kt = k.t()?;
    let block = |q: &Tensor| -> Result<Tensor> {
        let scores = (q.matmul(&kt)? * scale)?;
        let probs = match dtype {
            DType::F16 | DType::BF16 => {
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?
            }
            _ => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        probs.matmul(&v)
    };
    let rows = block_queries(b * heads * n_kv, n_q, max_at_once, per_block);
    let out = if rows >= n_q {
        block(&q)?
    } else {
        let parts = (0..n_q)
            .step_by(rows)
            .map(|start| block(&q.narrow(2, start, rows.min(n_q - start))?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 2)?
    };
    out.transpose(1, 2)?.reshape((b, n_q, inner))
}

/// CLIP's causal mask `[n, n]` in f32: 0 where a token may attend (itself
/// and earlier ones), -inf where it may not (later ones).
pub fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, n), device)
}

/// Attention under `mask` ([`causal_mask`]) for CLIP's text encoder. The
/// mask comes from the caller, so this is a function of device tensors only
/// (a CUDA graph can replay it).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: &Tensor) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let head_dim = inner / heads;
    let split = |t: &Tensor| -> Result<Tensor> { t.reshape((b, n, heads, head_dim))?.transpose(1, 2)?.contiguous() };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?.broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(q.dtype())?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, inner))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::attention_in_blocks;

    #[test]
    fn attention_in_blocks_of_queries_equals_attention_at_once() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, n_q, n_kv, heads, dim) = (2, 37, 29, 3, 8);
        let q = Tensor::randn(0f32, 1., (b, n_q, heads * dim), &dev)?;
        let k = Tensor::randn(0f32, 1., (b, n_kv, heads * dim), &dev)?;
        let v = Tensor::randn(0f32, 1., (b, n_kv, heads * dim), &dev)?;
        let once = attention_in_blocks(&q, &k, &v, heads, usize::MAX, usize::MAX)?;
        // Blocks of 5 queries (the last one shorter), and of a single query.
        for per_block in [5 * b * heads * n_kv, 1] {
            let blocks = attention_in_blocks(&q, &k, &v, heads, 0, per_block)?;
            assert_eq!(blocks.dims(), once.dims());
            let diff = (&blocks - &once)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "blocks of {per_block} scores differ by {diff}");
        }
        Ok(())
    }
}
