#!/usr/bin/env bash
# CI's CUDA check, compile only (CI has no GPU): install the toolkit (cached
# in ~/.cache/candela), build the CUDA addon, and type-check the cuda-feature
# tests of the kernels and models crates, so the CUDA build never rots.
# Everything goes to target/cuda, apart from the CPU build.
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
stamp "cuda-feature tests, type-checked (cargo check --tests)"
# Checked, not linked: the addon above is the linked CUDA build, and 17 linked
# test binaries would take ~1.2 GB of disk for no more than this catches.
# Build scripts (candle-kernels' nvcc) are shared with the addon's build.
# candela-node is in the set only so features resolve as in the addon's build
# (napi's macros turn on syn's "full"); otherwise candle's build script would
# run a second time.
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}" cargo check --release --tests --features cuda \
  -p candela-kernels -p candela-models -p candela-node --target "$(rustc -vV | sed -n 's/^host: //p')"
stamp "done"
