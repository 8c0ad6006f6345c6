//! FP8 (e4m3) operands for the UNet's linear layers: weights quantized once
//! with one scale per output channel, activations quantized per call with
//! one scale per token (both `amax / 448`, e4m3's largest finite value), as
//! TensorRT's and MLPerf's FP8 SDXL quantize the same layers; the products
//! run on Hopper's FP8 tensor cores through cuBLASLt (`gemm.rs`).
//!
//! Per-token activation scales rather than one per tensor: the scale comes
//! out of the same single pass over each row that quantizes it (no global
//! reduction first), and a token with small values keeps its precision.
//! It also lets the kernel that makes a product's input quantize it as it
//! goes, since it holds a row at a time anyway: [`layer_norm_e4m3`] and
//! [`geglu_e4m3`] write the codes and scales that [`quantize_rows`] would
//! make of their stored output, without storing it (the `quant` path,
//! opt-in until `worker check-kernels` has passed it on a GPU).
//! The attention's output and the projections' inputs are still quantized
//! in a pass of their own.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{bail, DType, Result, Storage, Tensor, WithDType};
use half::{bf16, f16};

use super::kernels::{aligned, suffix, view, w};
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

/// A linear layer's input already in e4m3, one scale per token, as the
/// kernel that produced it wrote it (layer norm, GEGLU): the rows of a
/// `dims` tensor of type `dtype` (`[…, k]`), whose product comes back in
/// that type.
#[derive(Debug)]
pub struct Fp8Activations {
    pub rows: Fp8Rows,
    pub dims: Vec<usize>,
    pub dtype: DType,
    pub device: CudaDevice,
}

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
    Ok(Arc::new(quantize_tensor(weight)?))
}

/// Quantizes each row of `xs` (`[…, k]`, f16 or bf16, on CUDA, `k` a
/// multiple of 8) with a scale of its own.
pub fn quantize_tensor(xs: &Tensor) -> Result<Fp8Rows> {
    let k = xs.dims().last().copied().unwrap_or(0);
    if k == 0 || !k.is_multiple_of(8) {
        bail!(
            "FP8 rows need a last dimension that is a multiple of 8, got {:?}",
            xs.dims()
        )
    }
    let rows = xs.elem_count() / k;
    let xs = xs.contiguous()?;
    let (storage, layout) = xs.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        bail!("FP8 rows are quantized on a CUDA device")
    };
    if !layout.start_offset().is_multiple_of(8) {
        bail!("FP8 rows are read 16 bytes at a time: the tensor must start on a 16-byte boundary")
    }
    let dev = s.device().clone();
    match xs.dtype() {
        DType::F16 => quantize_rows(&dev, &s.as_cuda_slice::<f16>()?.slice(layout.start_offset()..), rows, k),
        DType::BF16 => quantize_rows(
            &dev,
            &s.as_cuda_slice::<bf16>()?.slice(layout.start_offset()..),
            rows,
            k,
        ),
        other => bail!("FP8 rows from {other:?}: only f16 and bf16"),
    }
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

/// Whether `t` is an f16/bf16 CUDA tensor the fused kernels can read 16
/// bytes at a time (contiguous, on a 16-byte boundary).
fn aligned_cuda(t: &Tensor) -> bool {
    t.device().is_cuda() && matches!(t.dtype(), DType::F16 | DType::BF16) && aligned(t)
}

