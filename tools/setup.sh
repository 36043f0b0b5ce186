#!/usr/bin/env bash
# Creates .venv (if missing), installs requirements.txt into it and builds pfc_fast there
# (editable install, so the source tree and the installed package are the same thing).
#
#   FORCE_CUDA=1      compile the CUDA kernels even without a GPU (as CI does); the architectures
#                     come from TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200)
#   FORCE_ONLY_CPU=1  build the CPU kernels only
#   PFC_FAST_SIMT=1   also build the CUDA kernels for the SIMT layer (pfc_fast._simt: they run on the
#                     CPU in the tests' simt cases); the default with FORCE_CUDA=1. Needs
#                     Boost.Context, which this script installs with apt-get when it runs as root
#   PFC_FAST_SIMT=0   do not build it (unset and without FORCE_CUDA=1: built where Boost is found)
#   PYTHON=python3.x  the interpreter that creates .venv
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda  # torch would guess /usr/local (nvcc there is a wrapper)
fi
if [ "${FORCE_CUDA:-0}" = "1" ]; then
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  # /usr/local/cuda here has no cuBLAS headers; the pip wheels of CUDA 13 do.
  nvidia_include=$(.venv/bin/python -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null || true)
  if [ -n "$nvidia_include" ] && [ -d "$nvidia_include" ]; then
    export CUDA_INC_PATH="${CUDA_INC_PATH:-$nvidia_include}"
  fi
fi
if [ "${FORCE_CUDA:-0}" = "1" ] && [ -z "${PFC_FAST_SIMT:-}" ]; then
  export PFC_FAST_SIMT=1
fi
if [ "${PFC_FAST_SIMT:-}" = "1" ] && [ -z "${BOOST_ROOT:-}" ] && [ ! -e /usr/include/boost/context/fiber.hpp ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get > /dev/null; then
    echo "setup.sh: installing Boost.Context (libboost-context-dev) for the SIMT layer"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libboost-context-dev > /dev/null
  else
    echo "setup.sh: the SIMT layer (PFC_FAST_SIMT=1) needs Boost.Context: install it" \
      "(sudo apt-get install libboost-context-dev), set BOOST_ROOT, or set PFC_FAST_SIMT=0" >&2
    exit 1
  fi
fi
MAX_JOBS="${MAX_JOBS:-$(nproc)}" .venv/bin/python -m pip install --quiet --disable-pip-version-check \
  --no-build-isolation --no-deps -e .
.venv/bin/python -c "import pfc_fast; print('pfc_fast built:', pfc_fast.build_info())"
