//! Which accelerated CUDA paths the model code takes, and whether f32
//! convolutions may use TF32. All paths are on by default on CUDA devices; a
//! narrower [`Accel`] is for A/B measurements and for bisecting a numerical
//! difference:
//!
//! - `all` (default) or `none`;
//! - a comma-separated list of `attention` (flash attention, head dim 64),
//!   `conv` (cuDNN convolutions), `norm` (fused group norm + SiLU), `geglu`,
//!   `bias` (in-place bias adds after linear layers and time embeddings),
//!   `lt` (linear layers through cuBLASLt, bias and residual in the GEMM's
//!   epilogue), `nhwc` (the UNet's and VAE decoder's activations stored
//!   channels-last, so cuDNN convolves without transposing; needs `conv`),
//!   `graphs` (the UNet's forward, the TAESD preview decode and the text
//!   encoders, each recorded once per input shape as a CUDA graph and
//!   replayed: one launch instead of ~1,250 for the UNet; `crate::cuda::graph`),
//!   `quant` (with FP8: the per-token quantization of a product's input done
//!   by the layer norm or GEGLU kernel that makes the input, which then is
//!   never stored in the run dtype; `crate::cuda::fp8`), `cat` (two
//!   channels-last images concatenated on their channels by our kernel, 16
//!   bytes a thread, instead of candle's copies: the UNet's skip
//!   connections). `quant` and `cat` are not in `all` until they have run
//!   on a GPU: `all,quant,cat` adds them.
//!
//! Beside the paths, two numerics choices: TF32 for f32 convolutions (on by
//! default, as PyTorch), and FP8 (e4m3) products for the UNet's transformer
//! linear layers (off unless a pipeline is loaded with `Precision::Fp8`:
//! it changes the images, within FP8's precision). And one speed choice:
//! how cuDNN's convolution algorithm is chosen for a new shape ([`ConvAlgo`]).
//!
//! The choice is process-wide: the binaries parse it (the worker reads
//! `SDXL_KERNELS`, `SDXL_TF32` and `SDXL_CONV_ALGO`), put it in [`crate::pipeline::LoadOptions`],
//! and loading a pipeline installs it here. The layers read it on every call,
//! which is one relaxed atomic load. CPU tensors always use candle's ops.

use std::sync::atomic::{AtomicU16, Ordering};

use candle_core::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accel {
    pub attention: bool,
    pub conv: bool,
    pub norm: bool,
    pub geglu: bool,
    pub bias: bool,
    /// Linear layers through cuBLASLt with the bias (and residual) in the
    /// product's epilogue.
    pub lt: bool,
    /// Image activations of the UNet and the VAE decoder kept channels-last
    /// (NHWC storage) between layers, as `torch.channels_last`: cuDNN's
    /// tensor-core convolutions read and write it without transposes, and
    /// the transformers' tokens are a view of it. Takes effect with `conv`.
    pub nhwc: bool,
    /// The UNet's forward (after the time embedding), the TAESD decode and
    /// the text encoders recorded as a CUDA graph per input shape and
    /// replayed ([`crate::cuda::graph`]).
    pub graphs: bool,
    /// With `fp8`: the layer norms and GEGLU write their outputs as the e4m3
    /// codes and per-token scales of the FP8 products that read them.
    pub quant: bool,
    /// Channels-last images concatenated on their channels by our kernel.
    pub cat: bool,
    /// f32 convolutions and matrix products (the VAE under `force_upcast`)
    /// in TF32 on tensor cores: PyTorch's `cudnn.allow_tf32` default for
    /// the convolutions, and `torch.backends.cuda.matmul.allow_tf32` (off
    /// by default in PyTorch) for the products.
    pub tf32: bool,
    /// The UNet's transformer linear layers quantized to e4m3 when they are
    /// built, and their products on FP8 tensor cores.
    pub fp8: bool,
    /// How a convolution shape's cuDNN algorithm is chosen.
    pub conv_algo: ConvAlgo,
}

/// How cuDNN's algorithm for a new convolution shape is chosen. Either way
/// the choice is made once per shape and kept; the outputs agree within the
/// dtype's rounding (algorithms differ in summation order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ConvAlgo {
    /// Time every candidate on the first call's buffers and keep the fastest
    /// (`cudnnFindConvolutionForwardAlgorithmEx`, PyTorch's
    /// `cudnn.benchmark=True`): the fastest steady state, but the first use
    /// of each shape costs tens of milliseconds.
    #[default]
    Find,
    /// cuDNN's own ranking without running anything
    /// (`cudnnGetConvolutionForwardAlgorithm_v7`, PyTorch's default
    /// `cudnn.benchmark=False`): no first-use cost, at times a slower kernel.
    Heuristic,
}

