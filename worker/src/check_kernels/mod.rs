//! `worker check-kernels`: each CUDA fast path (`sdxl::cuda`) against a
//! reference computed by candle in f32 from the same (fresh random) inputs, at
//! SDXL's shapes and at odd ones, with the time of both. Exits non-zero when
//! an error is over its tolerance, so a GPU run can gate on it.
// The helpers below serve the CUDA build only; a CPU build keeps them compiled
// (so they cannot rot) but unused.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::time::Instant;

#[cfg(feature = "cuda")]
mod convs;
#[cfg(feature = "cuda")]
mod graphs;
#[cfg(feature = "cuda")]
mod linears;

use anyhow::bail;
use candle_core::{DType, Device, Tensor};

#[derive(Debug, clap::Args)]
pub struct CheckKernelsArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Timed repetitions of each variant (the median is reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_args: CheckKernelsArgs) -> anyhow::Result<()> {
    bail!("check-kernels needs a worker built with --features cuda")
}

/// ‖a − b‖ / ‖b‖ and max |a − b|, in f32.
fn errors(a: &Tensor, b: &Tensor) -> anyhow::Result<(f32, f32)> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let d = (&a - &b)?;
    let rel = (d.sqr()?.sum_all()?.sqrt()? / b.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()?;
    let max = d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    if !rel.is_finite() {
        bail!("non-finite error (NaN or inf in the output)");
    }
    Ok((rel, max))
}

fn median_ms(device: &Device, iters: usize, mut f: impl FnMut() -> candle_core::Result<Tensor>) -> anyhow::Result<f64> {
    f()?;
    device.synchronize()?;
    let mut xs = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        xs.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    xs.sort_by(f64::total_cmp);
    Ok(xs[xs.len() / 2])
}

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        _ => 1e-3,
    }
}

/// Relative L2 error allowed to an FP8 product against f32.
const FP8_TOLERANCE: f32 = 6e-2;

struct Row {
    kernel: String,
    shape: String,
    dtype: DType,
    rel: f32,
    max: f32,
    fast_ms: f64,
    candle_ms: f64,
}

