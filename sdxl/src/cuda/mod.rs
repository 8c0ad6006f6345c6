//! The CUDA fast paths of the SDXL building blocks (built with the `cuda`
//! feature): our own kernels in `worker/kernels/sdxl.cu` and cuDNN
//! convolutions. `nn.rs` picks them when a tensor lives on a CUDA device and
//! [`Accel`] allows it; the CPU keeps candle's ops.

pub mod conv;
pub mod kernels;
