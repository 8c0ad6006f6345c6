//! With the `cuda` feature, compiles each `kernels/*.cu` with nvcc into a
//! fatbin holding machine code (SASS) for `CUDA_COMPUTE_CAP` and PTX of the
//! same architecture as the fallback (the same nvcc and compute capability
//! candle's own kernels are built with: `NVCC`/`CUDA_COMPUTE_CAP`, see
//! scripts/cuda-env.sh). Shipping SASS means the driver has nothing to
//! JIT-compile for our kernels on a fresh machine (cold start, P11); the PTX
//! lets a newer GPU of the same family still load them. CPU builds need no
//! CUDA toolkit and skip this.
//!
//! `kernels/attention_sm90.cu` (the wgmma flash attention) is compiled for
//! `sm_90a` when `CUDA_COMPUTE_CAP` is 90: wgmma is an architecture-specific
//! feature, so that fatbin holds machine code for exactly compute capability
//! 9.0 and no PTX. The build then sets `SDXL_SM90A_ATTENTION` for the crate,
//! and the host launches those kernels on 9.0 devices only. For any other
//! capability the file compiles to stubs that are never launched.

use std::path::PathBuf;
use std::process::Command;

/// The kernel sources, each becoming `$OUT_DIR/{name}.fatbin`.
const KERNELS: [&str; 4] = ["sdxl", "attention", "attention_sm90", "fp8"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for name in KERNELS {
        println!("cargo:rerun-if-changed=kernels/{name}.cu");
    }
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    println!("cargo:rerun-if-changed=kernels/flash.cuh");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    for name in KERNELS {
        let out = out_dir.join(format!("{name}.fatbin"));
        let gencode = if name == "attention_sm90" && cap == "90" {
            println!("cargo:rustc-env=SDXL_SM90A_ATTENTION=1");
            vec!["-gencode=arch=compute_90a,code=sm_90a".to_string()]
        } else {
            vec![
                format!("-gencode=arch=compute_{cap},code=sm_{cap}"),
                format!("-gencode=arch=compute_{cap},code=compute_{cap}"),
            ]
        };
        let status = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17"])
            .args(&gencode)
            .arg("-o")
            .arg(&out)
            .arg(format!("kernels/{name}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} (set NVCC, or source scripts/cuda-env.sh): {e}"));
        assert!(status.success(), "{nvcc} failed to compile kernels/{name}.cu");
    }
}