#[cfg(feature = "cuda")]
pub fn run(args: CheckKernelsArgs) -> anyhow::Result<()> {
    let dev = Device::new_cuda(args.device)?;
    let mut rows = Vec::new();
    let outcome = check_all(&dev, &args, &mut rows);
    let failed = print_rows(&rows);
    outcome?;
    if failed > 0 {
        bail!("{failed} kernel check(s) over tolerance");
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn check_all(dev: &Device, args: &CheckKernelsArgs, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    use candle_core::{Module, D};
    use sdxl::cuda::kernels;
    use sdxl::nn;
    let dev = dev.clone();
    let randn = |shape: &[usize], dtype: DType| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1f32, shape, &dev)?.to_dtype(dtype)
    };

    // Attention: q from a [b, n, heads*64] projection; k, v also as strided
    // views of one fused [b, n_kv, 2*heads*64] tensor.
    for &(b, n_q, n_kv, heads) in &[
        (2usize, 4096usize, 4096usize, 10usize),
        (2, 1024, 1024, 20),
        (2, 4096, 77, 10),
        (1, 1000, 333, 3),
        (3, 70, 1, 2),
    ] {
        for dtype in [DType::F16, DType::BF16] {
            let inner = heads * 64;
            let q = randn(&[b, n_q, inner], dtype)?;
            let kv = randn(&[b, n_kv, 2 * inner], dtype)?;
            let (k, v) = (kv.narrow(2, 0, inner)?, kv.narrow(2, inner, inner)?);
            if !kernels::flash_attention_supports(&q, &k, &v, heads) {
                bail!("flash attention refused b={b} n_q={n_q} n_kv={n_kv} heads={heads}");
            }
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let reference = nn::attention(&f32(&q)?, &f32(&k)?, &f32(&v)?, heads)?;
            let (kc, vc) = (k.contiguous()?, v.contiguous()?);
            let candle_ms = median_ms(&dev, args.iters, || nn::attention_candle(&q, &kc, &vc, heads))?;
            for block in kernels::FLASH_BLOCKS {
                if !block.runs_on(dev.as_cuda_device()?) {
                    continue;
                }
                let fast = kernels::flash_attention_block(&q, &k, &v, heads, block)?;
                let (rel, max) = errors(&fast, &reference)?;
                let fast_ms = median_ms(&dev, args.iters, || {
                    kernels::flash_attention_block(&q, &k, &v, heads, block)
                })?;
                // the TFLOP/s of q·kᵀ and p·v
                let tflops = 4.0 * (b * heads * n_q * n_kv * 64) as f64 / (fast_ms * 1e9);
                rows.push(Row {
                    kernel: format!("flash attention, {block} ({tflops:.0} TFLOP/s)"),
                    shape: format!("b{b} q{n_q} kv{n_kv} h{heads}"),
                    dtype,
                    rel,
                    max,
                    fast_ms,
                    candle_ms,
                });
            }
        }
    }

    // Group norm (+ SiLU).
    for &(shape, groups, dtype, silu) in &[
        (&[2usize, 320, 128, 128][..], 32usize, DType::F16, true),
        (&[2, 1280, 32, 32][..], 32, DType::F16, false),
        (&[2, 640, 64, 64][..], 32, DType::BF16, true),
        (&[1, 128, 1024, 1024][..], 32, DType::F32, true),
        (&[1, 12, 7, 9][..], 3, DType::F32, false),
        (&[3, 6, 5][..], 2, DType::F16, true),
    ] {
        let c = shape[1];
        // an offset mean, so the shifted sums matter
        let x = (randn(shape, DType::F32)? * 3.0)?.affine(1.0, 5.0)?.to_dtype(dtype)?;
        let w = randn(&[c], dtype)?;
        let bias = randn(&[c], dtype)?;
        let norm = nn::GroupNorm::new(w.clone(), bias.clone(), groups, 1e-5);
        let fast = kernels::group_norm(&x, &w, &bias, groups, 1e-5, silu)?;
        let norm32 = nn::GroupNorm::new(w.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?, groups, 1e-5);
        let mut reference = norm32.reference(&x.to_dtype(DType::F32)?)?;
        if silu {
            reference = candle_nn::ops::silu(&reference)?;
        }
        let (rel, max) = errors(&fast, &reference)?;
        let fast_ms = median_ms(&dev, args.iters, || {
            kernels::group_norm(&x, &w, &bias, groups, 1e-5, silu)
        })?;
        let candle_ms = median_ms(&dev, args.iters, || {
            let y = norm.reference(&x)?;
            if silu {
                candle_nn::ops::silu(&y)
            } else {
                Ok(y)
            }
        })?;
        rows.push(Row {
            kernel: format!("group norm{}", if silu { " + SiLU" } else { "" }),
            shape: format!("{shape:?} g{groups}"),
            dtype,
            rel,
            max,
            fast_ms,
            candle_ms,
        });
    }

    // Group norm of `x + pre` (a convolution's bias folded into the norm that
    // reads its output), per channel and per sample, on 8-wide and scalar
    // paths, and on an input that starts off the 16-byte boundary.
    for &(shape, groups, dtype, per_sample, offset) in &[
        (&[2usize, 320, 128, 128][..], 32usize, DType::F16, true, 0usize),
        (&[2, 1280, 32, 32][..], 32, DType::BF16, true, 0),
        (&[1, 128, 1024, 1024][..], 32, DType::F32, false, 0),
        (&[2, 12, 7, 9][..], 3, DType::F32, true, 0),
        (&[3, 6, 5][..], 2, DType::F16, false, 0),
        (&[2, 64, 16, 16][..], 32, DType::F16, true, 1),
    ] {
        let (b, c) = (shape[0], shape[1]);
        let n: usize = shape.iter().product();
        let x = (randn(&[n + offset], DType::F32)? * 3.0)?
            .affine(1.0, 5.0)?
            .to_dtype(dtype)?;
        let x = x.narrow(0, offset, n)?.reshape(shape)?;
        let pre = if per_sample {
            randn(&[b, c], dtype)?
        } else {
            randn(&[c], dtype)?
        };
        let w = randn(&[c], dtype)?;
        let bias = randn(&[c], dtype)?;
        let fast = kernels::group_norm_biased(&x, Some(&pre), &w, &bias, groups, 1e-5, true)?;
        let norm32 = nn::GroupNorm::new(w.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?, groups, 1e-5);
        let mut pre_shape = vec![1; shape.len()];
        pre_shape[1] = c;
        if per_sample {
            pre_shape[0] = b;
        }
        let summed = x.broadcast_add(&pre.reshape(pre_shape.clone())?)?;
        let reference = candle_nn::ops::silu(&norm32.reference(&summed.to_dtype(DType::F32)?)?)?;
        let (rel, max) = errors(&fast, &reference)?;
        let fast_ms = median_ms(&dev, args.iters, || {
            kernels::group_norm_biased(&x, Some(&pre), &w, &bias, groups, 1e-5, true)
        })?;
        let candle_ms = median_ms(&dev, args.iters, || {
            kernels::group_norm(
                &x.broadcast_add(&pre.reshape(pre_shape.clone())?)?,
                &w,
                &bias,
                groups,
                1e-5,
                true,
            )
        })?;
        rows.push(Row {
            kernel: format!(
                "group norm of x + {} bias + SiLU",
                if per_sample { "sample" } else { "channel" }
            ),
            shape: format!("{shape:?} g{groups} offset {offset}"),
            dtype,
            rel,
            max,
            fast_ms,
            candle_ms,
        });
    }

    // Nearest 2× upsampling (exact: a copy), also of a non-contiguous input.
    for &(shape, dtype, transposed) in &[
        (&[1usize, 256, 512, 512][..], DType::F32, false),
        (&[2, 1280, 32, 32][..], DType::F16, false),
        (&[1, 3, 5, 7][..], DType::BF16, true),
    ] {
        let x = randn(shape, dtype)?;
        let x = if transposed { x.transpose(2, 3)? } else { x };
        let (_, _, h, w) = x.dims4()?;
        let fast = kernels::upsample_nearest2x(&x)?;
        let (rel, max) = errors(&fast, &x.upsample_nearest2d(2 * h, 2 * w)?)?;
        rows.push(Row {
            kernel: "upsample nearest 2×".into(),
            shape: format!("{shape:?}{}", if transposed { " transposed" } else { "" }),
            dtype,
            rel,
            max,
            fast_ms: median_ms(&dev, args.iters, || kernels::upsample_nearest2x(&x))?,
            candle_ms: median_ms(&dev, args.iters, || x.upsample_nearest2d(2 * h, 2 * w))?,
        });
    }

    // GEGLU.
    for &(shape, dtype) in &[
        (&[2usize, 4096, 5120][..], DType::F16),
        (&[2, 1024, 10240][..], DType::BF16),
        (&[3, 7, 10][..], DType::F32),
        (&[2, 77, 36][..], DType::F16),
    ] {
        let h = randn(shape, dtype)?;
        let fast = kernels::geglu(&h)?;
        let candle_geglu = |h: &Tensor| -> candle_core::Result<Tensor> {
            let half = h.dim(D::Minus1)? / 2;
            h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?
        };
        let reference = candle_geglu(&h.to_dtype(DType::F32)?)?;
        let (rel, max) = errors(&fast, &reference)?;
        rows.push(Row {
            kernel: "GEGLU".into(),
            shape: format!("{shape:?}"),
            dtype,
            rel,
            max,
            fast_ms: median_ms(&dev, args.iters, || kernels::geglu(&h))?,
            candle_ms: median_ms(&dev, args.iters, || candle_geglu(&h))?,
        });
    }

    // Layer norm over the last dimension.
    for &(shape, dtype) in &[
        (&[2usize, 4096, 640][..], DType::F16),
        (&[2, 1024, 1280][..], DType::BF16),
        (&[2, 77, 768][..], DType::F32),
        (&[3, 5, 2048][..], DType::F16),
    ] {
        let n = shape[shape.len() - 1];
        let x = (randn(shape, DType::F32)? * 2.0)?.affine(1.0, 3.0)?.to_dtype(dtype)?;
        let (g, b) = (randn(&[n], dtype)?, randn(&[n], dtype)?);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let reference = candle_nn::LayerNorm::new(f32(&g)?, f32(&b)?, 1e-5).forward(&f32(&x)?)?;
        let candle_ln = candle_nn::LayerNorm::new(g.clone(), b.clone(), 1e-5);
        let fast = kernels::layer_norm(&x, &g, &b, 1e-5)?;
        let (rel, max) = errors(&fast, &reference)?;
        rows.push(Row {
            kernel: "layer norm".into(),
            shape: format!("{shape:?}"),
            dtype,
            rel,
            max,
            fast_ms: median_ms(&dev, args.iters, || kernels::layer_norm(&x, &g, &b, 1e-5))?,
            candle_ms: median_ms(&dev, args.iters, || candle_ln.forward(&x))?,
        });
    }

    // In-place bias adds: a Linear's [rows, c] output, an NCHW conv output,
    // and a per-sample [batch, c] bias (the UNet's time embedding).
    for &(shape, channel_dim, per_sample, with_residual, dtype) in &[
        (&[2usize, 4096, 5120][..], 2usize, false, false, DType::F16),
        (&[2, 4096, 640][..], 2, false, true, DType::BF16),
        (&[2, 320, 128, 128][..], 1, true, false, DType::F16),
        (&[2, 320, 128, 128][..], 1, false, true, DType::F16),
        (&[1, 128, 1024, 1024][..], 1, false, true, DType::F32),
        (&[3, 5, 7][..], 1, false, true, DType::BF16),
    ] {
        let residual = if with_residual {
            Some(randn(shape, dtype)?)
        } else {
            None
        };
        let x = randn(shape, dtype)?;
        let c = shape[channel_dim];
        let batch: usize = shape[..channel_dim].iter().product();
        let bias = if per_sample {
            randn(&[batch, c], dtype)?
        } else {
            randn(&[c], dtype)?
        };
        let mut bshape = vec![1; shape.len()];
        bshape[channel_dim] = c;
        if per_sample {
            bshape[0] = batch;
        }
        let broadcast = |x: &Tensor| -> candle_core::Result<Tensor> {
            let y = x.broadcast_add(&bias.to_dtype(x.dtype())?.reshape(bshape.clone())?)?;
            match &residual {
                Some(r) => y + r.to_dtype(x.dtype())?,
                None => Ok(y),
            }
        };
        let reference = broadcast(&x.to_dtype(DType::F32)?)?;
        let fast = x.copy()?;
        kernels::bias_add_inplace(&fast, &bias, residual.as_ref(), channel_dim)?;
        let (rel, max) = errors(&fast, &reference)?;
        let target = x.copy()?;
        rows.push(Row {
            kernel: format!("bias add{} (in place)", if with_residual { " + residual" } else { "" }),
            shape: format!(
                "{shape:?} dim{channel_dim}{}",
                if per_sample { " per-sample" } else { "" }
            ),
            dtype,
            rel,
            max,
            fast_ms: median_ms(&dev, args.iters, || {
                kernels::bias_add_inplace(&target, &bias, residual.as_ref(), channel_dim)?;
                Ok(target.clone())
            })?,
            candle_ms: median_ms(&dev, args.iters, || broadcast(&x))?,
        });
    }

    // Convolutions (cuDNN vs candle's im2col), reference in f32 without TF32
    // on candle's side (candle's f32 GEMM does not use TF32 unless asked),
    // with the algorithm found by timing and the one cuDNN ranks first.
    let accel = sdxl::accel::Accel::current();
    for algo in [sdxl::accel::ConvAlgo::Find, sdxl::accel::ConvAlgo::Heuristic] {
        sdxl::accel::Accel {
            conv_algo: algo,
            ..accel
        }
        .install();
        convs::check_convs(&dev, args, algo, rows)?;
    }
    accel.install();

    convs::check_channels_last(&dev, args, rows)?;
    linears::check_linears(&dev, args, rows)?;
    linears::check_fused_quantization(&dev, args, rows)?;
    graphs::check_text_encoders(&dev, args, rows)?;
    graphs::check_input_reuse(&dev, args, rows)?;
    Ok(())
}

