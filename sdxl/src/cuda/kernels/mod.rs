//! candle custom ops over our own CUDA kernels (`sdxl/kernels/*.cu`,
//! compiled to fatbins by build.rs, loaded by `module.rs`): flash attention
//! for head dim 64, group norm (+SiLU, and a producing convolution's bias),
//! layer norm, GEGLU, bias (+ residual) adds, 2× upsampling and the
//! concatenation of channels-last images. Each op
//! checks the layout it needs; all but the in-place bias add return a fresh
//! tensor: contiguous, or for the ops on images (group norm, upsampling, bias
//! adds) channels-last when the input is (see [`crate::layout::is_channels_last`]).

use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Tensor};

mod attention;
mod elementwise;
mod norm;

pub use attention::{
    flash_attention, flash_attention_block, flash_attention_supports, flash_block, FlashBlock, Schedule, FLASH_BLOCKS,
};
pub use elementwise::{bias_add_act_inplace, bias_add_inplace, cat_channels, geglu, upsample_nearest2x};
pub use norm::{group_norm, group_norm_biased, layer_norm, layer_norm_supports};

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

/// Contiguous and starting on a 16-byte boundary (8 elements of any dtype we use).
pub fn aligned(t: &Tensor) -> bool {
    t.is_contiguous() && t.layout().start_offset().is_multiple_of(8)
}

pub use crate::layout::is_channels_last as channels_last;

/// [`aligned`] for `layout_of`'s layout: channels-last when it is, else contiguous.
pub fn aligned_like(t: &Tensor, layout_of: &Tensor) -> bool {
    if channels_last(layout_of) {
        channels_last(t) && t.layout().start_offset().is_multiple_of(8)
    } else {
        aligned(t)
    }
}
