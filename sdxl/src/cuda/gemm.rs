//! Linear layers through cuBLASLt, with the bias and the residual add done in
//! the GEMM's epilogue (`D = W·x + bias + residual` in one kernel) instead of a
//! separate pass over the product: what `torch.compile` gets from epilogue
//! fusion. Also the FP8 (e4m3) products of `fp8.rs`, with the per-channel
//! weight and per-token activation scales applied by cuBLASLt (outer-vector
//! scaling) where this cuBLASLt supports it.
//!
//! Row-major `y[tokens, out] = x[tokens, in] · W[out, in]ᵀ` is, to a
//! column-major BLAS, `yᵀ[out, tokens] = W · xᵀ` with `W` transposed: both
//! operands K-major ("TN"), which is also the only layout FP8 products take.
//! Descriptors and the heuristic's algorithm are cached per shape on the
//! rank's thread (cuDNN's plans in `conv.rs` are cached the same way); a
//! shape cuBLASLt has no algorithm for is remembered as unsupported and the
//! caller takes its other path.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;

use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t as Op;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{bail, Result};

/// The element types of one product.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Operands {
    /// f16 everywhere, f32 accumulation.
    F16,
    /// bf16 everywhere, f32 accumulation.
    Bf16,
    /// e4m3 weights and activations, one f32 scale per output channel (A)
    /// and per token (B) applied by cuBLASLt, the result in f16 or bf16
    /// (`half` is `F16` or `Bf16`).
    Fp8Scaled { half: Half },
    /// e4m3 weights and activations without scales; the raw product in
    /// bf16 (its range is f32's: the unscaled sums can exceed f16's).
    Fp8Raw,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Half {
    F16,
    Bf16,
}

impl Half {
    fn data_type(self) -> sys::cudaDataType {
        match self {
            Half::F16 => sys::cudaDataType::CUDA_R_16F,
            Half::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        }
    }
}

impl Operands {
    fn ab_type(self) -> sys::cudaDataType {
        match self {
            Operands::F16 => sys::cudaDataType::CUDA_R_16F,
            Operands::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            Operands::Fp8Scaled { .. } | Operands::Fp8Raw => sys::cudaDataType::CUDA_R_8F_E4M3,
        }
    }

    fn cd_type(self) -> sys::cudaDataType {
        match self {
            Operands::F16 => sys::cudaDataType::CUDA_R_16F,
            Operands::Bf16 | Operands::Fp8Raw => sys::cudaDataType::CUDA_R_16BF,
            Operands::Fp8Scaled { half } => half.data_type(),
        }
    }

    fn is_fp8(self) -> bool {
        matches!(self, Operands::Fp8Scaled { .. } | Operands::Fp8Raw)
    }
}

/// One product's device pointers and sizes: `D[m, n] = op(A)[m, k] · B[k, n]`
/// column-major, i.e. `m` output channels, `n` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    pub operands: Operands,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The weight, `[m, k]` row-major.
    pub a: u64,
    /// The activations, `[n, k]` row-major.
    pub b: u64,
    /// The output, `[n, m]` row-major.
    pub d: u64,
    /// Added to every token's output row (`m` elements of D's type).
    pub bias: Option<u64>,
    /// Added to the output (`[n, m]` of D's type).
    pub residual: Option<u64>,
    /// `Fp8Scaled`: `m` and `n` f32 scales.
    pub scales: Option<(u64, u64)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct PlanKey {
    device: DeviceId,
    operands: Operands,
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
    residual: bool,
    /// The alignment (bytes, up to 256) of A, B, C and D: the heuristic only
    /// returns algorithms that work at the alignment it is told.
    align: [u32; 4],
}

/// Descriptors and the algorithm of one shape; raw cuBLASLt handles, which
/// live and die on the thread that made them.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    workspace: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
        }
    }
}

struct DeviceState {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

impl Drop for DeviceState {
    fn drop(&mut self) {
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// cuBLASLt's recommended workspace on Hopper.
const WORKSPACE: usize = 32 << 20;

thread_local! {
    static DEVICES: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
    /// `None`: cuBLASLt has no algorithm for this key.
    static PLANS: RefCell<HashMap<PlanKey, Option<Rc<Plan>>>> = RefCell::new(HashMap::new());
}

fn check(r: std::result::Result<(), lt::CublasError>, what: &str) -> Result<()> {
    r.map_err(|e| candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}")))
}

fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    check(
        unsafe {
            lt::set_matmul_desc_attribute(desc, attr, value as *const T as *const c_void, std::mem::size_of::<T>())
        },
        "setting a descriptor attribute",
    )
}

/// `p`'s bias and scale pointers into `desc`.
///
/// # Safety
/// `desc` must be a live descriptor.
unsafe fn set_pointers(desc: sys::cublasLtMatmulDesc_t, p: &Product) -> Result<()> {
    use sys::cublasLtMatmulDescAttributes_t as A;
    unsafe {
        if let Some(bias) = &p.bias {
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias)?;
        }
        if let Some((sa, sb)) = &p.scales {
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, sa)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, sb)?;
        }
    }
    Ok(())
}

