//! FP8 (e4m3) operands for the UNet's linear layers: weights quantized once
//! with one scale per output channel, activations quantized per call with
//! one scale per token (both `amax / 448`, e4m3's largest finite value), as
//! TensorRT's and MLPerf's FP8 SDXL quantize the same layers; the products
//! run on Hopper's FP8 tensor cores through cuBLASLt (`gemm.rs`).
//!
//! Per-token activation scales rather than one per tensor: the scale comes
//! out of the same single pass over each row that quantizes it (no global
//! reduction first), and a token with small values keeps its precision.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{bail, DType, Result, Storage, Tensor, WithDType};
use half::{bf16, f16};

use super::kernels::{suffix, w};
use super::module::{kernel, Module};

/// e4m3 codes and one f32 scale per row of a `[rows, k]` matrix, on a device.
pub struct Fp8Rows {
    pub codes: CudaSlice<u8>,
    pub scales: CudaSlice<f32>,
    pub rows: usize,
    pub k: usize,
}

impl std::fmt::Debug for Fp8Rows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fp8Rows({}×{} e4m3)", self.rows, self.k)
    }
}

/// A linear layer's weight `[out, in]` in e4m3 with a scale per output channel.
pub type Fp8Weight = Arc<Fp8Rows>;

/// Whether a `[rows, k]` matrix can be quantized and used in an FP8 product:
/// cuBLASLt's FP8 products need K-major operands with 16-byte rows.
pub fn fp8_supports(k: usize, out: usize) -> bool {
    k.is_multiple_of(16) && out.is_multiple_of(8)
}

/// Quantizes `weight` (`[out, in]`, f16 or bf16, on CUDA) per output channel.
pub fn quantize_weight(weight: &Tensor) -> Result<Fp8Weight> {
    let (out, k) = weight.dims2()?;
    if !fp8_supports(k, out) {
        bail!("FP8 weights need in % 16 == 0 and out % 8 == 0, got [{out}, {k}]")
    }
    let weight = weight.contiguous()?;
    let (storage, layout) = weight.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        bail!("FP8 weights are quantized on a CUDA device")
    };
    let dev = s.device().clone();
    let rows = match weight.dtype() {
        DType::F16 => quantize_rows(&dev, &s.as_cuda_slice::<f16>()?.slice(layout.start_offset()..), out, k)?,
        DType::BF16 => quantize_rows(&dev, &s.as_cuda_slice::<bf16>()?.slice(layout.start_offset()..), out, k)?,
        other => bail!("FP8 weights from {other:?}: only f16 and bf16"),
    };
    Ok(Arc::new(rows))
}

/// One warp per row: `amax`, the scale, then the codes.
pub fn quantize_rows<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    rows: usize,
    k: usize,
) -> Result<Fp8Rows> {
    let mut codes: CudaSlice<u8> = unsafe { dev.alloc::<u8>(rows * k)? };
    let mut scales: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows)? };
    let func = kernel(dev, Module::Fp8, &format!("quant_rows_e4m3_{}", suffix(T::DTYPE)?))?;
    let warps_per_block = 8;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(warps_per_block) as u32, 1, 1),
        block_dim: (32 * warps_per_block as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, k_i) = (rows as i64, k as i32);
    let mut builder = func.builder();
    builder.arg(x).arg(&mut codes).arg(&mut scales).arg(&rows_i).arg(&k_i);
    w(unsafe { builder.launch(cfg) })?;
    Ok(Fp8Rows { codes, scales, rows, k })
}

/// `y = d · sw[col] · sx[row] + bias (+ residual)` into `y` (`[rows, cols]`),
/// for products whose scales cuBLASLt could not apply.
#[allow(clippy::too_many_arguments)]
pub fn scale_epilogue<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    d: &CudaSlice<bf16>,
    weight_scales: &CudaSlice<f32>,
    token_scales: &CudaSlice<f32>,
    bias: Option<u64>,
    residual: Option<u64>,
    y: u64,
    (rows, cols): (usize, usize),
) -> Result<()> {
    let func = kernel(dev, Module::Fp8, &format!("fp8_epilogue_{}", suffix(T::DTYPE)?))?;
    let n = rows * cols / 8;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 132 * 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    let (d_ptr, _g1) = d.device_ptr(&stream);
    let (sw, _g2) = weight_scales.device_ptr(&stream);
    let (sx, _g3) = token_scales.device_ptr(&stream);
    let (bias, residual) = (bias.unwrap_or(0), residual.unwrap_or(0));
    let (rows_i, cols_i) = (rows as i64, cols as i32);
    let mut builder = func.builder();
    builder
        .arg(&d_ptr)
        .arg(&sw)
        .arg(&sx)
        .arg(&bias)
        .arg(&residual)
        .arg(&y)
        .arg(&rows_i)
        .arg(&cols_i);
    w(unsafe { builder.launch(cfg) })?;
    Ok(())
}

/// The e4m3 codes back to f32 (`[rows, k]`, on the CPU): what the
/// quantization kept, for tests and `check-kernels`.
pub fn dequantize(rows: &Fp8Rows, dev: &CudaDevice) -> Result<Tensor> {
    let codes = dev.clone_dtoh(&rows.codes)?;
    let scales = dev.clone_dtoh(&rows.scales)?;
    let values: Vec<f32> = codes
        .chunks(rows.k)
        .zip(&scales)
        .flat_map(|(row, &s)| row.iter().map(move |&c| e4m3_to_f32(c) * s))
        .collect();
    Tensor::from_vec(values, (rows.rows, rows.k), &candle_core::Device::Cpu)
}

/// OCP e4m3 (`fn`: no infinities, one NaN pattern per sign): 1 sign,
/// 4 exponent (bias 7), 3 mantissa bits.
pub fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((code >> 3) & 0xf);
    let man = f32::from(code & 0x7);
    if exp == 0xf && code & 0x7 == 0x7 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

#[cfg(test)]
mod tests {
    use super::e4m3_to_f32;

    #[test]
    fn e4m3_decodes_its_landmarks() {
        assert_eq!(e4m3_to_f32(0x7e), 448.0); // largest finite
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert!(e4m3_to_f32(0x7f).is_nan());
        assert_eq!(e4m3_to_f32(0x00), 0.0);
    }
}
