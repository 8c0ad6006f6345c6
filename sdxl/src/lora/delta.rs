//! The maths of a LoRA update: which `up`/`down` shapes fit a weight, and the
//! weight delta `scale · alpha/rank · up @ down`.
//!
//! For a linear weight `[out, in]`, `down` is `[rank, in]` and `up`
//! `[out, rank]`. For a convolution `[out, in, kh, kw]` (LoCon), `down` is
//! itself a `kh×kw` convolution `[rank, in, kh, kw]` and `up` a 1×1
//! convolution `[out, rank, 1, 1]`; flattening `down` to `[rank, in·kh·kw]`
//! makes the product `[out, in·kh·kw]`, the weight's own layout. Trainers also
//! store linear LoRAs with trailing 1×1 dims (and a 1×1 conv's with none),
//! which fit the same way.

use candle_core::{DType, Result, Tensor};

use super::update::{LoraKind, LoraUpdate};

/// The rank and kind of the update `up`/`down` make for a weight of shape
/// `target`, or `None` when they do not fit it.
pub fn fit(up: &[usize], down: &[usize], target: &[usize]) -> Option<(usize, LoraKind)> {
    let (kind, out, inner_in, kernel) = match *target {
        [o, i] => (LoraKind::Linear, o, i, (1, 1)),
        [o, i, kh, kw] => (LoraKind::Conv { kernel: (kh, kw) }, o, i, (kh, kw)),
        _ => return None,
    };
    let rank = match *up {
        [o, r] | [o, r, 1, 1] if o == out => r,
        _ => return None,
    };
    let down_fits = match *down {
        [r, i] => r == rank && i == inner_in && kernel == (1, 1),
        [r, i, kh, kw] => r == rank && i == inner_in && (kh, kw) == kernel,
        _ => false,
    };
    (rank > 0 && down_fits).then_some((rank, kind))
}

/// `scale · alpha/rank · up @ down`, shaped as the target weight, computed in
/// f32 and returned in `dtype`. `scale` is the user's LoRA strength (diffusers'
/// `set_adapters` weight); `alpha/rank` is the trainer's own scaling.
pub fn delta(update: &LoraUpdate, scale: f32, dtype: DType) -> Result<Tensor> {
    let out = update.target_shape[0];
    let up = update.up.to_dtype(DType::F32)?.reshape((out, update.rank))?;
    let down = update.down.to_dtype(DType::F32)?.reshape((update.rank, ()))?;
    let factor = scale * update.alpha / update.rank as f32;
    let product = up.matmul(&down)?;
    (product * f64::from(factor))?
        .reshape(update.target_shape.as_slice())?
        .to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_that_fit() {
        assert_eq!(fit(&[32, 4], &[4, 16], &[32, 16]), Some((4, LoraKind::Linear)));
        assert_eq!(
            fit(&[32, 4, 1, 1], &[4, 16, 1, 1], &[32, 16]),
            Some((4, LoraKind::Linear))
        );
        let conv = LoraKind::Conv { kernel: (3, 3) };
        assert_eq!(fit(&[32, 8, 1, 1], &[8, 16, 3, 3], &[32, 16, 3, 3]), Some((8, conv)));
        let pointwise = LoraKind::Conv { kernel: (1, 1) };
        assert_eq!(fit(&[32, 8], &[8, 16], &[32, 16, 1, 1]), Some((8, pointwise)));
    }

    #[test]
    fn shapes_that_do_not() {
        assert_eq!(fit(&[16, 4], &[4, 16], &[32, 16]), None, "wrong out");
        assert_eq!(fit(&[32, 4], &[4, 8], &[32, 16]), None, "wrong in");
        assert_eq!(fit(&[32, 4], &[2, 16], &[32, 16]), None, "ranks differ");
        assert_eq!(
            fit(&[32, 8], &[8, 16], &[32, 16, 3, 3]),
            None,
            "linear LoRA on a 3×3 conv"
        );
        assert_eq!(
            fit(&[32, 8, 3, 3], &[8, 16, 1, 1], &[32, 16, 3, 3]),
            None,
            "kernel on the wrong side"
        );
        assert_eq!(fit(&[32, 0], &[0, 16], &[32, 16]), None, "rank 0");
        assert_eq!(fit(&[32, 4], &[4, 16], &[32]), None, "a norm");
    }
}
