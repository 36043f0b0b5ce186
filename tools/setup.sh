#!/usr/bin/env bash
# Creates .venv (if missing), installs requirements.txt into it and builds pfc_fast there
# (editable install, so the source tree and the installed package are the same thing).
#
#   FORCE_CUDA=1      compile the CUDA kernels even without a GPU (as CI does); the architectures
#                     come from TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200)
#   FORCE_ONLY_CPU=1  build the CPU kernels only
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
MAX_JOBS="${MAX_JOBS:-$(nproc)}" .venv/bin/python -m pip install --quiet --disable-pip-version-check \
  --no-build-isolation --no-deps -e .
.venv/bin/python -c "import pfc_fast; print('pfc_fast built:', pfc_fast.build_info())"
