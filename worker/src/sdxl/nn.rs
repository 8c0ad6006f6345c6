//! Small building blocks shared by the SDXL models: activations by their
//! config names, layer constructors with diffusers' defaults, and attention.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

/// An activation function as configs name it (`silu`, `gelu`, `quick_gelu`, `relu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// The exact (erf) GELU, as `torch.nn.functional.gelu`.
    Gelu,
    /// CLIP's `x * sigmoid(1.702 x)`.
    QuickGelu,
    Relu,
}

impl Activation {
    /// Parses a config value; `None` for names this port does not implement.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "quick_gelu" => Some(Self::QuickGelu),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    pub const NAMES: &'static [&'static str] = &["silu", "swish", "gelu", "quick_gelu", "relu"];
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => candle_nn::ops::silu(xs),
            Self::Gelu => xs.gelu_erf(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Relu => xs.relu(),
        }
    }
}

/// A `kernel`×`kernel` convolution with "same" padding, stride 1.
pub fn conv2d_same(c_in: usize, c_out: usize, kernel: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: (kernel - 1) / 2,
        ..Default::default()
    };
    candle_nn::conv2d(c_in, c_out, kernel, cfg, vb)
}

/// Like [`conv2d_same`] without a bias (TAESD's block skips and convs).
pub fn conv2d_same_no_bias(c_in: usize, c_out: usize, kernel: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: (kernel - 1) / 2,
        ..Default::default()
    };
    candle_nn::conv2d_no_bias(c_in, c_out, kernel, cfg, vb)
}

/// Multi-head scaled dot-product attention over `[batch, tokens, heads*dim]`
/// inputs, returning the same layout. Softmax runs in f32 for half types.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n_q, inner) = q.dims3()?;
    let n_kv = k.dim(1)?;
    let head_dim = inner / heads;
    let split =
        |t: &Tensor, n: usize| -> Result<Tensor> { t.reshape((b, n, heads, head_dim))?.transpose(1, 2)?.contiguous() };
    let (q, k, v) = (split(q, n_q)?, split(k, n_kv)?, split(v, n_kv)?);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let dtype = q.dtype();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let probs = match dtype {
        DType::F16 | DType::BF16 => candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?,
        _ => candle_nn::ops::softmax_last_dim(&scores)?,
    };
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n_q, inner))
}

/// Adds a causal mask (no token attends to later ones) for CLIP's text encoder.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let head_dim = inner / heads;
    let split = |t: &Tensor| -> Result<Tensor> { t.reshape((b, n, heads, head_dim))?.transpose(1, 2)?.contiguous() };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (n, n), q.device())?;
    let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(q.dtype())?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, inner))
}
