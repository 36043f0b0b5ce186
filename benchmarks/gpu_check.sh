#!/usr/bin/env bash
# The GPU check: on a machine with a GPU and its own python3 + torch (no network), build pfc_fast
# from source with the CUDA kernels, run the test suite (its CUDA cases run there), run the GPU
# benchmarks (nc_metrics, sinkhorn), and write the results under benchmarks/results/ (and copy
# them to $OUT, when the device tool sets it). POT comes from benchmarks/wheels/ (fetched on the
# development machine by tools/fetch_gpu_wheels.sh and carried along).
# Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
export FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

card=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
log="$RESULTS/gpu-check-$card.log"
{
  echo "# gpu_check $(date -u +%FT%TZ) on $card"
  "$PY" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
} > "$log"

if ls benchmarks/wheels/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-deps --no-index --target /tmp/pfc_fast_wheels benchmarks/wheels/*.whl >> "$log" 2>&1
  export PYTHONPATH="/tmp/pfc_fast_wheels${PYTHONPATH:+:$PYTHONPATH}"
fi

start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace >> "$log" 2>&1; then
  echo "BUILD FAILED (see $log)"; tail -40 "$log"; status=1
else
  echo "build: $(( $(date +%s) - start )) s" | tee -a "$log"
  "$PY" -c "import pfc_fast; print('build_info', pfc_fast.build_info())" | tee -a "$log"
  "$PY" -m pytest -q -p no:cacheprovider tests 2>&1 | tail -60 | tee -a "$log"
  status=${PIPESTATUS[0]}
  "$PY" -m benchmarks.nc_metrics_bench --device cuda --out "$RESULTS" 2>&1 | tee -a "$log"
  "$PY" -m benchmarks.sinkhorn_bench --device cuda --out "$RESULTS" 2>&1 | tee -a "$log"
fi
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*"$card"* "$OUT"/ 2>/dev/null || true; fi
exit "${status:-0}"
