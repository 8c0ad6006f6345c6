use cudaforge::{KernelBuilder, Result};
use std::env;
use std::path::PathBuf;

const CUTILE_FEATURE: &str = "CARGO_FEATURE_CUTILE";

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    println!("cargo::rerun-if-changed=src/compatibility.cuh");
    println!("cargo::rerun-if-changed=src/cuda_utils.cuh");
    println!("cargo::rerun-if-changed=src/binary_op_macros.cuh");

    // Build for PTX
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let ptx_path = out_dir.join("ptx.rs");
    let bindings = KernelBuilder::new()
        .source_dir("src") // Scan src/ for .cu files
        .exclude(&["moe_*.cu", "mmvq_gguf.cu", "mmq_*.cu"]) // Exclude statically compiled kernels from ptx build
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()?;

    bindings.write(&ptx_path)?;
    write_cubins(&out_dir);

    let mut moe_sources = vec![
        "src/moe/moe_gguf.cu",
        "src/moe/moe_wmma.cu",
        "src/moe/moe_wmma_gguf.cu",
        "src/mmvq_gguf.cu",
        "src/mmq_gguf/mmq_quantize.cu",
        "src/mmq_gguf/mmq_instance_q4_0.cu",
        "src/mmq_gguf/mmq_instance_q4_1.cu",
        "src/mmq_gguf/mmq_instance_q5_0.cu",
        "src/mmq_gguf/mmq_instance_q5_1.cu",
        "src/mmq_gguf/mmq_instance_q8_0.cu",
        "src/mmq_gguf/mmq_instance_q2_k.cu",
        "src/mmq_gguf/mmq_instance_q3_k.cu",
        "src/mmq_gguf/mmq_instance_q4_k.cu",
        "src/mmq_gguf/mmq_instance_q5_k.cu",
        "src/mmq_gguf/mmq_instance_q6_k.cu",
    ];
    if env::var_os(CUTILE_FEATURE).is_some() {
        moe_sources.push("src/moe/moe_align.cu");
    }

    let mut moe_builder = KernelBuilder::default()
        .source_files(moe_sources)
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3");

    // Disable bf16 WMMA kernels on GPUs older than sm_80 (Ampere).
    // bf16 WMMA fragments require compute capability >= 8.0.
    let compute_cap = cudaforge::detect_compute_cap()
        .map(|arch| arch.base())
        .unwrap_or(80);
    if compute_cap < 80 {
        moe_builder = moe_builder.arg("-DNO_BF16_KERNEL");
    }

    let mut is_target_msvc = false;
    if let Ok(target) = std::env::var("TARGET") {
        if target.contains("msvc") {
            is_target_msvc = true;
            moe_builder = moe_builder.arg("-D_USE_MATH_DEFINES");
        }
    }

    if !is_target_msvc {
        moe_builder = moe_builder.arg("-Xcompiler").arg("-fPIC");
    }

    moe_builder.build_lib(out_dir.join("libmoe.a"))?;
    println!("cargo:rustc-link-search={}", out_dir.display());
    println!("cargo:rustc-link-lib=moe");
    println!("cargo:rustc-link-lib=dylib=cudart");
    if !is_target_msvc {
        println!("cargo:rustc-link-lib=stdc++");
    }
    Ok(())
}

/// sdxl-queue's patch: machine code for the GPU the PTX targets, so the driver
/// JIT-compiles nothing at first use (10-15 s on a fresh machine otherwise).
/// Each module's PTX goes through `ptxas` for the architecture its `.target`
/// names; `cubin.rs` holds the images, an empty one where `ptxas` is missing
/// or fails (that module then loads its PTX, as upstream). The quantized
/// module is left as PTX: 5.8 MB that takes ptxas minutes, for GGUF models only.
fn write_cubins(out_dir: &std::path::Path) {
    const MODULES: [&str; 11] = [
        "affine",
        "binary",
        "cast",
        "conv",
        "fill",
        "indexing",
        "quantized",
        "reduce",
        "sort",
        "ternary",
        "unary",
    ];
    println!("cargo::rerun-if-env-changed=PTXAS");
    let ptxas = env::var_os("PTXAS").map(PathBuf::from).unwrap_or_else(|| {
        let beside_nvcc = env::var_os("NVCC")
            .map(PathBuf::from)
            .and_then(|nvcc| nvcc.parent().map(|dir| dir.join("ptxas")));
        let in_root = [
            "CUDA_ROOT",
            "CUDA_PATH",
            "CUDA_HOME",
            "CUDA_TOOLKIT_ROOT_DIR",
        ]
        .iter()
        .filter_map(env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("ptxas"))
        .find(|p| p.exists());
        beside_nvcc
            .filter(|p| p.exists())
            .or(in_root)
            .unwrap_or_else(|| PathBuf::from("ptxas"))
    });
    let threads: Vec<_> = MODULES
        .iter()
        .map(|&name| {
            let ptxas = ptxas.clone();
            let ptx = out_dir.join(format!("{name}.ptx"));
            let cubin = out_dir.join(format!("{name}.cubin"));
            std::thread::spawn(move || -> bool {
                let _ = std::fs::remove_file(&cubin);
                if name == "quantized" {
                    return false;
                }
                let Some(arch) = std::fs::read_to_string(&ptx).ok().and_then(|text| {
                    text.lines().find_map(|l| {
                        l.trim()
                            .strip_prefix(".target ")
                            .map(|t| t.trim().to_string())
                    })
                }) else {
                    return false;
                };
                let arch = arch
                    .split(',')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                match std::process::Command::new(&ptxas)
                    .arg(format!("-arch={arch}"))
                    .arg("-O3")
                    .arg(&ptx)
                    .arg("-o")
                    .arg(&cubin)
                    .output()
                {
                    Ok(out) if out.status.success() => true,
                    Ok(out) => {
                        println!(
                            "cargo::warning=ptxas {name}.ptx: {} (it loads as PTX)",
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                        false
                    }
                    Err(e) => {
                        println!(
                            "cargo::warning=no ptxas ({}): {e}; the kernels load as PTX",
                            ptxas.display()
                        );
                        false
                    }
                }
            })
        })
        .collect();
    let mut rs = String::new();
    for (name, thread) in MODULES.iter().zip(threads) {
        let built = thread.join().unwrap_or(false);
        let cst = name.to_uppercase();
        if built {
            rs.push_str(&format!(
                "pub const {cst}: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{name}.cubin\"));\n"
            ));
        } else {
            rs.push_str(&format!("pub const {cst}: &[u8] = &[];\n"));
        }
    }
    std::fs::write(out_dir.join("cubin.rs"), rs).expect("writing cubin.rs");
}
