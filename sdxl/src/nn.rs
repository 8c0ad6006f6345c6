//! Small building blocks shared by the SDXL models: activations by their
//! config names, convolution and group-norm layers, layer constructors with
//! diffusers' defaults, attention and GEGLU. On CUDA devices these take the
//! fast paths of `sdxl::cuda` (see `accel.rs`); on the CPU, candle's ops.

use candle_core::{DType, Module, Result, Tensor, D};
pub use candle_nn::Conv2dConfig;
use candle_nn::VarBuilder;

#[cfg(feature = "cuda")]
use super::accel::{on_cuda, Accel};
pub use super::layout::{cat_channels, channels_last, is_channels_last, layers_keep_channels_last, to_layer_layout};
pub use super::sdpa::{attention, attention_candle, attention_scores_at_once, causal_attention, causal_mask};

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
    /// The weight with its input channels padded with zeros to a multiple
    /// of 8, where the layers keep images channels-last and it has fewer
    /// (a model's first convolution: latents' 4 channels), for
    /// [`Self::forward_into_layer_layout`].
    #[cfg(feature = "cuda")]
    padded: Option<Tensor>,
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fast(xs) {
            let (cfg, w) = (self.inner.config(), self.inner.weight());
            return match self.inner.bias() {
                Some(b) => super::cuda::conv::conv2d_bias(xs, w, b, None, false, cfg.padding, cfg.stride),
                None => super::cuda::conv::conv2d(xs, w, cfg.padding, cfg.stride),
            };
        }
        self.inner.forward(xs)
    }
}

impl Conv2d {
    /// Where the layers keep images channels-last, the weight is kept
    /// channels-last (`KRSC` storage) instead of as loaded: one copy of it,
    /// in the order cuDNN's NHWC kernels read (an NCHW call makes its own
    /// contiguous copy, and a channels-last call on a weight built otherwise
    /// its KRSC one).
    fn new(inner: candle_nn::Conv2d) -> Result<Self> {
        let keep = layers_keep_channels_last(inner.weight()) && inner.config().groups == 1;
        let inner = if keep {
            candle_nn::Conv2d::new(channels_last(inner.weight())?, inner.bias().cloned(), *inner.config())
        } else {
            inner
        };
        #[cfg(feature = "cuda")]
        let padded = {
            let c = inner.weight().dim(1)?;
            match keep && !c.is_multiple_of(8) {
                true => Some(super::layout::pad_channels_last(inner.weight(), c.next_multiple_of(8))?),
                false => None,
            }
        };
        Ok(Self {
            inner,
            #[cfg(feature = "cuda")]
            padded,
        })
    }

    /// A model's first convolution, whose output the layers then keep in
    /// their layout: `to_layer_layout(self.forward(xs))`. On CUDA, an input
    /// of fewer channels than cuDNN's NHWC kernels read at once (latents' 4)
    /// is padded with zero channels, as the weight was, and convolved NHWC,
    /// which gives the channels-last output directly; NCHW, cuDNN has only a
    /// generic kernel for 4 channels (0.39 ms of an H100 UNet step for
    /// 0.4 GFLOP), and the output then needs a copy to channels-last.
    pub fn forward_into_layer_layout(&self, xs: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(weight) = self
            .padded
            .as_ref()
            .filter(|_| self.fast(xs) && layers_keep_channels_last(xs))
        {
            let cfg = self.inner.config();
            let xs = super::layout::pad_channels_last(xs, weight.dim(1)?)?;
            let y = match self.inner.bias() {
                Some(b) => super::cuda::conv::conv2d_bias(&xs, weight, b, None, false, cfg.padding, cfg.stride)?,
                None => super::cuda::conv::conv2d(&xs, weight, cfg.padding, cfg.stride)?,
            };
            // channels-last already, unless cuDNN fell back to NCHW
            return to_layer_layout(&y);
        }
        to_layer_layout(&self.forward(xs)?)
    }

    /// Whether the cuDNN path takes this input (one group, no dilation).
    #[cfg(feature = "cuda")]
    fn fast(&self, xs: &Tensor) -> bool {
        let cfg = self.inner.config();
        on_cuda(xs) && Accel::current().conv && cfg.groups == 1 && cfg.dilation == 1
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
            return super::cuda::conv::conv2d(xs, self.inner.weight(), cfg.padding, cfg.stride);
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
                let (cfg, w) = (self.inner.config(), self.inner.weight());
                return super::cuda::conv::conv2d_bias(xs, w, b, residual, relu, cfg.padding, cfg.stride);
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

    /// The width of the layer's output.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
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

    /// `self.forward(&norm.forward(xs)?)`. With FP8 weights on CUDA (and the
    /// `quant` path on) the layer norm's kernel quantizes its own output for
    /// the product, which saves storing it and reading it back to quantize.
    pub fn forward_normed(&self, norm: &LayerNorm, xs: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.fp8_fused(|| norm.e4m3(xs), None)? {
            return Ok(y);
        }
        self.forward(&norm.forward(xs)?)
    }

    /// `self.forward_add(&geglu(h)?, residual)`, GEGLU quantizing its own
    /// output for the product as in [`Linear::forward_normed`].
    pub fn forward_geglu_add(&self, h: &Tensor, residual: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.fp8_fused(|| super::cuda::fp8::geglu_e4m3(h), Some(residual))? {
            return Ok(y);
        }
        self.forward_add(&geglu(h)?, residual)
    }

    /// The FP8 product of an input quantized by the kernel that makes it;
    /// `None` where that does not apply (no FP8 weight, FP8 or `quant` off,
    /// no fused kernel for the input, no cuBLASLt algorithm).
    #[cfg(feature = "cuda")]
    fn fp8_fused(
        &self,
        quantize: impl FnOnce() -> Result<Option<super::cuda::fp8::Fp8Activations>>,
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let accel = Accel::current();
        let (Some(w), true, true) = (&self.fp8, accel.fp8, accel.quant) else {
            return Ok(None);
        };
        let Some(x) = quantize()? else {
            return Ok(None);
        };
        super::cuda::linear::fp8_linear_quantized(&x, w, self.bias.as_ref(), residual)
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

impl LayerNorm {
    /// This norm of `xs` in e4m3 with a scale per row, for an FP8 product
    /// (`cuda::fp8::layer_norm_e4m3`); `None` where the fused kernel does not apply.
    #[cfg(feature = "cuda")]
    fn e4m3(&self, xs: &Tensor) -> Result<Option<super::cuda::fp8::Fp8Activations>> {
        match self.inner.bias() {
            Some(bias) if on_cuda(xs) => {
                super::cuda::fp8::layer_norm_e4m3(xs, self.inner.weight(), bias, self.inner.eps())
            }
            _ => Ok(None),
        }
    }
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
