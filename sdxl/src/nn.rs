//! Small building blocks shared by the SDXL models: activations by their
//! config names, convolution and group-norm layers, layer constructors with
//! diffusers' defaults, attention and GEGLU. On CUDA devices these take the
//! fast paths of `sdxl::cuda` (see `accel.rs`); on the CPU, candle's ops.

use candle_core::{DType, Module, Result, Tensor, D};
pub use candle_nn::Conv2dConfig;
use candle_nn::VarBuilder;

#[cfg(feature = "cuda")]
use super::accel::{on_cuda, Accel};

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

/// `torch.nn.Conv2d` (one group, no dilation on the fast path): cuDNN on CUDA
/// devices, candle's convolution elsewhere.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    /// The weight stored channels-last (`KRSC`), made on the first
    /// channels-last input.
    #[cfg(feature = "cuda")]
    weight_nhwc: std::sync::OnceLock<Tensor>,
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fast(xs) {
            let (cfg, w) = (self.inner.config(), self.weight_for(xs)?);
            return match self.inner.bias() {
                Some(b) => super::cuda::conv::conv2d_bias(xs, &w, b, None, false, cfg.padding, cfg.stride),
                None => super::cuda::conv::conv2d(xs, &w, cfg.padding, cfg.stride),
            };
        }
        self.inner.forward(xs)
    }
}

impl Conv2d {
    /// Where the layers keep images channels-last, the weight is kept
    /// channels-last (`KRSC` storage) instead of as loaded: one copy of it,
    /// in the order cuDNN's NHWC kernels read.
    fn new(inner: candle_nn::Conv2d) -> Result<Self> {
        let inner = if layers_keep_channels_last(inner.weight()) && inner.config().groups == 1 {
            candle_nn::Conv2d::new(channels_last(inner.weight())?, inner.bias().cloned(), *inner.config())
        } else {
            inner
        };
        Ok(Self {
            inner,
            #[cfg(feature = "cuda")]
            weight_nhwc: std::sync::OnceLock::new(),
        })
    }

    /// Whether the cuDNN path takes this input (one group, no dilation).
    #[cfg(feature = "cuda")]
    fn fast(&self, xs: &Tensor) -> bool {
        let cfg = self.inner.config();
        on_cuda(xs) && Accel::current().conv && cfg.groups == 1 && cfg.dilation == 1
    }

    /// The weight in the storage order that matches `xs`'s: channels-last
    /// (as built, or made once) for a channels-last input, else as it is.
    #[cfg(feature = "cuda")]
    fn weight_for(&self, xs: &Tensor) -> Result<Tensor> {
        let w = self.inner.weight();
        if !is_channels_last(xs) || is_channels_last(w) {
            return Ok(w.clone());
        }
        if let Some(cl) = self.weight_nhwc.get() {
            return Ok(cl.clone());
        }
        let cl = channels_last(w)?;
        Ok(self.weight_nhwc.get_or_init(|| cl).clone())
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// The convolution without its bias, for a consumer that adds the bias
    /// as it reads the output ([`GroupNorm::forward_act_biased`]).
    pub fn forward_without_bias(&self, xs: &Tensor) -> Result<Tensor> {
        let cfg = self.inner.config();
        #[cfg(feature = "cuda")]
        if self.fast(xs) {
            return super::cuda::conv::conv2d(xs, &self.weight_for(xs)?, cfg.padding, cfg.stride);
        }
        xs.conv2d(self.inner.weight(), cfg.padding, cfg.stride, cfg.dilation, cfg.groups)
    }

    /// `self.forward(xs) + residual`; on CUDA the bias and the residual are
    /// added in one in-place pass over the convolution's output.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.forward_fused(xs, Some(residual), false)
    }

    /// `relu(self.forward(xs) (+ residual))`; on CUDA the bias, the residual
    /// and the ReLU are one in-place pass over the convolution's output.
    pub fn forward_relu(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        self.forward_fused(xs, residual, true)
    }

