//! With the `cuda` feature, compiles `kernels/sdxl.cu` to PTX with nvcc (the
//! same nvcc and compute capability candle's own kernels are built with:
//! `NVCC`/`CUDA_COMPUTE_CAP`, see scripts/cuda-env.sh). CPU builds need no
//! CUDA toolkit and skip this.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/sdxl.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("sdxl.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("kernels/sdxl.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (set NVCC, or source scripts/cuda-env.sh): {e}"));
    assert!(status.success(), "{nvcc} failed to compile kernels/sdxl.cu");
}
