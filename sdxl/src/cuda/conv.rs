//! 2-D convolutions through cuDNN, NCHW or channels-last (NHWC storage, see
//! [`crate::layout::is_channels_last`]), as PyTorch runs them: f32 accumulation
//! for half types with tensor-core math, TF32 allowed for f32 (PyTorch's
//! `cudnn.allow_tf32` default), and the algorithm chosen once per shape, as
//! [`ConvAlgo`] says: by timing the candidates
//! (`cudnnFindConvolutionForwardAlgorithmEx`, what `cudnn.benchmark=True`
//! does; the default) or from cuDNN's ranking without running anything
//! (`cudnnGetConvolutionForwardAlgorithm_v7`, PyTorch's default). Descriptors
//! and the chosen algorithm are cached per shape on the rank's thread; one
//! workspace per device grows as needed. While the stream is being recorded
//! into a CUDA graph, a call takes a workspace of its own from the stream's
//! pool instead, which the graph records as its own allocation: the shared
//! one may be replaced by a larger one later, under the graph's feet.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Tensor};

use super::kernels::channels_last;
use super::op::{CudaOp, Elem, Launch2, OnCuda};
use crate::accel::{Accel, ConvAlgo};

/// `conv2d(xs, weight)` with symmetric `padding` and `stride` (no bias, no
/// dilation, one group). A channels-last input with its channels in 8-element
/// vectors is convolved as NHWC (no transposes inside cuDNN) and gives a
/// channels-last output; `weight` is best channels-last then too (`KRSC`,
/// made so here otherwise). Output channels that are not a multiple of 8 (the
/// UNet's and the VAE's last convolution: 4 and 3) are computed padded with
/// zero filters to the next multiple, and the output is a view of the first
/// ones (neither contiguous nor channels-last). Any other input is made
/// contiguous and gives a contiguous output.
pub fn conv2d(xs: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if channels_last(xs) && nhwc_supports(xs) {
        match conv2d_nhwc(xs, weight, padding, stride) {
            Ok(y) => return Ok(y),
            // A shape cuDNN has no NHWC algorithm for: NCHW below.
            Err(e) => {
                static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(error = %e, shape = ?xs.dims(), "NHWC convolution failed; NCHW instead");
                }
            }
        }
    }
    let xs = xs.contiguous()?;
    let weight = weight.contiguous()?;
    let op = CudnnConv {
        padding,
        stride,
        nhwc: false,
    };
    xs.apply_op2_no_bwd(&weight, &OnCuda(op))
}

fn conv2d_nhwc(xs: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    // [k, r, s, c], contiguous
    let mut rows = crate::layout::channels_last(weight)?.permute((0, 2, 3, 1))?;
    let k = rows.dim(0)?;
    let padded = k.next_multiple_of(8);
    if padded != k {
        let (_, r, s, c) = rows.dims4()?;
        let zeros = Tensor::zeros((padded - k, r, s, c), rows.dtype(), rows.device())?;
        rows = Tensor::cat(&[&rows, &zeros], 0)?;
    }
    let op = CudnnConv {
        padding,
        stride,
        nhwc: true,
    };
    // both [n, h, w, c] views are contiguous; cuDNN gets NHWC descriptors
    let y = xs.permute((0, 2, 3, 1))?.apply_op2_no_bwd(&rows, &OnCuda(op))?;
    let y = if padded != k { y.narrow(3, 0, k)? } else { y };
    y.permute((0, 3, 1, 2))
}

/// Input channels in whole 8-element vectors (16 bytes of f16), what cuDNN's
/// NHWC tensor-core kernels read; the first convolutions (3 or 4 channels in)
/// stay NCHW.
fn nhwc_supports(xs: &Tensor) -> bool {
    xs.dims().get(1).is_some_and(|c| c % 8 == 0)
}

/// [`conv2d`] plus a per-channel `bias` (and a `residual` of the output's
/// shape), then a ReLU when `relu`, in place on the fresh output in one pass.
pub fn conv2d_bias(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    use super::kernels::{aligned_like, bias_add_act_inplace};
    let y = conv2d(xs, weight, padding, stride)?;
    // a padded NHWC output's view is copied out first (3 or 4 channels)
    let y = if aligned_like(&y, &y) { y } else { y.contiguous()? };
    match residual {
        // the residual's layout is not the output's: added apart
        Some(r) if !aligned_like(r, &y) => {
            bias_add_act_inplace(&y, bias, None, 1, false)?;
            let sum = (y + r)?;
            if relu {
                sum.relu()
            } else {
                Ok(sum)
            }
        }
        _ => {
            bias_add_act_inplace(&y, bias, residual, 1, relu)?;
            Ok(y)
        }
    }
}

