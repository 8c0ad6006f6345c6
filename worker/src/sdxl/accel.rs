//! Which accelerated CUDA paths the model code takes. All are on by default
//! on CUDA devices; `SDXL_KERNELS` narrows them for A/B measurements and for
//! bisecting a numerical difference:
//!
//! - `all` (default) or `none`;
//! - a comma-separated list of `attention` (flash attention, head dim 64),
//!   `conv` (cuDNN convolutions), `norm` (fused group norm + SiLU), `geglu`,
//!   `bias` (in-place bias adds after linear layers and time embeddings).
//!
//! CPU tensors always use candle's own ops.

use std::sync::OnceLock;

use candle_core::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accel {
    pub attention: bool,
    pub conv: bool,
    pub norm: bool,
    pub geglu: bool,
    pub bias: bool,
}

impl Accel {
    pub const ALL: Accel = Accel {
        attention: true,
        conv: true,
        norm: true,
        geglu: true,
        bias: true,
    };
    pub const NONE: Accel = Accel {
        attention: false,
        conv: false,
        norm: false,
        geglu: false,
        bias: false,
    };

    /// Parses `SDXL_KERNELS`' value.
    pub fn parse(value: &str) -> Result<Accel, String> {
        match value.trim() {
            "" | "all" => return Ok(Accel::ALL),
            "none" => return Ok(Accel::NONE),
            _ => {}
        }
        let mut accel = Accel::NONE;
        for name in value.split(',').map(str::trim) {
            match name {
                "attention" => accel.attention = true,
                "conv" => accel.conv = true,
                "norm" => accel.norm = true,
                "geglu" => accel.geglu = true,
                "bias" => accel.bias = true,
                other => {
                    return Err(format!(
                        "SDXL_KERNELS: unknown path {other:?} (allowed: all, none, or a list of attention, conv, norm, geglu, bias)"
                    ))
                }
            }
        }
        Ok(accel)
    }

    /// The paths in force, read once from `SDXL_KERNELS` (an invalid value
    /// is reported once and treated as `all`).
    pub fn current() -> Accel {
        static CURRENT: OnceLock<Accel> = OnceLock::new();
        *CURRENT.get_or_init(|| match std::env::var("SDXL_KERNELS") {
            Ok(v) => Accel::parse(&v).unwrap_or_else(|e| {
                tracing::warn!("{e}; using all");
                Accel::ALL
            }),
            Err(_) => Accel::ALL,
        })
    }
}

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
        assert!(a.conv && a.norm && !a.attention && !a.geglu && !a.bias);
        let e = Accel::parse("conv,flash").unwrap_err();
        assert!(
            e.contains("\"flash\"") && e.contains("attention, conv, norm, geglu, bias"),
            "{e}"
        );
    }
}