    fn forward_fused(&self, xs: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fast(xs) {
            if let Some(b) = self.inner.bias() {
                let (cfg, w) = (self.inner.config(), self.weight_for(xs)?);
                return super::cuda::conv::conv2d_bias(xs, &w, b, residual, relu, cfg.padding, cfg.stride);
            }
        }
        let y = self.forward(xs)?;
        let y = match residual {
            Some(r) => (y + r)?,
            None => y,
        };
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }
}

/// Whether a convolution's bias is better left to the group norm that reads
/// its output ([`GroupNorm::forward_act_biased`] with `act`): on CUDA, where
/// the norm's kernel adds it as it reads and the separate pass over the
/// output is saved; elsewhere the bias add stays where it was.
pub fn defer_conv_bias(xs: &Tensor, act: Option<Activation>) -> bool {
    #[cfg(feature = "cuda")]
    {
        let a = Accel::current();
        a.conv && a.bias && group_norm_kernel(xs, act)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (xs, act);
        false
    }
}

/// Whether [`GroupNorm`] with `act` runs as our kernel on `xs` (which also
/// fuses SiLU and a pre-norm bias).
#[cfg(feature = "cuda")]
fn group_norm_kernel(xs: &Tensor, act: Option<Activation>) -> bool {
    on_cuda(xs) && Accel::current().norm && matches!(act, None | Some(Activation::Silu))
}

/// A convolution with a bias, as `torch.nn.Conv2d(c_in, c_out, kernel, …)`.
pub fn conv2d(c_in: usize, c_out: usize, kernel: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::new(candle_nn::conv2d(c_in, c_out, kernel, cfg, vb)?)
}

/// A `kernel`×`kernel` convolution with "same" padding, stride 1.
pub fn conv2d_same(c_in: usize, c_out: usize, kernel: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: (kernel - 1) / 2,
        ..Default::default()
    };
    conv2d(c_in, c_out, kernel, cfg, vb)
}

/// Like [`conv2d_same`] without a bias (TAESD's block skips and convs).
pub fn conv2d_same_no_bias(c_in: usize, c_out: usize, kernel: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: (kernel - 1) / 2,
        ..Default::default()
    };
    Conv2d::new(candle_nn::conv2d_no_bias(c_in, c_out, kernel, cfg, vb)?)
}