impl ConvAlgo {
    pub const NAMES: [&'static str; 2] = ["find", "heuristic"];

    pub fn name(self) -> &'static str {
        match self {
            ConvAlgo::Find => "find",
            ConvAlgo::Heuristic => "heuristic",
        }
    }

    pub fn from_name(name: &str) -> Option<ConvAlgo> {
        match name {
            "find" => Some(ConvAlgo::Find),
            "heuristic" => Some(ConvAlgo::Heuristic),
            _ => None,
        }
    }
}

impl Default for Accel {
    fn default() -> Self {
        Accel::ALL
    }
}

/// The names `parse` takes, in the order of the bits below.
const PATHS: [&str; 10] = [
    "attention",
    "conv",
    "norm",
    "geglu",
    "bias",
    "lt",
    "nhwc",
    "graphs",
    "quant",
    "cat",
];

impl Accel {
    pub const ALL: Accel = Accel {
        attention: true,
        conv: true,
        norm: true,
        geglu: true,
        bias: true,
        lt: true,
        nhwc: true,
        graphs: true,
        // opt-in until `worker check-kernels` has passed them on a GPU
        quant: false,
        cat: false,
        tf32: true,
        fp8: false,
        conv_algo: ConvAlgo::Find,
    };
    pub const NONE: Accel = Accel {
        attention: false,
        conv: false,
        norm: false,
        geglu: false,
        bias: false,
        lt: false,
        nhwc: false,
        graphs: false,
        quant: false,
        cat: false,
        tf32: true,
        fp8: false,
        conv_algo: ConvAlgo::Find,
    };

    /// Parses a path list (`all`, `none`, or `conv,norm,…`); TF32 stays on,
    /// FP8 off, the convolution algorithms found by timing.
    pub fn parse(value: &str) -> Result<Accel, String> {
        match value.trim() {
            "" | "all" => return Ok(Accel::ALL),
            "none" => return Ok(Accel::NONE),
            _ => {}
        }
        let mut accel = Accel::NONE;
        for name in value.split(',').map(str::trim) {
            match name {
                // `all,quant`: the default paths and an opt-in one
                "all" => {
                    accel = Accel {
                        quant: accel.quant,
                        cat: accel.cat,
                        ..Accel::ALL
                    }
                }
                "attention" => accel.attention = true,
                "conv" => accel.conv = true,
                "norm" => accel.norm = true,
                "geglu" => accel.geglu = true,
                "bias" => accel.bias = true,
                "lt" => accel.lt = true,
                "nhwc" => accel.nhwc = true,
                "graphs" => accel.graphs = true,
                "quant" => accel.quant = true,
                "cat" => accel.cat = true,
                other => {
                    return Err(format!(
                        "unknown kernel path {other:?} (allowed: all, none, or a list of {})",
                        PATHS.join(", ")
                    ))
                }
            }
        }
        Ok(accel)
    }

    fn bits(self) -> u16 {
        [
            self.attention,
            self.conv,
            self.norm,
            self.geglu,
            self.bias,
            self.tf32,
            self.lt,
            self.fp8,
            self.conv_algo == ConvAlgo::Heuristic,
            self.nhwc,
            self.graphs,
            self.quant,
            self.cat,
        ]
        .iter()
        .enumerate()
        .fold(0, |acc, (i, &on)| acc | (u16::from(on) << i))
    }

    fn from_bits(b: u16) -> Accel {
        let on = |i: u8| b & (1 << i) != 0;
        Accel {
            attention: on(0),
            conv: on(1),
            norm: on(2),
            geglu: on(3),
            bias: on(4),
            tf32: on(5),
            lt: on(6),
            fp8: on(7),
            conv_algo: if on(8) { ConvAlgo::Heuristic } else { ConvAlgo::Find },
            nhwc: on(9),
            graphs: on(10),
            quant: on(11),
            cat: on(12),
        }
    }

    /// Makes `self` the paths in force for every model in this process.
    pub fn install(self) {
        CURRENT.store(self.bits(), Ordering::Relaxed);
        // candle's own f32 matrix products (the VAE's attention under
        // `force_upcast`) follow the convolutions' TF32 choice.
        #[cfg(feature = "cuda")]
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(self.tf32);
    }

