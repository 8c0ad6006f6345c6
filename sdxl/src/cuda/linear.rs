//! `torch.nn.Linear` on CUDA tensors through cuBLASLt (`gemm.rs`): the
//! product, its bias and an optional residual in one kernel, in f16/bf16 or
//! with FP8 operands (`fp8.rs`). Each function returns `Ok(None)` when
//! cuBLASLt has no algorithm for the case, and the caller takes candle's path.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Result, Storage, StorageRef, Tensor, WithDType};
use half::{bf16, f16};

use super::fp8::{quantize_rows, scale_epilogue, Fp8Activations, Fp8Rows, Fp8Weight};
use super::gemm::{self, Half, Operands, Product};

/// A tensor's device address (of its first element) and its storage guard.
struct Operand<'a> {
    storage: StorageRef<'a>,
    offset: usize,
}

impl<'a> Operand<'a> {
    fn of(t: &'a Tensor) -> Result<Self> {
        if !t.is_contiguous() {
            bail!("cuBLASLt operands must be contiguous")
        }
        let (storage, layout) = t.storage_and_layout();
        if !matches!(&*storage, Storage::Cuda(_)) {
            bail!("cuBLASLt operands live on a CUDA device")
        }
        Ok(Operand {
            offset: layout.start_offset(),
            storage,
        })
    }

    fn cuda(&self) -> &CudaStorage {
        match &*self.storage {
            Storage::Cuda(s) => s,
            _ => unreachable!("checked in Operand::of"),
        }
    }

    /// The address of the first element, as `T`.
    fn ptr<T: CudaDType + DeviceRepr>(&self, dev: &CudaDevice) -> Result<u64> {
        let stream = dev.cuda_stream();
        let slice = self.cuda().as_cuda_slice::<T>()?;
        let (base, _sync) = slice.device_ptr(&stream);
        Ok(base + (self.offset * std::mem::size_of::<T>()) as u64)
    }
}

/// `xs · weightᵀ (+ bias) (+ residual)` for f16/bf16 `xs` `[…, in]` and
/// `weight` `[out, in]`, through cuBLASLt with the adds in its epilogue.
pub fn linear(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    match xs.dtype() {
        DType::F16 => linear_as::<f16>(xs, weight, bias, residual, Operands::F16),
        DType::BF16 => linear_as::<bf16>(xs, weight, bias, residual, Operands::Bf16),
        _ => Ok(None),
    }
}

/// The output's shape (`dims` with its last dimension `out`) and the input
/// width, after checking that the bias and residual fit it.
fn shapes(
    dims: &[usize],
    dtype: DType,
    out: usize,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<(Vec<usize>, usize)> {
    let mut dims = dims.to_vec();
    let Some(last) = dims.last_mut() else {
        bail!("linear of a scalar")
    };
    let k = *last;
    *last = out;
    if let Some(b) = bias {
        if b.dims() != [out] || b.dtype() != dtype {
            bail!("bias {:?} {:?} for {out} outputs of {dtype:?}", b.dims(), b.dtype())
        }
    }
    if let Some(r) = residual {
        if r.dims() != dims.as_slice() || r.dtype() != dtype {
            bail!("residual {:?} {:?} for an output of {dims:?}", r.dims(), r.dtype())
        }
    }
    Ok((dims, k))
}

fn linear_as<T: CudaDType + DeviceRepr + WithDType>(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    operands: Operands,
) -> Result<Option<Tensor>> {
    let (out, k_w) = weight.dims2()?;
    let (dims, k) = shapes(xs.dims(), xs.dtype(), out, bias, residual)?;
    if k != k_w || weight.dtype() != xs.dtype() {
        bail!(
            "linear: input {:?} for a weight {:?} {:?}",
            xs.dims(),
            weight.dims(),
            weight.dtype()
        )
    }
    let xs = xs.contiguous()?;
    let weight = weight.contiguous()?;
    let tokens = xs.elem_count() / k.max(1);
    let x = Operand::of(&xs)?;
    let dev = x.cuda().device().clone();
    let wt = Operand::of(&weight)?;
    let b = bias.map(Operand::of).transpose()?;
    let r = residual.map(Operand::of).transpose()?;
    let y: CudaSlice<T> = unsafe { dev.alloc::<T>(tokens * out)? };
    let stream = dev.cuda_stream();
    let (y_ptr, y_sync) = y.device_ptr(&stream);
    let product = Product {
        operands,
        m: out,
        n: tokens,
        k,
        a: wt.ptr::<T>(&dev)?,
        b: x.ptr::<T>(&dev)?,
        d: y_ptr,
        bias: b.as_ref().map(|b| b.ptr::<T>(&dev)).transpose()?,
        residual: r.as_ref().map(|r| r.ptr::<T>(&dev)).transpose()?,
        scales: None,
    };
    // SAFETY: every pointer is a live, contiguous buffer of the size
    // `product` describes, held (by the guards above) until it is enqueued;
    // candle frees buffers in stream order, after the product has run.
    let ran = unsafe { gemm::run(&dev, &product)? };
    drop(y_sync);
    if !ran {
        return Ok(None);
    }
    Ok(Some(wrap(y, dev, dims)))
}

fn wrap<T: CudaDType>(y: CudaSlice<T>, dev: CudaDevice, dims: Vec<usize>) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(y, dev)),
        dims,
        BackpropOp::none(),
        false,
    )
}