/// `torch.nn.Linear`. On CUDA the product runs through cuBLASLt with the
/// bias (and a residual) added in its epilogue, or — for a layer quantized
/// with [`Linear::with_fp8`] — on FP8 tensor cores; otherwise candle's
/// product with the bias added in place (a broadcast add is several times
/// slower).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The weight in e4m3 with a scale per output channel.
    #[cfg(feature = "cuda")]
    fp8: Option<super::cuda::fp8::Fp8Weight>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            #[cfg(feature = "cuda")]
            fp8: None,
        }
    }

    /// One layer computing what `layers` compute from the same input, their
    /// outputs side by side (e.g. q, k and v projections as one product).
    pub fn fuse(layers: &[Linear]) -> Result<Linear> {
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let bias = if layers.iter().all(|l| l.bias.is_none()) {
            None
        } else {
            let biases = layers
                .iter()
                .map(|l| match &l.bias {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(l.weight.dim(0)?, l.weight.dtype(), l.weight.device()),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        };
        Ok(Linear::new(Tensor::cat(&weights, 0)?, bias))
    }

    /// This layer with an FP8 copy of its weight, when FP8 is on
    /// ([`Accel::fp8`](super::accel::Accel)) and the weight is an f16/bf16
    /// CUDA tensor of a shape FP8 products take; otherwise unchanged.
    pub fn with_fp8(self) -> Result<Linear> {
        #[cfg(feature = "cuda")]
        {
            use super::cuda::fp8;
            let (out, k) = self.weight.dims2()?;
            if Accel::current().fp8
                && on_cuda(&self.weight)
                && matches!(self.weight.dtype(), DType::F16 | DType::BF16)
                && fp8::fp8_supports(k, out)
            {
                let q = fp8::quantize_weight(&self.weight)?;
                return Ok(Linear { fp8: Some(q), ..self });
            }
        }
        Ok(self)
    }

    /// `self.forward(xs) + residual`: on CUDA the bias and the residual are
    /// added by the product's epilogue, or in one in-place pass over it.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.fast(xs, Some(residual))? {
            return Ok(y);
        }
        let product = candle_nn::Linear::new(self.weight.clone(), None).forward(xs)?;
        #[cfg(feature = "cuda")]
        if let Some(bias) = &self.bias {
            use super::cuda::kernels::{aligned, bias_add_inplace};
            if on_cuda(xs) && Accel::current().bias && aligned(&product) && aligned(residual) {
                bias_add_inplace(&product, bias, Some(residual), product.rank() - 1)?;
                return Ok(product);
            }
        }
        self.add_bias(product)? + residual
    }

    /// The cuBLASLt paths (FP8 first, when the layer has FP8 weights); `None`
    /// where they do not apply.
    #[cfg(feature = "cuda")]
    fn fast(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
        use super::cuda::linear;
        if !on_cuda(xs) {
            return Ok(None);
        }
        let accel = Accel::current();
        if let (Some(w), true) = (&self.fp8, accel.fp8) {
            if let Some(y) = linear::fp8_linear(xs, w, self.bias.as_ref(), residual)? {
                return Ok(Some(y));
            }
        }
        if accel.lt {
            return linear::linear(xs, &self.weight, self.bias.as_ref(), residual);
        }
        Ok(None)
    }

    fn add_bias(&self, product: Tensor) -> Result<Tensor> {
        let Some(bias) = &self.bias else {
            return Ok(product);
        };
        #[cfg(feature = "cuda")]
        if on_cuda(&product) && Accel::current().bias && super::cuda::kernels::aligned(&product) {
            let last = product.rank() - 1;
            super::cuda::kernels::bias_add_inplace(&product, bias, None, last)?;
            return Ok(product);
        }
        product.broadcast_add(bias)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.fast(xs, None)? {
            return Ok(y);
        }
        self.add_bias(candle_nn::Linear::new(self.weight.clone(), None).forward(xs)?)
    }
}

/// `torch.nn.LayerNorm` with affine weights over the last dimension; our
/// kernel on CUDA, candle's elsewhere.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
}

pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        inner: candle_nn::layer_norm(size, eps, vb)?,
    })
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if on_cuda(xs) && Accel::current().norm && super::cuda::kernels::layer_norm_supports(xs) {
            if let Some(bias) = self.inner.bias() {
                return super::cuda::kernels::layer_norm(xs, self.inner.weight(), bias, self.inner.eps());
            }
        }
        self.inner.forward(xs)
    }
}

pub fn linear(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear(c_in, c_out, vb)?;
    Ok(Linear::new(l.weight().clone(), l.bias().cloned()))
}

pub fn linear_no_bias(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear_no_bias(c_in, c_out, vb)?;
    Ok(Linear::new(l.weight().clone(), None))
}

/// `xs + bias[:, :, None, None]` for a per-sample channel bias `[batch, c]`
/// (the UNet's time embedding); in place on CUDA, where `xs` is a fresh
/// convolution output.
pub fn add_channel_bias(xs: Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_cuda(&xs) && Accel::current().bias && super::cuda::kernels::aligned_like(&xs, &xs) {
        super::cuda::kernels::bias_add_inplace(&xs, bias, None, 1)?;
        return Ok(xs);
    }
    xs.broadcast_add(&bias.unsqueeze(2)?.unsqueeze(3)?)
}

/// `torch.nn.GroupNorm` with affine weights, over `[batch, channels, …]`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("group norm: {channels} channels do not split into {groups} groups")
    }
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?,
        bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?,
        groups,
        eps,
    })
}

