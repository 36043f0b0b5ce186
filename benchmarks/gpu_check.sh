#!/usr/bin/env bash
# The GPU check: on a machine with a GPU and its own python3 + torch (no network), build pfc_fast
# from source with the CUDA kernels, run the test suite (its CUDA cases run there) and the CUDA
# cases of the benchmark suite at the tiny size, the GPU benchmarks (python -m benchmarks --quick
# --device cuda: Sinkhorn at N = M = 10,000 and 50,000 against POT, nc_metrics at N = 50,000,
# D = 512 against the time to read the features, ...), then compute-sanitizer memcheck on the CUDA
# tests of tests/test_ops.py and the tiny CUDA cases of ours (where compute-sanitizer exists).
# Writes benchmarks/results/gpu-check-<card>.log and bench-<card>.{json,md,png}, and copies them to
# $OUT when the device tool sets it. POT comes from benchmarks/wheels/ (fetched on the development
# machine by tools/fetch_gpu_wheels.sh and carried along). Meant to finish within 8 minutes on an H100.
# Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
export FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

card=$("$PY" -c "import torch; from benchmarks.timing import machine_name; print(machine_name(torch.device('cuda')))")
log="$RESULTS/gpu-check-$card.log"
{
  echo "# gpu_check $(date -u +%FT%TZ) on $card"
  "$PY" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import setuptools; print('setuptools', setuptools.__version__, '(the build needs >= 77: tools/fetch_gpu_wheels.sh)')" || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
} > "$log"

if ls benchmarks/wheels/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-deps --no-index --target /tmp/pfc_fast_wheels benchmarks/wheels/*.whl >> "$log" 2>&1
  export PYTHONPATH="/tmp/pfc_fast_wheels${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # step NAME COMMAND...: run it, its output to the terminal and the log, with its time
  local start=$(date +%s) code
  echo "## $1" | tee -a "$log"
  "${@:2}" 2>&1 | tee -a "$log"
  code=${PIPESTATUS[0]}
  echo "## $1: exit $code, $(( $(date +%s) - start )) s" | tee -a "$log"
  return "$code"
}

status=0
if ! step build "$PY" setup.py build_ext --inplace > /dev/null; then
  echo "BUILD FAILED (see $log)"; tail -40 "$log"; status=1
else
  step build_info "$PY" -c "import pfc_fast; print(pfc_fast.build_info())"
  step tests "$PY" -m pytest -q -p no:cacheprovider tests || status=1
  step benchmark-suite "$PY" -m pytest -q -p no:cacheprovider benchmarks -k cuda --bench-size tiny \
    --benchmark-disable || status=1
  step bench "$PY" -m benchmarks --quick --device cuda --out "$RESULTS" --replace || status=1

  sanitizer=$(command -v compute-sanitizer || true)
  if [ -z "$sanitizer" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]; then
    sanitizer="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
  fi
  if [ -n "$sanitizer" ]; then
    # no caching allocator, so an access past a tensor's end hits unallocated memory
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck timeout 120 "$sanitizer" --tool memcheck --error-exitcode 99 \
      --print-limit 20 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py benchmarks/test_benchmarks.py \
      -k "cuda and (opcheck or ours)" --bench-size tiny --benchmark-disable
    case $? in
      0) ;;
      124) echo "## memcheck: stopped after 120 s, incomplete (not counted as a failure)" | tee -a "$log" ;;
      *) status=1 ;;
    esac
  else
    echo "## memcheck: compute-sanitizer not found (PATH, \$CUDA_HOME/bin): skipped" | tee -a "$log"
  fi
fi
echo "# gpu_check done: exit $status" | tee -a "$log"
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*"$card"* "$OUT"/ 2>/dev/null || true; fi
exit "$status"
