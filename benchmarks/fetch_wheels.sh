#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_run.sh installs on the GPU machine (which has torch and no network)
# into benchmarks/wheels/ (git-ignored through .git/info/exclude; never commit wheels).
#   bash benchmarks/fetch_wheels.sh
# Pure-Python wheels once; binary ones (pydantic-core, PyYAML, regex) for CPython 3.12 (the GPU
# machine's python3) and 3.11 (this machine's, to test the script here), manylinux x86_64.
# No torch, numpy or nvidia packages. About 29 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
mkdir -p benchmarks/wheels .git/info
grep -qx '/benchmarks/wheels/' .git/info/exclude 2>/dev/null || echo '/benchmarks/wheels/' >> .git/info/exclude
mapfile -t pins < <(grep -v '^#' benchmarks/requirements-gpu.txt | grep .)
for version in 3.12 3.11; do
  $PIP download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d benchmarks/wheels "${pins[@]}"
done
du -sh benchmarks/wheels