impl GroupNorm {
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Self {
        Self {
            weight,
            bias,
            groups,
            eps,
        }
    }

    /// The norm followed by `act` (`None`: the norm alone). On CUDA, SiLU is
    /// fused into the norm's kernel.
    pub fn forward_act(&self, xs: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if group_norm_kernel(xs, act) {
            let silu = act.is_some();
            return super::cuda::kernels::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, silu);
        }
        let normed = self.reference(xs)?;
        match act {
            Some(act) => act.forward(&normed),
            None => Ok(normed),
        }
    }

    /// The norm (and `act`) of `xs + pre`, `pre` a bias per channel `[c]` or
    /// per sample and channel `[b, c]`; on CUDA the norm's kernel adds it as
    /// it reads `xs` (see [`defer_conv_bias`]).
    pub fn forward_act_biased(&self, xs: &Tensor, pre: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if group_norm_kernel(xs, act) {
            let silu = act.is_some();
            return super::cuda::kernels::group_norm_biased(
                xs,
                Some(pre),
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            );
        }
        let mut shape = vec![1; xs.rank()];
        shape[1] = xs.dim(1)?;
        if pre.rank() == 2 {
            shape[0] = pre.dim(0)?;
        }
        self.forward_act(&xs.broadcast_add(&pre.reshape(shape)?)?, act)
    }

    /// candle's ops; statistics in f32 for half types, as PyTorch computes them.
    pub fn reference(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        if dims.len() < 3 {
            candle_core::bail!("group norm: input of rank {} (needs at least 3)", dims.len())
        }
        let (b, c) = (dims[0], dims[1]);
        let per_group = dims[2..].iter().product::<usize>() * c / self.groups;
        let dtype = xs.dtype();
        let x = xs.reshape((b, self.groups, per_group))?.to_dtype(match dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        })?;
        let mean = (x.sum_keepdim(2)? / per_group as f64)?;
        let x = x.broadcast_sub(&mean)?;
        let var = (x.sqr()?.sum_keepdim(2)? / per_group as f64)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut shape = vec![1; dims.len()];
        shape[1] = c;
        x.to_dtype(dtype)?
            .reshape(dims)?
            .broadcast_mul(&self.weight.reshape(shape.clone())?)?
            .broadcast_add(&self.bias.reshape(shape)?)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_act(xs, None)
    }
}

/// Nearest-neighbour upsampling of `[b, c, h, w]` to `(th, tw)`; on CUDA a
/// kernel of ours for the usual doubling (candle's computes a source index
/// per output element and is several times slower).
pub fn upsample_nearest(xs: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_cuda(xs) && Accel::current().conv {
        let (_, _, h, w) = xs.dims4()?;
        if (th, tw) == (2 * h, 2 * w) {
            return super::cuda::kernels::upsample_nearest2x(xs);
        }
    }
    xs.upsample_nearest2d(th, tw)
}

/// Whether `t` is an image `[b, c, h, w]` stored channels-last: the storage
/// of a contiguous `[b, h, w, c]` seen through `permute((0, 3, 1, 2))` (what
/// PyTorch calls `torch.channels_last`). On CUDA the UNet and the VAE decoder
/// keep their activations so ([`to_layer_layout`]): cuDNN then convolves
/// without transposing, and the transformers' `[b, h·w, c]` tokens are a
/// view, not a copy.
pub fn is_channels_last(t: &Tensor) -> bool {
    let Ok((b, c, h, w)) = t.dims4() else {
        return false;
    };
    let s = t.stride();
    s[1] == 1 && s[3] == c && s[2] == w * c && (b == 1 || s[0] == h * w * c)
}

/// `t` `[b, c, h, w]` with channels-last storage: a copy, unless it already is.
pub fn channels_last(t: &Tensor) -> Result<Tensor> {
    if is_channels_last(t) {
        return Ok(t.clone());
    }
    t.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2))
}

