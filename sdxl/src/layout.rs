//! How images are laid out between layers: NCHW, or channels-last (NHWC
//! storage behind the `[b, c, h, w]` shape, as `torch.channels_last`), which
//! the UNet, the VAE decoder and TAESD keep on CUDA with the `nhwc` path.

use candle_core::{Result, Tensor};

#[cfg(feature = "cuda")]
use crate::accel::{on_cuda, Accel};

/// Whether `t` is an image `[b, c, h, w]` stored channels-last: the storage
/// of a contiguous `[b, h, w, c]` seen through `permute((0, 3, 1, 2))` (what
/// PyTorch calls `torch.channels_last`). On CUDA the UNet and the VAE decoder
/// keep their activations so ([`to_layer_layout`]): cuDNN then convolves
/// without transposing, and the transformers' `[b, h·w, c]` tokens are a
/// view, not a copy.
pub fn is_channels_last(t: &Tensor) -> bool {
    let Ok((b, c, h, w)) = t.dims4() else {
        return false;
    };
    let s = t.stride();
    s[1] == 1 && s[3] == c && s[2] == w * c && (b == 1 || s[0] == h * w * c)
}

/// `t` `[b, c, h, w]` with channels-last storage: a copy, unless it already is.
pub fn channels_last(t: &Tensor) -> Result<Tensor> {
    if is_channels_last(t) {
        return Ok(t.clone());
    }
    t.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2))
}

/// `t` `[b, c, h, w]` with zero channels after its own, up to `to`, stored
/// channels-last: an image with a convolution's input channels padded, or a
/// weight `[k, c, r, s]` with its input channels padded alike (`KRSC`
/// storage), which convolve to what the unpadded pair does.
pub fn pad_channels_last(t: &Tensor, to: usize) -> Result<Tensor> {
    let (b, c, h, w) = t.dims4()?;
    let rows = t.permute((0, 2, 3, 1))?.contiguous()?;
    if to <= c {
        return rows.permute((0, 3, 1, 2));
    }
    let zeros = Tensor::zeros((b, h, w, to - c), t.dtype(), t.device())?;
    Tensor::cat(&[&rows, &zeros], 3)?.permute((0, 3, 1, 2))
}

/// `xs` `[b, c, h, w]` in the layout the layers keep images in: channels-last
/// where [`layers_keep_channels_last`], else as it is. The UNet and the VAE
/// decoder call it once, after their first convolution; every later layer
/// keeps the layout it is given.
pub fn to_layer_layout(xs: &Tensor) -> Result<Tensor> {
    if layers_keep_channels_last(xs) {
        return channels_last(xs);
    }
    Ok(xs.clone())
}

/// Whether the layers keep an image `xs` channels-last: on CUDA with the
/// `conv` and `nhwc` paths.
pub fn layers_keep_channels_last(xs: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        let a = Accel::current();
        on_cuda(xs) && a.conv && a.nhwc && xs.rank() == 4
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = xs;
        false
    }
}

/// `Tensor::cat(xs, 1)` for images: channels-last inputs give a
/// channels-last output, by a concatenation along the storage's last
/// dimension (candle's `cat` along dimension 1 of such views would copy
/// element by element into yet another layout).
pub fn cat_channels(xs: &[&Tensor]) -> Result<Tensor> {
    if xs.iter().all(|t| is_channels_last(t)) {
        let rows = xs.iter().map(|t| t.permute((0, 2, 3, 1))).collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&rows, 3)?.permute((0, 3, 1, 2));
    }
    Tensor::cat(xs, 1)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{cat_channels, channels_last, is_channels_last, pad_channels_last};

    fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn channels_last_keeps_the_values_and_changes_the_storage() -> candle_core::Result<()> {
        let x = Tensor::randn(0f32, 1., (2, 5, 3, 4), &Device::Cpu)?;
        assert!(!is_channels_last(&x));
        let cl = channels_last(&x)?;
        assert!(is_channels_last(&cl) && !cl.is_contiguous());
        assert_eq!(cl.dims(), x.dims());
        assert_eq!(max_diff(&cl, &x)?, 0.0);
        // its [b, h, w, c] view is the storage, contiguous
        assert!(cl.permute((0, 2, 3, 1))?.is_contiguous());
        // a slice of rows is not channels-last storage of its own shape
        assert!(!is_channels_last(&cl.narrow(2, 0, 2)?.narrow(3, 0, 2)?));
        Ok(())
    }

    #[test]
    fn padded_channels_convolve_as_the_unpadded_pair() -> candle_core::Result<()> {
        let x = Tensor::randn(0f32, 1., (2, 4, 6, 5), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1., (3, 4, 3, 3), &Device::Cpu)?;
        let (xp, wp) = (pad_channels_last(&x, 8)?, pad_channels_last(&w, 8)?);
        assert!(is_channels_last(&xp) && is_channels_last(&wp));
        assert_eq!((xp.dims(), wp.dims()), (&[2, 8, 6, 5][..], &[3, 8, 3, 3][..]));
        assert_eq!(max_diff(&xp.narrow(1, 0, 4)?, &x)?, 0.0);
        assert_eq!(xp.narrow(1, 4, 4)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        let want = x.conv2d(&w, 1, 1, 1, 1)?;
        let got = xp.contiguous()?.conv2d(&wp.contiguous()?, 1, 1, 1, 1)?;
        // zero products added: the same sums, up to their order
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(max_diff(&got, &want)? <= 1e-5 * scale);
        // already wide enough: the same values, channels-last
        let same = pad_channels_last(&x, 4)?;
        assert!(is_channels_last(&same) && max_diff(&same, &x)? == 0.0);
        Ok(())
    }

    #[test]
    fn cat_channels_of_channels_last_images_equals_cat_and_stays_channels_last() -> candle_core::Result<()> {
        let a = Tensor::randn(0f32, 1., (2, 3, 4, 5), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1., (2, 6, 4, 5), &Device::Cpu)?;
        let want = Tensor::cat(&[&a, &b], 1)?;
        let got = cat_channels(&[&channels_last(&a)?, &channels_last(&b)?])?;
        assert!(is_channels_last(&got));
        assert_eq!(max_diff(&got, &want)?, 0.0);
        // mixed layouts: candle's cat, same numbers
        let mixed = cat_channels(&[&a, &channels_last(&b)?])?;
        assert_eq!(max_diff(&mixed, &want)?, 0.0);
        Ok(())
    }
}
