//! Our kernel modules — fatbins with machine code for the build's compute
//! capability and PTX as the fallback (`sdxl/build.rs`) — loaded once per
//! device and their functions looked up once per name. Loading machine code
//! costs the driver no JIT compilation, unlike a PTX module.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchArgs};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::Result;

/// One of `sdxl/kernels/*.cu`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Module {
    /// Norms, GEGLU, bias adds, upsampling (`kernels/sdxl.cu`).
    Sdxl,
    /// Flash attention on mma.sync (`kernels/attention.cu`).
    Attention,
    /// Flash attention on Hopper's wgmma (`kernels/attention_sm90.cu`): machine
    /// code for compute capability 9.0 only (see [`sm90a_attention`]).
    AttentionSm90,
    /// FP8 quantization and the FP8 products' epilogue (`kernels/fp8.cu`).
    Fp8,
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Module::Sdxl => include_bytes!(concat!(env!("OUT_DIR"), "/sdxl.fatbin")),
            Module::Attention => include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin")),
            Module::AttentionSm90 => include_bytes!(concat!(env!("OUT_DIR"), "/attention_sm90.fatbin")),
            Module::Fp8 => include_bytes!(concat!(env!("OUT_DIR"), "/fp8.fatbin")),
        }
    }
}

/// Whether [`Module::AttentionSm90`]'s kernels can run on `dev`: the build
/// compiled them for `sm_90a` (`CUDA_COMPUTE_CAP=90`) and `dev` is compute
/// capability 9.0 (H100, H200, GH200). Asked once per device.
pub fn sm90a_attention(dev: &CudaDevice) -> bool {
    static BY_DEVICE: OnceLock<Mutex<HashMap<DeviceId, bool>>> = OnceLock::new();
    if option_env!("SDXL_SM90A_ATTENTION").is_none() {
        return false;
    }
    let mut known = BY_DEVICE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    *known.entry(dev.id()).or_insert_with(|| {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as Attr;
        let ctx = dev.cuda_stream().context().clone();
        let cap = |a| ctx.attribute(a).ok();
        (
            cap(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            cap(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        ) == (Some(9), Some(0))
    })
}

/// A kernel of one of our modules, ready to launch on the device's stream.
pub struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    /// Arguments are pushed on the builder in the kernel's parameter order.
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

type Modules = HashMap<(DeviceId, Module), Arc<CudaModule>>;
type Functions = HashMap<(DeviceId, Module, String), CudaFunction>;

fn modules() -> &'static Mutex<(Modules, Functions)> {
    static LOADED: OnceLock<Mutex<(Modules, Functions)>> = OnceLock::new();
    LOADED.get_or_init(Default::default)
}

/// The function `name` of `module` on `dev` (the module is loaded on first use).
pub fn kernel(dev: &CudaDevice, module: Module, name: &str) -> Result<Kernel> {
    kernel_with_shared_bytes(dev, module, name, 0)
}

/// [`kernel`] for a function launched with `shared_bytes` of dynamic shared
/// memory: when the function is first looked up, it is allowed that much
/// (the driver refuses more than 48 KB otherwise).
pub fn kernel_with_shared_bytes(dev: &CudaDevice, module: Module, name: &str, shared_bytes: u32) -> Result<Kernel> {
    let stream = dev.cuda_stream();
    let mut guard = modules().lock().unwrap_or_else(|e| e.into_inner());
    let (mods, funcs) = &mut *guard;
    let key = (dev.id(), module, name.to_string());
    if let Some(func) = funcs.get(&key) {
        return Ok(Kernel {
            func: func.clone(),
            stream,
        });
    }
    let loaded = match mods.get(&(dev.id(), module)) {
        Some(m) => m.clone(),
        None => {
            let m = stream
                .context()
                .load_module(Ptx::from_binary(module.image().to_vec()))
                .map_err(candle_core::Error::wrap)?;
            mods.insert((dev.id(), module), m.clone());
            m
        }
    };
    let func = loaded.load_function(name).map_err(candle_core::Error::wrap)?;
    if shared_bytes > 0 {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute as Attr;
        func.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared_bytes as i32,
        )
        .map_err(candle_core::Error::wrap)?;
    }
    funcs.insert(key, func.clone());
    Ok(Kernel { func, stream })
}