/// Prints the table; returns how many rows are over tolerance.
fn print_rows(rows: &[Row]) -> usize {
    println!("| kernel | shape | dtype | rel. error | max abs error | ours ms | candle ms | speed-up |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut failed = 0;
    for r in rows {
        // TF32 convolutions are compared against f32: TF32's 10-bit mantissa
        let tol = if r.kernel.starts_with("conv") && r.dtype == DType::F32 {
            2e-3
        } else if r.kernel.contains("FP8") {
            // e4m3 keeps 3 mantissa bits: each operand is off by up to 2^-4
            // relative, and the sums average that to a few percent
            FP8_TOLERANCE
        } else if r.kernel.contains("in one batch") {
            // f16 both sides, but a batch of another size may take other
            // GEMM algorithms (other summation orders) through 12–32
            // layers; a batch that mixed its rows would be off by O(1)
            5.0 * tolerance(r.dtype)
        } else {
            tolerance(r.dtype)
        };
        let ok = r.rel <= tol;
        failed += usize::from(!ok);
        println!(
            "| {} | {} | {:?} | {:.2e}{} | {:.2e} | {:.3} | {:.3} | {:.1}× |",
            r.kernel,
            r.shape,
            r.dtype,
            r.rel,
            if ok { "" } else { " FAIL" },
            r.max,
            r.fast_ms,
            r.candle_ms,
            r.candle_ms / r.fast_ms
        );
    }
    failed
}
