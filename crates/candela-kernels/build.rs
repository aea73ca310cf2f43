//! With feature `cuda`: compile kernels/candela.cu with nvcc into one fatbin
//! (SASS for each arch in CANDELA_CUDA_ARCHS, default 80,90, plus PTX of the
//! newest for GPUs after it), embedded by src/cuda.rs. Without it: nothing.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
    {
        return Some(p);
    }
    for var in ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let p = PathBuf::from("/usr/local/cuda/bin/nvcc");
    p.is_file().then_some(p)
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_ROOT",
        "CUDA_HOME",
        "CUDA_PATH",
        "CANDELA_CUDA_ARCHS",
        "NVCC_APPEND_FLAGS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let Some(nvcc) = nvcc() else {
        panic!(
            "candela-kernels: nvcc not found (set NVCC or CUDA_ROOT, or put nvcc on PATH). \
             `eval \"$(scripts/install-cuda-toolkit.sh)\"` installs one and sets them."
        );
    };
    let archs = env::var("CANDELA_CUDA_ARCHS").unwrap_or_else(|_| "80,90".into());
    let mut archs: Vec<u32> = archs
        .split(',')
        .map(|a| a.trim().trim_start_matches("sm_"))
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| panic!("candela-kernels: bad arch {a:?} in CANDELA_CUDA_ARCHS"))
        })
        .collect();
    archs.sort_unstable();
    archs.dedup();
    let Some(&newest) = archs.last() else {
        panic!("candela-kernels: CANDELA_CUDA_ARCHS names no architecture");
    };
    if archs[0] < 80 {
        panic!(
            "candela-kernels: the kernels need sm_80 or newer (bf16), got sm_{}",
            archs[0]
        );
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("candela.fatbin");
    let mut cmd = Command::new(&nvcc);
    cmd.args(["--fatbin", "-O3", "-std=c++17", "--threads", "0"]);
    for a in &archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    cmd.arg(format!(
        "-gencode=arch=compute_{newest},code=compute_{newest}"
    ));
    cmd.arg("-o").arg(&out).arg("kernels/candela.cu");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("candela-kernels: cannot run {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("candela-kernels: nvcc failed ({status}) compiling kernels/candela.cu");
    }
}
