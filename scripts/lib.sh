# Shared helpers for the scripts: install what is missing, find or start a Redis.
# Sourced, not run.

say() { printf '==> %s\n' "$*" >&2; }

# apt_install PACKAGE WHY: installs PACKAGE with apt-get when we are root; otherwise says
# exactly what to install.
apt_install() {
  local pkg=$1 why=$2
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing $pkg ($why)"
    if [ -z "${FREE_ROAM_APT_UPDATED:-}" ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
      export FREE_ROAM_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >&2
  else
    say "missing: $why. Install the '$pkg' package (for example: sudo apt-get install -y $pkg)."
    return 1
  fi
}

# ensure_command CMD PACKAGE: installs PACKAGE when CMD is missing.
ensure_command() {
  command -v "$1" >/dev/null 2>&1 || apt_install "$2" "the $1 command"
}

# The RTSP camera the tests serve (tests/rtsp/serve.py): GStreamer's RTSP server with an
# H.264 encoder, driven from the system Python.
RTSP_TEST_PACKAGES="python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly"
rtsp_server_ready() {
  /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0"); gi.require_version("Gst", "1.0"); from gi.repository import Gst, GstRtspServer; Gst.init(None); assert Gst.ElementFactory.find("x264enc") and Gst.ElementFactory.find("rtph264pay")' >/dev/null 2>&1
}
ensure_rtsp_server() {
  rtsp_server_ready && return 0
  local pkg
  for pkg in $RTSP_TEST_PACKAGES; do
    apt_install "$pkg" "the RTSP test server" || return 1
  done
}

# ensure_run_tools: what building and running a worker against a local Redis needs
# (scripts/demo); ensure_tools adds what the tests and benchmarks serve or sign with.
ensure_run_tools() {
  ensure_command redis-server redis-server
  ensure_command redis-cli redis-tools
  ensure_command ffmpeg ffmpeg
  ensure_build_tools
}

ensure_tools() {
  ensure_run_tools
  # tests/it/security.rs makes its test CA and certificates with it.
  ensure_command openssl openssl
  ensure_rtsp_server
}

# ensure_build_tools: what building the worker needs.
ensure_build_tools() {
  # libjpeg-turbo is built from its bundled source (src/source/image_decode.rs).
  ensure_command cmake cmake
  ensure_command nasm nasm
  ensure_command cargo cargo || { say "Rust (cargo) is needed: see https://rustup.rs"; return 1; }
}

# ensure_python_venv: python3 with its venv module (Debian splits it out), for the scripts
# that install Python tools by package name into a venv.
ensure_python_venv() {
  ensure_command python3 python3
  python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv "python3's venv module"
}

# The fast build. On x86_64 the worker links Intel MKL statically, OpenMP runtime included
# (docs/models.md), so it starts with no library path set; MKL comes from PyPI by package
# name into .deps/mkl (ignored by git) on first need. Elsewhere, where MKL cannot be had, or
# with FREE_ROAM_PLAIN_BUILD=1, the plain build is used and one line says what it costs.
MKL_DIR=${MKL_DIR:-$(pwd)/.deps/mkl}
PLAIN_BUILD_COST="CLIP then runs at about 1.5x to 1.8x PyTorch's time per frame instead of at or under it (BENCHMARKS.md)"

# ensure_mkl: installs MKL's static libraries, headers and OpenMP runtime into $MKL_DIR.
ensure_mkl() {
  [ -f "$MKL_DIR/include/mkl.h" ] && [ -f "$MKL_DIR/lib/libiomp5.a" ] && return 0
  ensure_python_venv || return 1
  say "installing Intel MKL from PyPI into $MKL_DIR (once; about 300 MB to download)"
  local tmp="$MKL_DIR.partial"
  rm -rf "$tmp"
  # A virtual environment, so that a Debian python3 (externally managed) installs too.
  { python3 -m venv "$tmp" && "$tmp/bin/pip" install -q --disable-pip-version-check --no-deps \
      mkl-static mkl-include intel-openmp >&2; } || { rm -rf "$tmp"; return 1; }
  # Without the shared OpenMP runtime beside it the linker takes libiomp5.a: the binary then
  # needs no LD_LIBRARY_PATH. Only the libraries the lp64 OpenMP build links are kept.
  mkdir -p "$tmp/keep"
  mv "$tmp"/lib/libmkl_intel_lp64.a "$tmp"/lib/libmkl_intel_thread.a "$tmp"/lib/libmkl_core.a \
     "$tmp"/lib/libiomp5.a "$tmp/keep/"
  rm -rf "$tmp/lib" "$tmp/lib64" "$tmp/bin" "$tmp/opt" "$tmp/share" "$tmp/pyvenv.cfg"
  mv "$tmp/keep" "$tmp/lib"
  rm -rf "$MKL_DIR"
  mkdir -p "$(dirname "$MKL_DIR")"
  mv "$tmp" "$MKL_DIR"
}

# use_fast_build: sets FEATURES to the cargo features of the fast build for this machine
# (adding to CARGO_FEATURES) and exports MKLROOT when it is the mkl build.
use_fast_build() {
  FEATURES=${CARGO_FEATURES:-}
  if [ -n "${FREE_ROAM_PLAIN_BUILD:-}" ]; then
    say "plain build (FREE_ROAM_PLAIN_BUILD is set): $PLAIN_BUILD_COST"
  elif [ "$(uname -m)" != x86_64 ]; then
    say "plain build: Intel MKL is for x86_64 and this is $(uname -m). $PLAIN_BUILD_COST"
  elif ensure_mkl; then
    export MKLROOT=$MKL_DIR
    case ",$FEATURES," in *,mkl,*) ;; *) FEATURES="mkl${FEATURES:+,$FEATURES}" ;; esac
  else
    say "plain build: Intel MKL could not be installed from PyPI. $PLAIN_BUILD_COST"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# use_redis: exports REDIS_URL: the one given, a reachable one on 127.0.0.1:6379, or a
