//! Linear layers through cuBLASLt, in the run dtype and in FP8, against an
//! f32 reference (`worker check-kernels`).

use candle_core::{DType, Device, Tensor};

use super::{errors, median_ms, CheckKernelsArgs, Row};

/// Linear layers through cuBLASLt (the bias and the residual in the GEMM's
/// epilogue), in the run dtype and with FP8 operands, at the UNet's shapes
/// (fused q/k/v at 64², `to_out` + residual, the feed-forward at 32², the
/// cross-attention's k/v over 77 text tokens) and an odd one.
pub(super) fn check_linears(dev: &Device, args: &CheckKernelsArgs, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    use sdxl::cuda::{fp8, linear};
    let randn = |shape: &[usize], dtype: DType| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1f32, shape, dev)?.to_dtype(dtype)
    };
    for &(tokens, k, out, with_residual, dtype) in &[
        (8192usize, 640usize, 1920usize, false, DType::F16),
        (8192, 640, 640, true, DType::F16),
        (2048, 1280, 10240, false, DType::F16),
        (2048, 5120, 1280, true, DType::BF16),
        (154, 2048, 2560, false, DType::F16),
        (15, 48, 40, true, DType::F16),
    ] {
        let x = randn(&[tokens, k], dtype)?;
        let w = (randn(&[out, k], DType::F32)? / (k as f64).sqrt())?.to_dtype(dtype)?;
        let bias = randn(&[out], dtype)?;
        let residual = if with_residual {
            Some(randn(&[tokens, out], dtype)?)
        } else {
            None
        };
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let mut reference = f32(&x)?.matmul(&f32(&w)?.t()?)?.broadcast_add(&f32(&bias)?)?;
        if let Some(r) = &residual {
            reference = (reference + f32(r)?)?;
        }
        let candle = || -> candle_core::Result<Tensor> {
            let y = x.matmul(&w.t()?)?.broadcast_add(&bias)?;
            match &residual {
                Some(r) => y + r,
                None => Ok(y),
            }
        };
        let candle_ms = median_ms(dev, args.iters, candle)?;
        let shape = format!(
            "x[{tokens}, {k}] w[{out}, {k}]{}",
            if with_residual { " + residual" } else { "" }
        );
        let lt = || linear::linear(&x, &w, Some(&bias), residual.as_ref());
        match lt()? {
            Some(fast) => {
                let (rel, max) = errors(&fast, &reference)?;
                rows.push(Row {
                    kernel: "linear (cuBLASLt epilogue)".into(),
                    shape: shape.clone(),
                    dtype,
                    rel,
                    max,
                    fast_ms: median_ms(dev, args.iters, || lt().map(Option::unwrap))?,
                    candle_ms,
                });
            }
            None => println!("linear (cuBLASLt epilogue) {shape} {dtype:?}: no cuBLASLt algorithm, candle's path runs"),
        }
        if !fp8::fp8_supports(k, out) {
            continue;
        }
        let q = fp8::quantize_weight(&w)?;
        let run = || linear::fp8_linear(&x, &q, Some(&bias), residual.as_ref());
        match run()? {
            Some(fast) => {
                let (rel, max) = errors(&fast, &reference)?;
                rows.push(Row {
                    kernel: "linear FP8 e4m3".into(),
                    shape,
                    dtype,
                    rel,
                    max,
                    fast_ms: median_ms(dev, args.iters, || run().map(Option::unwrap))?,
                    candle_ms,
                });
            }
            None => println!("linear FP8 {shape} {dtype:?}: no cuBLASLt algorithm, the run dtype's path runs"),
        }
    }
    Ok(())
}

