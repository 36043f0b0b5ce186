#!/usr/bin/env bash
# The CPU twin of compute-sanitizer's memcheck: builds pfc_fast._simt with AddressSanitizer
# (PFC_FAST_SIMT_ASAN=1: it tells ASan about every switch between fiber stacks) into
# build/simt-asan/, beside a copy of the package, and runs the suite's simt cases (every CUDA
# kernel, run by the SIMT layer) there with libasan preloaded. A kernel's read or write outside a
# tensor, its block's shared memory or its thread's stack stops the run with ASan's report.
# Usage, after tools/setup.sh: bash tools/simt_asan.sh [more pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="$root/build/simt-asan"
mkdir -p "$out"
PFC_FAST_SIMT=1 PFC_FAST_SIMT_ASAN=1 FORCE_ONLY_CPU=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  .venv/bin/python setup.py -q build_ext --build-lib "$out/lib" --build-temp "$out/tmp" > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
rm -rf "$out/pkg" && mkdir -p "$out/pkg"
cp -r pfc_fast "$out/pkg/"
cp "$out"/lib/pfc_fast/_simt*.so "$out/pkg/pfc_fast/"
cd "$out/pkg"  # this copy of pfc_fast comes first on sys.path (the tests import benchmarks/ from the root)
# libstdc++ too, so that ASan's interceptor of __cxa_throw finds the real one (Python does not link it)
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1"
PYTHONPATH="$out/pkg" "$root/.venv/bin/python" -c "import pfc_fast._simt as s; assert s.asan == 1, 'not the ASan build'; print('pfc_fast._simt built with ASan')"
PYTHONPATH="$out/pkg:$root" "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider --capture=sys -m simt "$root/tests" "$@"  # ASan reports reach the terminal
