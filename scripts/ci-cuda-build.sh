#!/usr/bin/env bash
# CI's CUDA check, compile only (CI has no GPU): install the toolkit (cached
# in ~/.cache/candela), build the CUDA addon, and compile the cuda-feature
# test binaries of the kernels and models crates, so the CUDA build never
# rots. Everything goes to target/cuda, apart from the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
stamp() { echo "[ci-cuda] $(($(date +%s) - start))s: $*"; }

stamp "CUDA toolkit"
# Assign first: `eval "$(…)"` would hide the installer's exit status.
cuda_env=$(bash scripts/install-cuda-toolkit.sh)
eval "$cuda_env"
nvcc --version | tail -1
stamp "CUDA addon (napi build --features cuda)"
bash scripts/build-native-cuda.sh
stamp "cuda-feature test binaries (cargo test --no-run)"
# candela-node is in the set only so features resolve as in the addon's build
# (napi's macros turn on syn's "full"); otherwise candle and its ~10 minutes
# of nvcc would be compiled a second time.
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}" cargo test --release --no-run --features cuda \
  -p candela-kernels -p candela-models -p candela-node --target "$(rustc -vV | sed -n 's/^host: //p')"
stamp "done"
