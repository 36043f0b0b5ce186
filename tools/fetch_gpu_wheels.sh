#!/usr/bin/env bash
# Downloads the wheels the GPU machine lacks (it has no network) into benchmarks/wheels/
# (git-ignored; pass it to the device run with carry: ["benchmarks/wheels"]). The GPU machine
# runs Python 3.12 with torch, numpy and scipy but without POT, and perhaps with a setuptools older
# than the 77 that pyproject.toml's licence expression needs.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download pot==0.9.7.post1 --python-version 3.12 --only-binary=:all: --no-deps \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d benchmarks/wheels
python3 -m pip download "setuptools>=77" --only-binary=:all: --no-deps -d benchmarks/wheels