/// FP8's per-token quantization fused into the kernels that make a
/// product's input (layer norm, GEGLU): the fused product against f32 (and
/// its time against the unfused path: the kernel's output stored, then
/// quantized), and the fused codes against the unfused kernels' codes.
pub(super) fn check_fused_quantization(
    dev: &Device,
    args: &CheckKernelsArgs,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    use sdxl::cuda::{fp8, kernels, linear};
    let randn = |shape: &[usize], dtype: DType| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1f32, shape, dev)?.to_dtype(dtype)
    };
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let cuda = dev.as_cuda_device()?;
    // (tokens, width of the product's input, outputs, GEGLU or layer norm, dtype)
    for &(tokens, width, out, is_geglu, dtype) in &[
        (8192usize, 640usize, 1920usize, false, DType::F16),
        (2048, 1280, 1280, false, DType::BF16),
        (2048, 5120, 1280, true, DType::F16),
        (8192, 2560, 640, true, DType::BF16),
        (77, 48, 40, false, DType::F16),
        (5, 16, 8, true, DType::F16),
    ] {
        let name = if is_geglu { "GEGLU" } else { "layer norm" };
        let shape = format!(
            "x[{tokens}, {}] w[{out}, {width}]",
            if is_geglu { 2 * width } else { width }
        );
        // an offset mean for the norm, so its statistics matter
        let x = if is_geglu {
            randn(&[tokens, 2 * width], dtype)?
        } else {
            (randn(&[tokens, width], DType::F32)? * 3.0)?
                .affine(1.0, 1.0)?
                .to_dtype(dtype)?
        };
        let (gamma, beta) = (randn(&[width], dtype)?, randn(&[width], dtype)?);
        let w = (randn(&[out, width], DType::F32)? / (width as f64).sqrt())?.to_dtype(dtype)?;
        let bias = randn(&[out], dtype)?;
        let residual = if is_geglu {
            Some(randn(&[tokens, out], dtype)?)
        } else {
            None
        };
        let q_weight = fp8::quantize_weight(&w)?;
        let stored = || {
            if is_geglu {
                kernels::geglu(&x)
            } else {
                kernels::layer_norm(&x, &gamma, &beta, 1e-5)
            }
        };
        let fused = || {
            if is_geglu {
                fp8::geglu_e4m3(&x)
            } else {
                fp8::layer_norm_e4m3(&x, &gamma, &beta, 1e-5)
            }
        };
        let Some(quantized) = fused()? else {
            println!("{name} → FP8 linear {shape} {dtype:?}: the fused kernel does not apply");
            continue;
        };
        let product = || -> candle_core::Result<Tensor> {
            let q = fused()?.ok_or_else(|| candle_core::Error::Msg("the fused kernel stopped applying".into()))?;
            linear::fp8_linear_quantized(&q, &q_weight, Some(&bias), residual.as_ref())?
                .ok_or_else(|| candle_core::Error::Msg("no FP8 product".into()))
        };
        let unfused = || -> candle_core::Result<Tensor> {
            linear::fp8_linear(&stored()?, &q_weight, Some(&bias), residual.as_ref())?
                .ok_or_else(|| candle_core::Error::Msg("no FP8 product".into()))
        };
        if linear::fp8_linear_quantized(&quantized, &q_weight, Some(&bias), residual.as_ref())?.is_none() {
            println!("{name} → FP8 linear {shape} {dtype:?}: no cuBLASLt algorithm");
            continue;
        }
        // the f32 reference: the norm or GEGLU, the product, the bias and residual
        let input = if is_geglu {
            let h = f32(&x)?;
            (h.narrow(1, 0, width)? * h.narrow(1, width, width)?.gelu_erf()?)?
        } else {
            let xf = f32(&x)?;
            let centred = xf.broadcast_sub(&xf.mean_keepdim(1)?)?;
            let std = (centred.sqr()?.mean_keepdim(1)? + 1e-5)?.sqrt()?;
            centred
                .broadcast_div(&std)?
                .broadcast_mul(&f32(&gamma)?)?
                .broadcast_add(&f32(&beta)?)?
        };
        let mut reference = input.matmul(&f32(&w)?.t()?)?.broadcast_add(&f32(&bias)?)?;
        if let Some(r) = &residual {
            reference = (reference + f32(r)?)?;
        }
        let (rel, max) = errors(&product()?, &reference)?;
        let fast_ms = median_ms(dev, args.iters, product)?;
        let unfused_ms = median_ms(dev, args.iters, unfused)?;
        rows.push(Row {
            kernel: format!("{name} → FP8 linear, quantization fused (other column: unfused)"),
            shape: shape.clone(),
            dtype,
            rel,
            max,
            fast_ms,
            candle_ms: unfused_ms,
        });
        // the codes: the same as quantizing the stored output, up to rounding
        let reference_codes = fp8::quantize_tensor(&stored()?)?;
        let (a, b) = (
            cuda.clone_dtoh(&quantized.rows.codes)?,
            cuda.clone_dtoh(&reference_codes.codes)?,
        );
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        let (_, max) = errors(
            &fp8::dequantize(&quantized.rows, cuda)?,
            &fp8::dequantize(&reference_codes, cuda)?,
        )?;
        rows.push(Row {
            kernel: format!("{name} → e4m3 codes, fused vs unfused (rel. error: share of codes differing)"),
            shape,
            dtype,
            rel: differing as f32 / a.len().max(1) as f32,
            max,
            fast_ms,
            candle_ms: unfused_ms,
        });
    }
    Ok(())
}