/// The plan of `key`'s shape; `first` is the product it is built for, whose
/// bias and scale pointers the heuristic is shown (each later product sets
/// its own before it runs).
fn build_plan(handle: sys::cublasLtHandle_t, key: &PlanKey, first: &Product) -> Result<Option<Plan>> {
    use sys::cublasLtMatmulDescAttributes_t as A;
    let op = key.operands;
    let desc = lt::create_matmul_desc(
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType::CUDA_R_32F,
    );
    let desc = desc.map_err(|e| candle_core::Error::Msg(format!("cuBLASLt descriptor: {e:?}")))?;
    let layout = |t, rows: usize, cols: usize, ld: usize| {
        lt::create_matrix_layout(t, rows as u64, cols as u64, ld as i64)
            .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt layout: {e:?}")))
    };
    let a = layout(op.ab_type(), key.k, key.m, key.k)?;
    let b = layout(op.ab_type(), key.k, key.n, key.k)?;
    let d = layout(op.cd_type(), key.m, key.n, key.m)?;
    // From here on the plan owns the handles (and frees them on any error).
    let mut plan = Plan {
        desc,
        a,
        b,
        d,
        algo: unsafe { std::mem::zeroed() },
        workspace: 0,
    };
    unsafe {
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &Op::CUBLAS_OP_T)?;
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &Op::CUBLAS_OP_N)?;
        let epilogue = if key.bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        if op.is_fp8() {
            // Hopper's FP8 tensor cores accumulate in reduced precision unless
            // asked to promote; fast accumulation is what TensorRT and
            // Transformer Engine run inference with.
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
        }
        if let Operands::Fp8Scaled { .. } = op {
            let mode = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode)?;
        }
        // With outer-vector scale modes set and the scale pointers not yet
        // set, the heuristic answers CUBLAS_STATUS_INVALID_VALUE (cuBLASLt
        // 13.1 on an H100, `bench/fp8_outer_vec_probe.cu`): so it is shown
        // the first product's pointers.
        set_pointers(desc, first)?;
    }
    let pref = lt::create_matmul_pref().map_err(|e| candle_core::Error::Msg(format!("cuBLASLt preference: {e:?}")))?;
    let found = (|| -> Result<Option<sys::cublasLtMatmulHeuristicResult_t>> {
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        // The workspace limit is a uint64_t, the alignments uint32_t.
        let set = |attr, value: *const c_void, size: usize| unsafe {
            check(
                lt::set_matmul_pref_attribute(pref, attr, value, size),
                "setting a preference",
            )
        };
        let workspace = WORKSPACE as u64;
        set(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &workspace as *const u64 as *const c_void,
            8,
        )?;
        let attrs = [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ];
        for (attr, align) in attrs.into_iter().zip(&key.align) {
            set(attr, align as *const u32 as *const c_void, 4)?;
        }
        let mut result: sys::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        let mut count = 0;
        let status =
            unsafe { sys::cublasLtMatmulAlgoGetHeuristic(handle, desc, a, b, d, d, pref, 1, &mut result, &mut count) };
        Ok((status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && count > 0).then_some(result))
    })();
    unsafe {
        let _ = lt::destroy_matmul_pref(pref);
    }
    Ok(found?.map(|r| {
        plan.algo = r.algo;
        plan.workspace = r.workspaceSize;
        plan
    }))
}

/// Runs `p` on `dev`'s stream. `Ok(false)`: cuBLASLt has no algorithm for
/// this product (its operand types, shape or alignment), nothing was launched.
///
/// # Safety
/// Every pointer of `p` must address a live device buffer of the size its
/// field describes, on `dev`, until the stream has run the product.
pub unsafe fn run(dev: &CudaDevice, p: &Product) -> Result<bool> {
    let key = PlanKey {
        device: dev.id(),
        operands: p.operands,
        m: p.m,
        n: p.n,
        k: p.k,
        bias: p.bias.is_some(),
        residual: p.residual.is_some(),
        align: [p.a, p.b, p.residual.unwrap_or(p.d), p.d].map(alignment),
    };
    if p.scales.is_some() != matches!(p.operands, Operands::Fp8Scaled { .. }) {
        bail!("cuBLASLt: scales go with Fp8Scaled operands, and only with them")
    }
    let stream = dev.cuda_stream();
    DEVICES.with(|devices| -> Result<bool> {
        let mut devices = devices.borrow_mut();
        let state = match devices.entry(key.device) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let handle =
                    lt::create_handle().map_err(|e| candle_core::Error::Msg(format!("cuBLASLt handle: {e:?}")))?;
                let workspace = unsafe { stream.alloc::<u8>(WORKSPACE) }.map_err(candle_core::Error::wrap)?;
                e.insert(DeviceState { handle, workspace })
            }
        };
        let plan = PLANS.with(|plans| -> Result<Option<Rc<Plan>>> {
            let mut plans = plans.borrow_mut();
            if let Some(p) = plans.get(&key) {
                return Ok(p.clone());
            }
            let plan = build_plan(state.handle, &key, p)?.map(Rc::new);
            plans.insert(key, plan.clone());
            Ok(plan)
        })?;
        let Some(plan) = plan else {
            return Ok(false);
        };
        unsafe { set_pointers(plan.desc, p)? };
        let (alpha, beta) = (1f32, if p.residual.is_some() { 1f32 } else { 0f32 });
        let c = p.residual.unwrap_or(p.d);
        let (ws, _ws_guard) = {
            use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
            state.workspace.device_ptr_mut(&stream)
        };
        check(
            unsafe {
                lt::matmul(
                    state.handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    p.a as *const c_void,
                    plan.a,
                    p.b as *const c_void,
                    plan.b,
                    c as *const c_void,
                    plan.d,
                    p.d as *mut c_void,
                    plan.d,
                    &plan.algo,
                    ws as *mut c_void,
                    plan.workspace.min(WORKSPACE),
                    stream.cu_stream() as *mut _,
                )
            },
            "matmul",
        )?;
        Ok(true)
    })
}