/// `torch.nn.LayerNorm` over the last dimension of `xs`, quantized per
/// token for an FP8 product: the codes and scales that [`quantize_rows`]
/// makes of the layer norm kernel's output, in one pass that never stores
/// that output. `None` where the fused kernel does not apply (the last
/// dimension over 2048 or not a multiple of 16, f32, unaligned operands).
pub fn layer_norm_e4m3(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Fp8Activations>> {
    let n = xs.dims().last().copied().unwrap_or(0);
    let xs = xs.contiguous()?;
    if n == 0 || n > 2048 || !n.is_multiple_of(16) || weight.dims() != [n] || bias.dims() != [n] {
        return Ok(None);
    }
    if ![&xs, weight, bias]
        .iter()
        .all(|t| aligned_cuda(t) && t.dtype() == xs.dtype())
    {
        return Ok(None);
    }
    let rows = xs.elem_count() / n;
    match xs.dtype() {
        DType::F16 => layer_norm_e4m3_as::<f16>(&xs, weight, bias, eps as f32, rows, n).map(Some),
        DType::BF16 => layer_norm_e4m3_as::<bf16>(&xs, weight, bias, eps as f32, rows, n).map(Some),
        _ => Ok(None),
    }
}

fn layer_norm_e4m3_as<T: CudaDType + DeviceRepr + WithDType>(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
    rows: usize,
    n: usize,
) -> Result<Fp8Activations> {
    let ((x, xl), (g, gl), (b, bl)) = (
        xs.storage_and_layout(),
        weight.storage_and_layout(),
        bias.storage_and_layout(),
    );
    let x = cuda_storage(&x)?;
    let dev = x.device().clone();
    let (xv, gv, bv) = (
        view::<T>(x, xl)?,
        view::<T>(cuda_storage(&g)?, gl)?,
        view::<T>(cuda_storage(&b)?, bl)?,
    );
    let mut codes: CudaSlice<u8> = unsafe { dev.alloc::<u8>(rows * n)? };
    let mut scales: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows)? };
    let func = kernel(&dev, Module::Fp8, &format!("layer_norm_e4m3_{}", suffix(T::DTYPE)?))?;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, n_i) = (rows as i64, n as i32);
    let mut builder = func.builder();
    builder
        .arg(&xv)
        .arg(&gv)
        .arg(&bv)
        .arg(&mut codes)
        .arg(&mut scales)
        .arg(&rows_i)
        .arg(&n_i)
        .arg(&eps);
    w(unsafe { builder.launch(cfg) })?;
    Ok(Fp8Activations {
        rows: Fp8Rows {
            codes,
            scales,
            rows,
            k: n,
        },
        dims: xs.dims().to_vec(),
        dtype: xs.dtype(),
        device: dev,
    })
}

/// diffusers' GEGLU (`x · gelu(gate)` over the two halves of `h`'s last
/// dimension), quantized per token for an FP8 product: the codes and scales
/// that [`quantize_rows`] makes of the GEGLU kernel's output, without storing
/// that output. `None` where the fused kernel does not apply (a half not a
/// multiple of 16, f32, an unaligned `h`).
pub fn geglu_e4m3(h: &Tensor) -> Result<Option<Fp8Activations>> {
    let last = h.dims().last().copied().unwrap_or(0);
    let inner = last / 2;
    let h = h.contiguous()?;
    if inner == 0 || !inner.is_multiple_of(16) || !aligned_cuda(&h) {
        return Ok(None);
    }
    let rows = h.elem_count() / last;
    if rows > i32::MAX as usize {
        // one block per row: past CUDA's largest grid
        return Ok(None);
    }
    match h.dtype() {
        DType::F16 => geglu_e4m3_as::<f16>(&h, rows, inner).map(Some),
        DType::BF16 => geglu_e4m3_as::<bf16>(&h, rows, inner).map(Some),
        _ => Ok(None),
    }
}

fn geglu_e4m3_as<T: CudaDType + DeviceRepr + WithDType>(
    h: &Tensor,
    rows: usize,
    inner: usize,
) -> Result<Fp8Activations> {
    let (storage, layout) = h.storage_and_layout();
    let storage = cuda_storage(&storage)?;
    let dev = storage.device().clone();
    let hv = view::<T>(storage, layout)?;
    let mut codes: CudaSlice<u8> = unsafe { dev.alloc::<u8>(rows * inner)? };
    let mut scales: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows)? };
    let func = kernel(&dev, Module::Fp8, &format!("geglu_e4m3_{}", suffix(T::DTYPE)?))?;
    // one block per row; 8-element vectors spread over up to 8 warps
    let threads = (inner / 8).next_multiple_of(32).clamp(32, 256);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let inner_i = inner as i32;
    let mut builder = func.builder();
    builder.arg(&hv).arg(&mut codes).arg(&mut scales).arg(&inner_i);
    w(unsafe { builder.launch(cfg) })?;
    let mut dims = h.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = inner;
    }
    Ok(Fp8Activations {
        rows: Fp8Rows {
            codes,
            scales,
            rows,
            k: inner,
        },
        dims,
        dtype: h.dtype(),
        device: dev,
    })
}

fn cuda_storage(s: &Storage) -> Result<&candle_core::CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("the fused FP8 kernels run on a CUDA device"),
    }
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