fn check(status: sys::cudnnStatus_t, what: &str) -> Result<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    let msg = unsafe { CStr::from_ptr(sys::cudnnGetErrorString(status)) };
    bail!("cuDNN {what}: {}", msg.to_string_lossy())
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct ConvKey {
    device: DeviceId,
    dtype: DType,
    x: [usize; 4],
    w: [usize; 4],
    padding: usize,
    stride: usize,
    algo: ConvAlgo,
    /// NHWC storage of x, w (`KRSC`) and y.
    nhwc: bool,
}

/// Descriptors and algorithm for one shape. Raw cuDNN handles: they live and
/// die on the thread that made them.
struct ConvPlan {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
    out: [usize; 4],
}

impl Drop for ConvPlan {
    fn drop(&mut self) {
        unsafe {
            sys::cudnnDestroyTensorDescriptor(self.x);
            sys::cudnnDestroyFilterDescriptor(self.w);
            sys::cudnnDestroyConvolutionDescriptor(self.conv);
            sys::cudnnDestroyTensorDescriptor(self.y);
        }
    }
}

struct DeviceState {
    handle: sys::cudnnHandle_t,
    workspace: Option<CudaSlice<u8>>,
}

impl Drop for DeviceState {
    fn drop(&mut self) {
        unsafe {
            sys::cudnnDestroy(self.handle);
        }
    }
}

thread_local! {
    static DEVICES: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<ConvKey, ConvPlan>> = RefCell::new(HashMap::new());
}

fn data_type(dtype: DType) -> Result<(sys::cudnnDataType_t, sys::cudnnDataType_t, sys::cudnnMathType_t)> {
    use sys::cudnnDataType_t as D;
    use sys::cudnnMathType_t as M;
    Ok(match dtype {
        DType::F16 => (D::CUDNN_DATA_HALF, D::CUDNN_DATA_FLOAT, M::CUDNN_TENSOR_OP_MATH),
        DType::BF16 => (D::CUDNN_DATA_BFLOAT16, D::CUDNN_DATA_FLOAT, M::CUDNN_TENSOR_OP_MATH),
        // default math lets cuDNN use TF32 for f32 data (never f16 conversion)
        DType::F32 if allow_tf32() => (D::CUDNN_DATA_FLOAT, D::CUDNN_DATA_FLOAT, M::CUDNN_DEFAULT_MATH),
        DType::F32 => (D::CUDNN_DATA_FLOAT, D::CUDNN_DATA_FLOAT, M::CUDNN_FMA_MATH),
        other => bail!("cuDNN convolution: no support for {other:?}"),
    })
}

/// TF32 for f32 convolutions, as PyTorch's default, unless [`Accel`] turns it off.
fn allow_tf32() -> bool {
    Accel::current().tf32
}

fn as_i32(xs: [usize; 4]) -> [c_int; 4] {
    xs.map(|x| x as c_int)
}

impl ConvPlan {
    fn new(handle: sys::cudnnHandle_t, key: &ConvKey) -> Result<Self> {
        let (data, compute, math) = data_type(key.dtype)?;
        let mut plan = ConvPlan {
            x: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            algo: sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            workspace: 0,
            out: [0; 4],
        };
        let [n, c, h, w] = as_i32(key.x);
        let [k, kc, kh, kw] = as_i32(key.w);
        let (p, s) = (key.padding as c_int, key.stride as c_int);
        // the dims are given in NCHW order whatever the storage format
        let format = if key.nhwc {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        };
        unsafe {
            check(sys::cudnnCreateTensorDescriptor(&mut plan.x), "create x")?;
            check(
                sys::cudnnSetTensor4dDescriptor(plan.x, format, data, n, c, h, w),
                "set x",
            )?;
            check(sys::cudnnCreateFilterDescriptor(&mut plan.w), "create w")?;
            check(
                sys::cudnnSetFilter4dDescriptor(plan.w, data, format, k, kc, kh, kw),
                "set w",
            )?;
            check(sys::cudnnCreateConvolutionDescriptor(&mut plan.conv), "create conv")?;
            check(
                sys::cudnnSetConvolution2dDescriptor(
                    plan.conv,
                    p,
                    p,
                    s,
                    s,
                    1,
                    1,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    compute,
                ),
                "set conv",
            )?;
            check(sys::cudnnSetConvolutionMathType(plan.conv, math), "set math type")?;
            let (mut on, mut oc, mut oh, mut ow) = (0, 0, 0, 0);
            check(
                sys::cudnnGetConvolution2dForwardOutputDim(
                    plan.conv, plan.x, plan.w, &mut on, &mut oc, &mut oh, &mut ow,
                ),
                "output dims",
            )?;
            plan.out = [on as usize, oc as usize, oh as usize, ow as usize];
            check(sys::cudnnCreateTensorDescriptor(&mut plan.y), "create y")?;
            check(
                sys::cudnnSetTensor4dDescriptor(plan.y, format, data, on, oc, oh, ow),
                "set y",
            )?;
        }
        let _ = handle;
        Ok(plan)
    }
}