    /// The paths in force (all of them until a pipeline installs others).
    pub fn current() -> Accel {
        Accel::from_bits(CURRENT.load(Ordering::Relaxed))
    }
}

/// The numerics of the UNet's transformer linear layers (q/k/v, the
/// attention outputs, the feed-forward and the projections in and out):
/// the run dtype, or FP8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Every layer in the run dtype.
    #[default]
    Dtype,
    /// Those layers' weights in e4m3 with a scale per output channel, their
    /// inputs quantized per token, the products on FP8 tensor cores
    /// (compute capability 8.9 or newer); everything else in the run dtype.
    Fp8,
}

impl Precision {
    pub const NAMES: [&'static str; 2] = ["dtype", "fp8"];

    pub fn name(self) -> &'static str {
        match self {
            Precision::Dtype => "dtype",
            Precision::Fp8 => "fp8",
        }
    }

    pub fn from_name(name: &str) -> Option<Precision> {
        match name {
            "dtype" => Some(Precision::Dtype),
            "fp8" => Some(Precision::Fp8),
            _ => None,
        }
    }
}

/// [`Accel::ALL`]'s bits (`bits` is not const; a test keeps the two equal).
const ALL_BITS: u16 = 0b0110_0111_1111;
static CURRENT: AtomicU16 = AtomicU16::new(ALL_BITS);

/// Whether `t` is on a CUDA device and this build has the CUDA paths.
pub fn on_cuda(t: &Tensor) -> bool {
    cfg!(feature = "cuda") && t.device().is_cuda()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_rejects_unknown_names() {
        assert_eq!(Accel::parse("all"), Ok(Accel::ALL));
        assert_eq!(Accel::parse("none"), Ok(Accel::NONE));
        let a = Accel::parse("conv, norm").unwrap();
        assert!(a.conv && a.norm && !a.attention && !a.geglu && !a.bias && !a.lt && !a.nhwc);
        assert!(Accel::ALL.nhwc && Accel::parse("conv,nhwc").unwrap().nhwc);
        assert!(Accel::ALL.graphs && Accel::parse("conv,graphs").unwrap().graphs);
        assert!(!Accel::parse("conv,nhwc").unwrap().graphs);
        assert!(!Accel::ALL.quant && Accel::parse("quant").unwrap().quant && !Accel::parse("conv").unwrap().quant);
        assert_eq!(
            Accel::parse("all,quant"),
            Ok(Accel {
                quant: true,
                ..Accel::ALL
            })
        );
        assert_eq!(Accel::parse("quant, all"), Accel::parse("all,quant"));
        assert!(!Accel::ALL.cat && !Accel::parse("all,quant").unwrap().cat);
        assert_eq!(
            Accel::parse("cat,all,quant"),
            Ok(Accel {
                quant: true,
                cat: true,
                ..Accel::ALL
            })
        );
        assert!(!Accel::ALL.fp8 && Accel::ALL.lt && Accel::parse("lt").unwrap().lt);
        let e = Accel::parse("conv,flash").unwrap_err();
        assert!(
            e.contains("\"flash\"") && e.contains("attention, conv, norm, geglu, bias, lt, nhwc, graphs, quant, cat"),
            "{e}"
        );
    }

    #[test]
    fn bits_round_trip() {
        for a in [
            Accel::ALL,
            Accel::NONE,
            Accel::parse("geglu,bias").unwrap(),
            Accel::parse("all,quant,cat").unwrap(),
        ] {
            assert_eq!(Accel::from_bits(a.bits()), a);
            let no_tf32 = Accel { tf32: false, ..a };
            assert_eq!(Accel::from_bits(no_tf32.bits()), no_tf32);
            let fp8 = Accel { fp8: true, ..a };
            assert_eq!(Accel::from_bits(fp8.bits()), fp8);
            let heuristic = Accel {
                conv_algo: ConvAlgo::Heuristic,
                ..a
            };
            assert_eq!(Accel::from_bits(heuristic.bits()), heuristic);
        }
        for name in ConvAlgo::NAMES {
            assert_eq!(ConvAlgo::from_name(name).map(ConvAlgo::name), Some(name));
        }
        assert_eq!(Accel::from_bits(ALL_BITS), Accel::ALL);
        assert_eq!(Accel::ALL.bits(), ALL_BITS);
    }
}