/// [`linear`] with e4m3 operands: `xs` quantized per token, `weight` per
/// output channel (see `fp8.rs`); the result in `xs`'s type.
pub fn fp8_linear(
    xs: &Tensor,
    weight: &Fp8Weight,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    match xs.dtype() {
        DType::F16 => fp8_linear_as::<f16>(xs, weight, bias, residual, Half::F16),
        DType::BF16 => fp8_linear_as::<bf16>(xs, weight, bias, residual, Half::Bf16),
        _ => Ok(None),
    }
}

fn fp8_linear_as<T: CudaDType + DeviceRepr + WithDType>(
    xs: &Tensor,
    weight: &Fp8Weight,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    half: Half,
) -> Result<Option<Tensor>> {
    let (dims, k) = shapes(xs.dims(), xs.dtype(), weight.rows, bias, residual)?;
    if k != weight.k {
        bail!("FP8 linear: input {:?} for a weight of {} inputs", xs.dims(), weight.k)
    }
    let xs = xs.contiguous()?;
    let tokens = xs.elem_count() / k.max(1);
    let x = Operand::of(&xs)?;
    if x.offset % 8 != 0 {
        // the quantization kernel reads rows 16 bytes at a time
        return Ok(None);
    }
    let dev = x.cuda().device().clone();
    let view = x.cuda().as_cuda_slice::<T>()?.slice(x.offset..);
    let quantized = quantize_rows(&dev, &view, tokens, k)?;
    fp8_product::<T>(&quantized, dims, &dev, weight, bias, residual, half)
}

/// [`fp8_linear`] of an input already quantized by the kernel that made it
/// (`fp8::layer_norm_e4m3`, `fp8::geglu_e4m3`); the result in its type.
pub fn fp8_linear_quantized(
    x: &Fp8Activations,
    weight: &Fp8Weight,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (dims, k) = shapes(&x.dims, x.dtype, weight.rows, bias, residual)?;
    if k != weight.k || x.rows.k != k {
        bail!("FP8 linear: input {:?} for a weight of {} inputs", x.dims, weight.k)
    }
    match x.dtype {
        DType::F16 => fp8_product::<f16>(&x.rows, dims, &x.device, weight, bias, residual, Half::F16),
        DType::BF16 => fp8_product::<bf16>(&x.rows, dims, &x.device, weight, bias, residual, Half::Bf16),
        _ => Ok(None),
    }
}

/// The FP8 product of quantized rows and a quantized weight, with the
/// scales, bias and residual applied; the result (`dims`) in `T`.
fn fp8_product<T: CudaDType + DeviceRepr + WithDType>(
    quantized: &Fp8Rows,
    dims: Vec<usize>,
    dev: &CudaDevice,
    weight: &Fp8Weight,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    half: Half,
) -> Result<Option<Tensor>> {
    let (out, k, tokens) = (weight.rows, weight.k, quantized.rows);
    let dev = dev.clone();
    let b = bias.map(Operand::of).transpose()?;
    let r = residual.map(Operand::of).transpose()?;
    let bias_ptr = b.as_ref().map(|b| b.ptr::<T>(&dev)).transpose()?;
    let residual_ptr = r.as_ref().map(|r| r.ptr::<T>(&dev)).transpose()?;
    // Our epilogue reads them 16 bytes at a time.
    if [bias_ptr, residual_ptr].iter().flatten().any(|p| p % 16 != 0) {
        return Ok(None);
    }
    let stream = dev.cuda_stream();
    let (wq, _g1) = weight.codes.device_ptr(&stream);
    let (ws, _g2) = weight.scales.device_ptr(&stream);
    let (xq, _g3) = quantized.codes.device_ptr(&stream);
    let (xsc, _g4) = quantized.scales.device_ptr(&stream);
    let y: CudaSlice<T> = unsafe { dev.alloc::<T>(tokens * out)? };
    let (y_ptr, y_sync) = y.device_ptr(&stream);
    let scaled = Product {
        operands: Operands::Fp8Scaled { half },
        m: out,
        n: tokens,
        k,
        a: wq,
        b: xq,
        d: y_ptr,
        bias: bias_ptr,
        residual: residual_ptr,
        scales: Some((ws, xsc)),
    };
    // SAFETY: as in `linear_as`; the codes and scales live until this returns.
    if unsafe { gemm::run(&dev, &scaled)? } {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| tracing::info!("FP8 products: cuBLASLt applies the per-channel and per-token scales"));
        drop(y_sync);
        return Ok(Some(wrap(y, dev, dims)));
    }
    // This cuBLASLt cannot apply the scale vectors: the raw product in bf16,
    // then one pass that scales it and adds the bias and residual.
    let raw: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(tokens * out)? };
    let (raw_ptr, raw_sync) = raw.device_ptr(&stream);
    let plain = Product {
        operands: Operands::Fp8Raw,
        bias: None,
        residual: None,
        scales: None,
        d: raw_ptr,
        ..scaled
    };
    // SAFETY: as above.
    let ran = unsafe { gemm::run(&dev, &plain)? };
    drop(raw_sync);
    if !ran {
        return Ok(None);
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::info!("FP8 products: this cuBLASLt has no outer-vector scaling here; our epilogue applies the scales")
    });
    scale_epilogue::<T>(
        &dev,
        &raw,
        &weight.scales,
        &quantized.scales,
        bias_ptr,
        residual_ptr,
        y_ptr,
        (tokens, out),
    )?;
    drop(y_sync);
    Ok(Some(wrap(y, dev, dims)))
}