/// Whether `stream` is being recorded into a CUDA graph.
fn capturing(stream: &CudaStream) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus as Status;
    stream
        .capture_status()
        .is_ok_and(|status| status == Status::CU_STREAM_CAPTURE_STATUS_ACTIVE)
}

/// How much workspace the algorithm search may offer: NCHW kernels that go
/// through NHWC need about the input's size again (1 GiB for the VAE's last
/// f32 convolutions), so up to 4 GiB, but never more than a quarter of the
/// free memory.
fn find_workspace(stream: &CudaStream) -> usize {
    const MAX: usize = 4 << 30;
    match stream.context().mem_get_info() {
        Ok((free, _)) => MAX.min(free / 4),
        Err(_) => 512 << 20,
    }
}

struct CudnnConv {
    padding: usize,
    stride: usize,
    /// x `[n, h, w, c]`, w `[k, r, s, c]`, y `[n, oh, ow, k]` (else NCHW/KCRS).
    nhwc: bool,
}

impl CudnnConv {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let nchw_order = |l: &Layout| -> Result<[usize; 4]> {
            let (a, b, c, d) = l.shape().dims4()?;
            Ok(if self.nhwc { [a, d, b, c] } else { [a, b, c, d] })
        };
        let key = ConvKey {
            device: dev.id(),
            dtype: x.dtype(),
            x: nchw_order(xl)?,
            w: nchw_order(wl)?,
            padding: self.padding,
            stride: self.stride,
            algo: Accel::current().conv_algo,
            nhwc: self.nhwc,
        };
        let stream = dev.cuda_stream();
        let xv = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let wv = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        DEVICES.with_borrow_mut(|devices| -> Result<(CudaStorage, Shape)> {
            let state = match devices.entry(key.device) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let mut handle = std::ptr::null_mut();
                    unsafe {
                        check(sys::cudnnCreate(&mut handle), "create handle")?;
                        check(
                            sys::cudnnSetStream(handle, stream.cu_stream() as sys::cudaStream_t),
                            "set stream",
                        )?;
                    }
                    e.insert(DeviceState {
                        handle,
                        workspace: None,
                    })
                }
            };
            PLANS.with_borrow_mut(|plans| -> Result<(CudaStorage, Shape)> {
                let fresh = !plans.contains_key(&key);
                if fresh {
                    plans.insert(key, ConvPlan::new(state.handle, &key)?);
                }
                let plan = plans.get_mut(&key).expect("plan just inserted");
                let out_len: usize = plan.out.iter().product();
                let mut y: CudaSlice<T> = unsafe { dev.alloc::<T>(out_len)? };
                if fresh {
                    let chosen = match key.algo {
                        ConvAlgo::Find => stream
                            .alloc_zeros::<u8>(find_workspace(&stream))
                            .map_err(candle_core::Error::wrap)
                            .and_then(|mut ws| find_algorithm(state.handle, plan, &stream, &xv, &wv, &mut y, &mut ws)),
                        ConvAlgo::Heuristic => rank_algorithm(state.handle, plan, find_workspace(&stream)),
                    };
                    if let Err(e) = chosen {
                        // no plan without an algorithm: the next call searches again
                        plans.remove(&key);
                        return Err(e);
                    }
                }
                let mut recorded = None;
                let workspace = if plan.workspace == 0 {
                    None
                } else if Accel::current().graphs && capturing(&stream) {
                    // Safety: cuDNN only writes the workspace before reading it.
                    let own = unsafe { stream.alloc::<u8>(plan.workspace) }.map_err(candle_core::Error::wrap)?;
                    Some(recorded.insert(own))
                } else {
                    if state.workspace.as_ref().is_none_or(|w| w.len() < plan.workspace) {
                        state.workspace = Some(
                            stream
                                .alloc_zeros::<u8>(plan.workspace)
                                .map_err(candle_core::Error::wrap)?,
                        );
                    }
                    state.workspace.as_mut()
                };
                forward(state.handle, plan, &stream, &xv, &wv, &mut y, workspace)?;
                let [n, k, oh, ow] = plan.out;
                let shape = if key.nhwc {
                    Shape::from((n, oh, ow, k))
                } else {
                    Shape::from((n, k, oh, ow))
                };
                Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), shape))
            })
        })
    }
}

