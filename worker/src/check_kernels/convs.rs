//! cuDNN's convolutions, NCHW and channels-last, and our kernels on
//! channels-last storage (group norm, upsampling, bias adds), each against
//! an f32 reference (`worker check-kernels`).

use candle_core::{DType, Device, Tensor};

use super::{errors, median_ms, CheckKernelsArgs, Row};

/// cuDNN's convolutions against candle's in f32, with `algo` installed.
pub(super) fn check_convs(
    dev: &Device,
    args: &CheckKernelsArgs,
    algo: sdxl::accel::ConvAlgo,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    use sdxl::cuda::{conv, kernels};
    let randn = |shape: &[usize], dtype: DType| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1f32, shape, dev)?.to_dtype(dtype)
    };
    for &(x_shape, w_shape, padding, stride, dtype) in &[
        (
            &[2usize, 320, 128, 128][..],
            &[320usize, 320, 3, 3][..],
            1usize,
            1usize,
            DType::F16,
        ),
        (&[2, 640, 64, 64][..], &[640, 640, 3, 3][..], 1, 1, DType::BF16),
        (&[2, 2560, 32, 32][..], &[1280, 2560, 1, 1][..], 0, 1, DType::F16),
        (&[2, 320, 129, 129][..], &[320, 320, 3, 3][..], 0, 2, DType::F16),
        (&[1, 128, 1024, 1024][..], &[128, 128, 3, 3][..], 1, 1, DType::F32),
        // the last convolutions: 4 and 3 output channels
        (&[2, 320, 128, 128][..], &[4, 320, 3, 3][..], 1, 1, DType::F16),
        (&[1, 128, 1024, 1024][..], &[3, 128, 3, 3][..], 1, 1, DType::F32),
        (&[1, 3, 17, 9][..], &[5, 3, 3, 3][..], 1, 1, DType::F32),
    ] {
        let x = randn(x_shape, dtype)?;
        let w = (randn(w_shape, DType::F32)? * 0.05)?.to_dtype(dtype)?;
        let fast = conv::conv2d(&x, &w, padding, stride)?;
        let reference = x
            .to_dtype(DType::F32)?
            .conv2d(&w.to_dtype(DType::F32)?, padding, stride, 1, 1)?;
        let (rel, max) = errors(&fast, &reference)?;
        let nchw_ms = median_ms(dev, args.iters, || conv::conv2d(&x, &w, padding, stride))?;
        rows.push(Row {
            kernel: format!("conv2d (cuDNN, {})", algo.name()),
            shape: format!("x{x_shape:?} w{w_shape:?} p{padding} s{stride}"),
            dtype,
            rel,
            max,
            fast_ms: nchw_ms,
            candle_ms: median_ms(dev, args.iters.min(5), || x.conv2d(&w, padding, stride, 1, 1))?,
        });
        // The same on channels-last storage (input and KRSC weight), timed
        // against the NCHW convolution above.
        if x_shape[1] % 8 != 0 {
            continue;
        }
        let (x_cl, w_cl) = (sdxl::nn::channels_last(&x)?, sdxl::nn::channels_last(&w)?);
        let fast = conv::conv2d(&x_cl, &w_cl, padding, stride)?;
        let (rel, max) = errors(&fast, &reference)?;
        let layout = if kernels::channels_last(&fast) {
            "NHWC"
        } else if fast.is_contiguous() {
            "NHWC fell back to NCHW"
        } else {
            "NHWC, filters padded to 8"
        };
        rows.push(Row {
            kernel: format!("conv2d {layout} (cuDNN, {}; vs NCHW)", algo.name()),
            shape: format!("x{x_shape:?} w{w_shape:?} p{padding} s{stride}"),
            dtype,
            rel,
            max,
            fast_ms: median_ms(dev, args.iters, || conv::conv2d(&x_cl, &w_cl, padding, stride))?,
            candle_ms: nchw_ms,
        });
    }
    // A model's first convolution (latents' 4 channels in): the input and
    // the weight padded with zero channels to 8 and convolved NHWC
    // (`Conv2d::forward_into_layer_layout`), timed against NCHW.
    for &(x_shape, w_shape, dtype) in &[
        (&[2usize, 4, 128, 128][..], &[320usize, 4, 3, 3][..], DType::F16),
        (&[1, 4, 128, 128][..], &[512, 4, 3, 3][..], DType::F32),
    ] {
        let x = randn(x_shape, dtype)?;
        let w = (randn(w_shape, DType::F32)? * 0.05)?.to_dtype(dtype)?;
        let reference = x.to_dtype(DType::F32)?.conv2d(&w.to_dtype(DType::F32)?, 1, 1, 1, 1)?;
        let w8 = sdxl::layout::pad_channels_last(&w, 8)?;
        let padded = || conv::conv2d(&sdxl::layout::pad_channels_last(&x, 8)?, &w8, 1, 1);
        let fast = padded()?;
        let (rel, max) = errors(&fast, &reference)?;
        let layout = if kernels::channels_last(&fast) {
            "NHWC"
        } else {
            "NHWC fell back to NCHW"
        };
        rows.push(Row {
            kernel: format!(
                "conv2d {layout}, input channels padded to 8 (cuDNN, {}; vs NCHW)",
                algo.name()
            ),
            shape: format!("x{x_shape:?} w{w_shape:?} p1 s1"),
            dtype,
            rel,
            max,
            fast_ms: median_ms(dev, args.iters, padded)?,
            candle_ms: median_ms(dev, args.iters, || conv::conv2d(&x, &w, 1, 1))?,
        });
    }
    Ok(())
}

