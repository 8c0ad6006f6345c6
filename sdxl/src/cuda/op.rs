//! candle's side of our CUDA ops, written once. An op states its name and
//! element types ([`CudaOp`]) and its work for one element type
//! ([`Launch1`], [`Launch2`], [`Launch3`] or, for an in-place add,
//! [`LaunchInPlace`]); wrapped in [`OnCuda`] it is a candle custom op whose
//! CPU path says that it runs on CUDA only and whose CUDA path checks that
//! every operand has one of its types, then calls `launch` for that type.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, InplaceOp3, Layout, Result,
    Shape, WithDType,
};

/// An element type our kernels are built for (f16, bf16 or f32).
pub trait Elem: CudaDType + DeviceRepr + WithDType {}
impl<T: CudaDType + DeviceRepr + WithDType> Elem for T {}

/// What candle and the errors call an op, and the types it takes.
pub trait CudaOp {
    const NAME: &'static str;
    /// The element types it is built for; every operand has the same one.
    const DTYPES: &'static [DType] = &[DType::F16, DType::BF16, DType::F32];
}

/// An op over one input that returns a new tensor.
pub trait Launch1: CudaOp {
    fn launch<T: Elem>(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)>;
}

/// An op over two inputs that returns a new tensor.
pub trait Launch2: CudaOp {
    fn launch<T: Elem>(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)>;
}

/// An op over three inputs that returns a new tensor.
pub trait Launch3: CudaOp {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: Elem>(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        c: &CudaStorage,
        cl: &Layout,
    ) -> Result<(CudaStorage, Shape)>;
}

/// An op that writes into its first operand, with one operand more or two
/// (candle's `inplace_op2` and `inplace_op3`).
pub trait LaunchInPlace: CudaOp {
    fn launch<T: Elem>(
        &self,
        x: &mut CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        c: Option<(&CudaStorage, &Layout)>,
    ) -> Result<()>;
}

/// An op of ours as a candle custom op: `tensor.apply_op1_no_bwd(&OnCuda(op))`.
pub struct OnCuda<O>(pub O);

/// The operands' one element type, when the op is built for it.
fn dtype_of<O: CudaOp>(dtypes: &[DType]) -> Result<DType> {
    let first = dtypes[0];
    if let Some(other) = dtypes.iter().find(|&&d| d != first) {
        bail!("{}: operands of {first:?} and {other:?}", O::NAME)
    }
    if !O::DTYPES.contains(&first) {
        bail!("{}: no kernel for {first:?} (built for {:?})", O::NAME, O::DTYPES)
    }
    Ok(first)
}

/// `op.launch::<T>(args)` for the element type `T` of `dtype` (checked by
/// [`dtype_of`] first).
macro_rules! launch_as {
    ($dtype:expr, $op:expr, $($arg:expr),+) => {
        match $dtype {
            DType::F16 => $op.launch::<half::f16>($($arg),+),
            DType::BF16 => $op.launch::<half::bf16>($($arg),+),
            DType::F32 => $op.launch::<f32>($($arg),+),
            other => bail!("{}: no kernel for {other:?}", O::NAME),
        }
    };
}

fn cuda_only<O: CudaOp, R>() -> Result<R> {
    bail!("{} runs on CUDA only", O::NAME)
}

impl<O: Launch1> CustomOp1 for OnCuda<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cuda_only::<O, _>()
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        launch_as!(dtype_of::<O>(&[x.dtype()])?, self.0, x, xl)
    }
}

impl<O: Launch2> CustomOp2 for OnCuda<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cuda_only::<O, _>()
    }

    fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        launch_as!(dtype_of::<O>(&[a.dtype(), b.dtype()])?, self.0, a, al, b, bl)
    }
}

impl<O: Launch3> CustomOp3 for OnCuda<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only::<O, _>()
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        c: &CudaStorage,
        cl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dtype = dtype_of::<O>(&[a.dtype(), b.dtype(), c.dtype()])?;
        launch_as!(dtype, self.0, a, al, b, bl, c, cl)
    }
}

impl<O: LaunchInPlace> InplaceOp2 for OnCuda<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        cuda_only::<O, _>()
    }

    fn cuda_fwd(&self, x: &mut CudaStorage, xl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<()> {
        launch_as!(dtype_of::<O>(&[x.dtype(), b.dtype()])?, self.0, x, xl, b, bl, None)
    }
}

impl<O: LaunchInPlace> InplaceOp3 for OnCuda<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        cuda_only::<O, _>()
    }

    fn cuda_fwd(
        &self,
        x: &mut CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        c: &CudaStorage,
        cl: &Layout,
    ) -> Result<()> {
        let dtype = dtype_of::<O>(&[x.dtype(), b.dtype(), c.dtype()])?;
        launch_as!(dtype, self.0, x, xl, b, bl, Some((c, cl)))
    }
}