/// Times every algorithm on these very buffers and keeps the fastest that succeeds.
fn find_algorithm<T: DeviceRepr>(
    handle: sys::cudnnHandle_t,
    plan: &mut ConvPlan,
    stream: &std::sync::Arc<CudaStream>,
    x: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
    w: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
    y: &mut CudaSlice<T>,
    ws: &mut CudaSlice<u8>,
) -> Result<()> {
    const N: usize = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
    let mut results: [sys::cudnnConvolutionFwdAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
    let mut returned: c_int = 0;
    {
        let (xp, _gx) = x.device_ptr(stream);
        let (wp, _gw) = w.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let ws_len = ws.len();
        let (wsp, _gws) = ws.device_ptr_mut(stream);
        unsafe {
            check(
                sys::cudnnFindConvolutionForwardAlgorithmEx(
                    handle,
                    plan.x,
                    xp as *const c_void,
                    plan.w,
                    wp as *const c_void,
                    plan.conv,
                    plan.y,
                    yp as *mut c_void,
                    N as c_int,
                    &mut returned,
                    results.as_mut_ptr(),
                    wsp as *mut c_void,
                    ws_len,
                ),
                "find algorithm",
            )?;
        }
    }
    let best = results[..returned as usize]
        .iter()
        .find(|r| r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
        .ok_or_else(|| candle_core::Error::Msg("cuDNN found no algorithm for this convolution".into()))?;
    tracing::debug!(algo = ?best.algo, ms = best.time, workspace = best.memory, "cuDNN convolution algorithm");
    adopt(plan, best)
}

/// Makes `chosen` the plan's algorithm, with the workspace and the math type
/// cuDNN reported it with (the one it was timed or ranked under).
fn adopt(plan: &mut ConvPlan, chosen: &sys::cudnnConvolutionFwdAlgoPerf_t) -> Result<()> {
    plan.algo = chosen.algo;
    plan.workspace = chosen.memory;
    unsafe {
        check(
            sys::cudnnSetConvolutionMathType(plan.conv, chosen.mathType),
            "set math type",
        )
    }
}

/// Takes cuDNN's first-ranked algorithm that runs with at most `max_workspace`
/// bytes, without running any.
fn rank_algorithm(handle: sys::cudnnHandle_t, plan: &mut ConvPlan, max_workspace: usize) -> Result<()> {
    const N: usize = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
    let mut results: [sys::cudnnConvolutionFwdAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
    let mut returned: c_int = 0;
    unsafe {
        check(
            sys::cudnnGetConvolutionForwardAlgorithm_v7(
                handle,
                plan.x,
                plan.w,
                plan.conv,
                plan.y,
                N as c_int,
                &mut returned,
                results.as_mut_ptr(),
            ),
            "rank algorithms",
        )?;
    }
    let best = results[..returned as usize]
        .iter()
        .find(|r| r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && r.memory <= max_workspace)
        .ok_or_else(|| candle_core::Error::Msg("cuDNN ranked no algorithm for this convolution".into()))?;
    tracing::debug!(algo = ?best.algo, workspace = best.memory, "cuDNN convolution algorithm (ranked)");
    adopt(plan, best)
}

fn forward<T: DeviceRepr>(
    handle: sys::cudnnHandle_t,
    plan: &ConvPlan,
    stream: &std::sync::Arc<CudaStream>,
    x: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
    w: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
    y: &mut CudaSlice<T>,
    workspace: Option<&mut CudaSlice<u8>>,
) -> Result<()> {
    // alpha/beta are f32 for every data type but f64
    let (alpha, beta) = (1f32, 0f32);
    let (xp, _gx) = x.device_ptr(stream);
    let (wp, _gw) = w.device_ptr(stream);
    let (yp, _gy) = y.device_ptr_mut(stream);
    let (wsp, ws_len, _gws) = match workspace {
        Some(ws) if plan.workspace > 0 => {
            let len = ws.len();
            let (p, g) = ws.device_ptr_mut(stream);
            (p as *mut c_void, len, Some(g))
        }
        _ => (std::ptr::null_mut(), 0, None),
    };
    unsafe {
        check(
            sys::cudnnConvolutionForward(
                handle,
                &alpha as *const f32 as *const c_void,
                plan.x,
                xp as *const c_void,
                plan.w,
                wp as *const c_void,
                plan.conv,
                plan.algo,
                wsp,
                ws_len,
                &beta as *const f32 as *const c_void,
                plan.y,
                yp as *mut c_void,
            ),
            "convolution forward",
        )
    }
}

impl CudaOp for CudnnConv {
    const NAME: &'static str = "cudnn-conv2d";
}

impl Launch2 for CudnnConv {
    fn launch<T: Elem>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run::<T>(&x.device().clone(), x, xl, w, wl)
    }
}
