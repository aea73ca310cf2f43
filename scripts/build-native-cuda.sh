#!/usr/bin/env bash
# Build the CUDA addon: native/candela.<platform>-cuda.node, the same API as
# the CPU addon compiled with the cargo feature `cuda` (candle's CUDA backend
# and candela-kernels). `npm run build:native:cuda` runs this.
#
# It compiles into its own cargo target dir (target/cuda, or
# $CARGO_TARGET_DIR) so it never invalidates the CPU build's artifacts.
# Without nvcc on PATH (or $NVCC), it installs and uses the toolkit of
# scripts/install-cuda-toolkit.sh. Extra arguments go to `napi build`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null; then
  cuda_env=$(bash scripts/install-cuda-toolkit.sh) # assigned first so a failed install stops here
  eval "$cuda_env"
fi
# candle's kernels: PTX for compute_80, which the driver JITs for newer GPUs.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
out="$CARGO_TARGET_DIR/napi"
rm -f "$out"/candela.*.node
npx napi build --platform --release --manifest-path crates/candela-node/Cargo.toml --features cuda \
  --output-dir "$out" --no-js --dts index.d.cts "$@"
built=$(ls "$out"/candela.*.node)
[ "$(echo "$built" | wc -l)" -eq 1 ] || { echo "build-native-cuda: expected one addon in $out, got: $built" >&2; exit 1; }
dest="native/$(basename "$built" .node)-cuda.node"
cp "$built" "$dest"
echo "build-native-cuda: $dest ($(du -h "$dest" | cut -f1))"
