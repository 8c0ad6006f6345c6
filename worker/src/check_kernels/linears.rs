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