/// `xs` `[b, c, h, w]` in the layout the layers keep images in: channels-last
/// where [`layers_keep_channels_last`], else as it is. The UNet and the VAE
/// decoder call it once, after their first convolution; every later layer
/// keeps the layout it is given.
pub fn to_layer_layout(xs: &Tensor) -> Result<Tensor> {
    if layers_keep_channels_last(xs) {
        return channels_last(xs);
    }
    Ok(xs.clone())
}

/// Whether the layers keep an image `xs` channels-last: on CUDA with the
/// `conv` and `nhwc` paths.
pub fn layers_keep_channels_last(xs: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        let a = Accel::current();
        on_cuda(xs) && a.conv && a.nhwc && xs.rank() == 4
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = xs;
        false
    }
}

/// `Tensor::cat(xs, 1)` for images: channels-last inputs give a
/// channels-last output, by a concatenation along the storage's last
/// dimension (candle's `cat` along dimension 1 of such views would copy
/// element by element into yet another layout).
pub fn cat_channels(xs: &[&Tensor]) -> Result<Tensor> {
    if xs.iter().all(|t| is_channels_last(t)) {
        let rows = xs.iter().map(|t| t.permute((0, 2, 3, 1))).collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&rows, 3)?.permute((0, 3, 1, 2));
    }
    Tensor::cat(xs, 1)
}

/// diffusers' GEGLU on the projection's output: `x · gelu(gate)` where
/// `x, gate = h.chunk(2, dim=-1)`.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_cuda(h) && Accel::current().geglu {
        return super::cuda::kernels::geglu(h);
    }
    let half = h.dim(D::Minus1)? / 2;
    let x = h.narrow(D::Minus1, 0, half)?;
    let gate = h.narrow(D::Minus1, half, half)?;
    x * gate.gelu_erf()?
}

/// Multi-head scaled dot-product attention over `[batch, tokens, heads*dim]`
/// inputs, returning the same layout. Softmax runs in f32 for half types.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_cuda(q) && Accel::current().attention && super::cuda::kernels::flash_attention_supports(q, k, v, heads) {
        return super::cuda::kernels::flash_attention(q, k, v, heads);
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{attention_in_blocks, cat_channels, channels_last, is_channels_last};

    fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn channels_last_keeps_the_values_and_changes_the_storage() -> candle_core::Result<()> {
        let x = Tensor::randn(0f32, 1., (2, 5, 3, 4), &Device::Cpu)?;
        assert!(!is_channels_last(&x));
        let cl = channels_last(&x)?;
        assert!(is_channels_last(&cl) && !cl.is_contiguous());
        assert_eq!(cl.dims(), x.dims());
        assert_eq!(max_diff(&cl, &x)?, 0.0);
        // its [b, h, w, c] view is the storage, contiguous
        assert!(cl.permute((0, 2, 3, 1))?.is_contiguous());
        // a slice of rows is not channels-last storage of its own shape
        assert!(!is_channels_last(&cl.narrow(2, 0, 2)?.narrow(3, 0, 2)?));
        Ok(())
    }

    #[test]
    fn cat_channels_of_channels_last_images_equals_cat_and_stays_channels_last() -> candle_core::Result<()> {
        let a = Tensor::randn(0f32, 1., (2, 3, 4, 5), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1., (2, 6, 4, 5), &Device::Cpu)?;
        let want = Tensor::cat(&[&a, &b], 1)?;
        let got = cat_channels(&[&channels_last(&a)?, &channels_last(&b)?])?;
        assert!(is_channels_last(&got));
        assert_eq!(max_diff(&got, &want)?, 0.0);
        // mixed layouts: candle's cat, same numbers
        let mixed = cat_channels(&[&a, &channels_last(&b)?])?;
        assert_eq!(max_diff(&mixed, &want)?, 0.0);
        Ok(())
    }

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
