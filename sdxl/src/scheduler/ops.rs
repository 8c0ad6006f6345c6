//! Tensor arithmetic with torch's rounding, shared by the samplers' steps.
//!
//! diffusers computes each per-step coefficient as a float32 0-d tensor and
//! then multiplies (or divides) the whole sample by it: one rounding per
//! element per operation. candle's `Tensor / f64` multiplies by the
//! reciprocal instead (one rounding more), so division goes through a 0-d
//! tensor here; multiplication by an f32 value given to `affine` as f64 is
//! exact (`x * m + 0`).

use candle_core::{DType, Device, Result, Tensor};

/// `t * s` with one rounding per element.
pub fn mul(t: &Tensor, s: f32) -> Result<Tensor> {
    t.affine(s as f64, 0.0)
}

/// `t / s` as a true division (torch's `tensor / scalar_tensor`).
pub fn div(t: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    t.broadcast_div(&s)
}

/// `a * x + b * y`, rounded as torch evaluates it (two products, one sum).
pub fn lin2(a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
    mul(x, a)? + mul(y, b)?
}

/// The float32 working copy of a step's input: the steps run in float32
/// whatever the model's dtype, as diffusers' Euler steps do.
pub fn f32_copy(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// Fails unless step `i` exists in a schedule of `len` steps.
pub fn check_index(i: usize, len: usize) -> Result<()> {
    if i < len {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!(
            "step index {i} is past the schedule of {len} steps"
        )))
    }
}

/// The float32 noise for step `i`: present exactly when the step draws.
pub fn step_noise(needs: bool, noise: Option<&Tensor>, i: usize) -> Result<Option<Tensor>> {
    match (needs, noise) {
        (true, Some(n)) => Ok(Some(f32_copy(n)?)),
        (false, None) => Ok(None),
        (true, None) => Err(candle_core::Error::Msg(format!(
            "step {i} draws noise, but none was given"
        ))),
        (false, Some(_)) => Err(candle_core::Error::Msg(format!(
            "step {i} draws no noise, but noise was given"
        ))),
    }
}

/// A float32 scalar as a 0-d CPU tensor of `dtype`: `add_noise` does its
/// scalar maths in the sample's dtype, as diffusers casts the schedule to it.
pub fn scalar_in(x: f32, dtype: DType) -> Result<Tensor> {
    Tensor::new(x, &Device::Cpu)?.to_dtype(dtype)
}

/// `a * x + b * y` where `a` and `b` are 0-d tensors (any device), moved to
/// `x`'s device and broadcast.
pub fn lin2_tensors(a: &Tensor, x: &Tensor, b: &Tensor, y: &Tensor) -> Result<Tensor> {
    let a = a.to_device(x.device())?;
    let b = b.to_device(y.device())?;
    x.broadcast_mul(&a)? + y.broadcast_mul(&b)?
}

/// Per-step progress of a solver that keeps history: steps must run in
/// order from the begin index (diffusers counts its `step_index` up from
/// there whatever timestep it is given).
#[derive(Debug, Clone, Default)]
pub struct Progress {
    begin: Option<usize>,
    next: Option<usize>,
}

impl Progress {
    pub fn set_begin(&mut self, i: usize) {
        self.begin = Some(i);
    }

    /// Checks that `i` is the step due now, then records it as run.
    pub fn advance(&mut self, i: usize) -> Result<()> {
        let due = self.next.or(self.begin);
        if let Some(due) = due {
            if due != i {
                return Err(candle_core::Error::Msg(format!(
                    "steps of a multistep solver must run in order: step {due} is due, got {i}"
                )));
            }
        }
        self.next = Some(i + 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn division_is_true_division() {
        let t = Tensor::new(&[1.0f32, 3.0, 10.0], &Device::Cpu).unwrap();
        let got: Vec<f32> = div(&t, 3.0).unwrap().to_vec1().unwrap();
        assert_eq!(got, vec![1.0 / 3.0, 1.0, 10.0 / 3.0]);
    }

    #[test]
    fn progress_enforces_order() {
        let mut p = Progress::default();
        p.set_begin(3);
        assert!(p.advance(2).is_err());
        p.advance(3).unwrap();
        assert!(p.advance(5).is_err());
        p.advance(4).unwrap();
    }

    #[test]
    fn noise_must_match_the_step() {
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        assert!(step_noise(true, None, 0).is_err());
        assert!(step_noise(false, Some(&t), 0).is_err());
        assert!(step_noise(true, Some(&t), 0).unwrap().is_some());
    }
}
