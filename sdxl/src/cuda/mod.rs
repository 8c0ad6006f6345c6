//! The CUDA fast paths of the SDXL building blocks (built with the `cuda`
//! feature): our own kernels (`sdxl/kernels/*.cu`, loaded by `module.rs`),
//! cuDNN convolutions, linear layers through cuBLASLt, in f16/bf16 or
//! FP8, and CUDA graphs of a whole forward pass. `nn.rs` picks them when a tensor lives on a CUDA device and
//! [`crate::accel::Accel`] allows it; the CPU keeps candle's ops.

pub mod conv;
pub mod fp8;
pub mod gemm;
pub mod graph;
pub mod kernels;
pub mod linear;
pub mod module;
pub mod op;