/// Group norm, 2× upsampling and bias adds on channels-last storage, against
/// the f32 reference on NCHW, timed against our NCHW kernels on the same
/// shapes (the "candle ms" column of these rows).
pub(super) fn check_channels_last(dev: &Device, args: &CheckKernelsArgs, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    use sdxl::cuda::kernels;
    use sdxl::nn;
    use sdxl::nn::channels_last as to_channels_last; // a copy in NHWC storage
    let randn = |shape: &[usize], dtype: DType| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1f32, shape, dev)?.to_dtype(dtype)
    };
    let layout_of = |t: &Tensor| {
        if kernels::channels_last(t) {
            "NHWC"
        } else {
            "NHWC fell back to NCHW"
        }
    };

    // Group norm of x (+ a per-channel or per-sample bias) (+ SiLU).
    for &(shape, groups, dtype, pre, silu) in &[
        (&[2usize, 320, 128, 128][..], 32usize, DType::F16, Some(true), true),
        (&[2, 1280, 32, 32][..], 32, DType::F16, None, false),
        (&[2, 2560, 32, 32][..], 32, DType::F16, None, true),
        (&[2, 960, 64, 64][..], 32, DType::BF16, Some(false), true),
        (&[1, 512, 128, 128][..], 32, DType::F32, Some(false), true),
        (&[1, 128, 1024, 1024][..], 32, DType::F32, None, true),
        (&[3, 48, 5, 7][..], 6, DType::F16, Some(true), false),
    ] {
        let (b, c) = (shape[0], shape[1]);
        let x = (randn(shape, DType::F32)? * 3.0)?.affine(1.0, 5.0)?.to_dtype(dtype)?;
        let pre = match pre {
            Some(true) => Some(randn(&[b, c], dtype)?),
            Some(false) => Some(randn(&[c], dtype)?),
            None => None,
        };
        let w = randn(&[c], dtype)?;
        let bias = randn(&[c], dtype)?;
        let summed = match &pre {
            Some(p) => {
                let mut s = vec![1; 4];
                s[1] = c;
                if p.rank() == 2 {
                    s[0] = b;
                }
                x.broadcast_add(&p.reshape(s)?)?
            }
            None => x.clone(),
        };
        let norm32 = nn::GroupNorm::new(w.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?, groups, 1e-5);
        let mut reference = norm32.reference(&summed.to_dtype(DType::F32)?)?;
        if silu {
            reference = candle_nn::ops::silu(&reference)?;
        }
        let x_cl = to_channels_last(&x)?;
        let run = |x: &Tensor| kernels::group_norm_biased(x, pre.as_ref(), &w, &bias, groups, 1e-5, silu);
        let fast = run(&x_cl)?;
        let (rel, max) = errors(&fast, &reference)?;
        rows.push(Row {
            kernel: format!(
                "group norm {}{}{} (vs NCHW kernel)",
                layout_of(&fast),
                match pre.as_ref().map(Tensor::rank) {
                    Some(2) => " of x + sample bias",
                    Some(_) => " of x + channel bias",
                    None => "",
                },
                if silu { " + SiLU" } else { "" }
            ),
            shape: format!("{shape:?} g{groups}"),
            dtype,
            rel,
            max,
            fast_ms: median_ms(dev, args.iters, || run(&x_cl))?,
            candle_ms: median_ms(dev, args.iters, || run(&x))?,
        });
    }

    // Nearest 2× upsampling.
    for &(shape, dtype) in &[
        (&[2usize, 1280, 32, 32][..], DType::F16),
        (&[1, 256, 512, 512][..], DType::F32),
        (&[1, 16, 3, 5][..], DType::BF16),
    ] {
        let x = randn(shape, dtype)?;
        let (_, _, h, w) = x.dims4()?;
        let x_cl = to_channels_last(&x)?;
        let fast = kernels::upsample_nearest2x(&x_cl)?;
        let (rel, max) = errors(&fast, &x.upsample_nearest2d(2 * h, 2 * w)?)?;
        rows.push(Row {
            kernel: format!("upsample nearest 2× {} (vs NCHW kernel)", layout_of(&fast)),
            shape: format!("{shape:?}"),
            dtype,
            rel,
            max,
            fast_ms: median_ms(dev, args.iters, || kernels::upsample_nearest2x(&x_cl))?,
            candle_ms: median_ms(dev, args.iters, || kernels::upsample_nearest2x(&x))?,
        });
    }

    // In-place bias adds on a channels-last convolution output: per channel
    // with a residual, per sample (the time embedding), and with a ReLU on
    // the sum (TAESD's blocks).
    for &(shape, per_sample, with_residual, relu, dtype) in &[
        (&[2usize, 320, 128, 128][..], true, false, false, DType::F16),
        (&[2, 640, 64, 64][..], false, true, false, DType::BF16),
        (&[1, 128, 512, 512][..], false, true, false, DType::F32),
        (&[1, 64, 1024, 1024][..], false, true, true, DType::F16),
        (&[1, 64, 256, 256][..], false, false, true, DType::F16),
        (&[3, 8, 5, 7][..], true, true, true, DType::F16),
    ] {
        let (b, c) = (shape[0], shape[1]);
        let x = randn(shape, dtype)?;
        let residual = if with_residual {
            Some(randn(shape, dtype)?)
        } else {
            None
        };
        let bias = if per_sample {
            randn(&[b, c], dtype)?
        } else {
            randn(&[c], dtype)?
        };
        let bshape = if per_sample { [b, c, 1, 1] } else { [1, c, 1, 1] };
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let mut reference = f32(&x)?.broadcast_add(&f32(&bias)?.reshape(bshape.to_vec())?)?;
        if let Some(r) = &residual {
            reference = (reference + f32(r)?)?;
        }
        if relu {
            reference = reference.relu()?;
        }
        let residual_cl = residual.as_ref().map(to_channels_last).transpose()?;
        let fast = to_channels_last(&x)?;
        kernels::bias_add_act_inplace(&fast, &bias, residual_cl.as_ref(), 1, relu)?;
        let (rel, max) = errors(&fast, &reference)?;
        let (target_cl, target) = (to_channels_last(&x)?, x.copy()?);
        rows.push(Row {
            kernel: format!(
                "bias add{}{} NHWC (in place, vs NCHW)",
                if with_residual { " + residual" } else { "" },
                if relu { " + ReLU" } else { "" }
            ),
            shape: format!("{shape:?}{}", if per_sample { " per-sample" } else { "" }),
            dtype,
            rel,
            max,
            fast_ms: median_ms(dev, args.iters, || {
                kernels::bias_add_act_inplace(&target_cl, &bias, residual_cl.as_ref(), 1, relu)?;
                Ok(target_cl.clone())
            })?,
            candle_ms: median_ms(dev, args.iters, || {
                kernels::bias_add_act_inplace(&target, &bias, residual.as_ref(), 1, relu)?;
                Ok(target.clone())
            })?,
        });
    }

    // Two channels-last images side by side on the channels (the UNet's
    // skip connections): our kernel against candle's cat, which it must
    // equal exactly, timed against the copies `nn::cat_channels` makes.
    for &(a_shape, cb, dtype) in &[
        (&[2usize, 640, 128, 128][..], 320usize, DType::F16),
        (&[2, 1280, 32, 32][..], 1280, DType::F16),
        (&[2, 1280, 64, 64][..], 640, DType::BF16),
        (&[1, 24, 5, 7][..], 40, DType::F32),
    ] {
        let (n, h, wd) = (a_shape[0], a_shape[2], a_shape[3]);
        let (a, b) = (randn(a_shape, dtype)?, randn(&[n, cb, h, wd], dtype)?);
        let reference = Tensor::cat(&[&a, &b], 1)?;
        let (a_cl, b_cl) = (to_channels_last(&a)?, to_channels_last(&b)?);
        let Some(fast) = kernels::cat_channels(&a_cl, &b_cl)? else {
            anyhow::bail!("cat_channels declined channels-last inputs {a_shape:?} and {cb} channels");
        };
        if !kernels::channels_last(&fast) {
            anyhow::bail!("cat_channels gave a result that is not channels-last");
        }
        let (rel, max) = errors(&fast, &reference)?;
        let candle_ms = median_ms(dev, args.iters, || nn::cat_channels(&[&a_cl, &b_cl]))?;
        rows.push(Row {
            kernel: "cat on channels, NHWC (candle ms: candle's copies)".into(),
            shape: format!("{a_shape:?} + {cb} channels"),
            dtype,
            rel,
            max,
            fast_ms: median_ms(dev, args.iters, || {
                Ok(kernels::cat_channels(&a_cl, &b_cl)?.expect("accepted above"))
            })?,
            candle_ms,
        });
    }
    Ok(())
}