# private redis-server on a free port (stopped by stop_private_redis).
use_redis() {
  if [ -n "${REDIS_URL:-}" ]; then return 0; fi
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    export REDIS_URL=redis://127.0.0.1:6379/0
    say "using the Redis on 127.0.0.1:6379"
    return 0
  fi
  local port dir
  port=$(free_port)
  dir=$(mktemp -d)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  export REDIS_URL="redis://127.0.0.1:$port/0"
  export FREE_ROAM_PRIVATE_REDIS_DIR=$dir
  say "no Redis was reachable: started a private one on port $port"
}

stop_private_redis() {
  if [ -n "${FREE_ROAM_PRIVATE_REDIS_DIR:-}" ] && [ -f "$FREE_ROAM_PRIVATE_REDIS_DIR/redis.pid" ]; then
    kill "$(cat "$FREE_ROAM_PRIVATE_REDIS_DIR/redis.pid")" 2>/dev/null || true
    rm -rf "$FREE_ROAM_PRIVATE_REDIS_DIR"
  fi
}

# The CUDA build (scripts/gpu-check build, docs/models.md): CUDA 13.0's compiler, headers and
# the shared libraries candle links, from PyPI by package name into .deps/cuda (ignored by
# git), laid out as a toolkit root (bin, include, lib, nvvm) for CUDA_HOME. 13.0, the first
# CUDA 13: its PTX is JIT-compiled by every CUDA 13 driver, and cudarc knows its API.
CUDA_DIR=${CUDA_DIR:-$(pwd)/.deps/cuda}
CUDA_PACKAGES="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35"

# ensure_cuda: installs the toolkit into $CUDA_DIR. candle builds cudarc with dynamic
# linking, so the linker needs each library by its plain name (libcublas.so, ...) and the
# driver's libcuda.so, which no package ships: a stub defining every function cuda.h
# declares stands in for it (as the toolkit's own lib/stubs does); the driver's real one is
# loaded when the binary starts. Each stub function answers CUDA_ERROR_NO_DEVICE (100), so
# that with the stub on the loader's path a binary runs on the CPU of a machine without a
# driver.
ensure_cuda() {
  [ -x "$CUDA_DIR/bin/nvcc" ] && [ -f "$CUDA_DIR/lib/stubs/libcuda.so" ] && return 0
  ensure_python_venv || return 1
  ensure_command gcc gcc || return 1
  say "installing CUDA 13.0's compiler and libraries from PyPI into $CUDA_DIR (once; about 1 GB to download)"
  local tmp="$CUDA_DIR.partial" root lib
  rm -rf "$tmp"
  # shellcheck disable=SC2086 # the package list splits on purpose
  { python3 -m venv "$tmp/venv" && "$tmp/venv/bin/pip" install -q --disable-pip-version-check \
      --no-deps $CUDA_PACKAGES >&2; } || { rm -rf "$tmp"; return 1; }
  root=$(echo "$tmp"/venv/lib/python3*/site-packages/nvidia/cu13)
  mv "$root" "$tmp/toolkit"
  rm -rf "$tmp/venv"
  for lib in "$tmp"/toolkit/lib/lib*.so.*; do
    case $lib in *.alt.so.*|*-builtins*) continue ;; esac
    ln -sf "$(basename "$lib")" "${lib%.so.*}.so"
  done
  mkdir -p "$tmp/toolkit/lib/stubs"
  # Every cu* function cuda.h declares, under both its plain and versioned names.
  { gcc -E -I"$tmp/toolkit/include" "$tmp/toolkit/include/cuda.h"
    gcc -E -D__CUDA_API_VERSION_INTERNAL -I"$tmp/toolkit/include" "$tmp/toolkit/include/cuda.h"; } \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u \
    | sed 's/.*/int &(void) { return 100; }/' >"$tmp/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tmp/toolkit/lib/stubs/libcuda.so" "$tmp/cuda_stub.c" \
    || { rm -rf "$tmp"; return 1; }
  rm -f "$tmp/cuda_stub.c"
  rm -rf "$CUDA_DIR"
  mv "$tmp/toolkit" "$CUDA_DIR"
  rmdir "$tmp"
}
