#!/usr/bin/env bash
# Set up one virtual environment per transformers version and run the tests.
#   .venv       transformers 5.23.0: every test, then the golden and docs tests again as an AVX2-only
#               CPU runs them (other BLAS kernels, other rounding), then the docs build (warnings as errors)
#   .venv-5.17  transformers 5.17.0 + llmcompressor 0.14.0.1 (what LLM Compressor users run):
#               the real-model, zoo, explain-against-config and LLM Compressor tests, and the docs
#               examples (the LLM Compressor quick start runs only here)
#   .venv-5.25  transformers 5.25.0 (the newest release; no upper pin keeps it installable):
#               the real-model and zoo tests
# The golden plan texts of the rules (tests/test_golden_rules.py) run with every version and on AVX2 kernels.
# Each phase prints how long it took, and a summary closes the run.
set -euo pipefail
cd "$(dirname "$0")/.."

timings=()
phase() {  # phase NAME COMMAND...: run the command, then record how long it took
  local name=$1 start=$SECONDS
  shift
  echo "== ${name}"
  "$@"
  timings+=("$(printf '%5d s  %s' $((SECONDS - start)) "$name")")
  echo "== ${name}: $((SECONDS - start)) s"
}
summary() {
  echo "== phases (total ${SECONDS} s)"
  printf '%s\n' "${timings[@]}"
}
trap summary EXIT

setup() {  # setup DIR EXTRAS PACKAGES...
  local dir=$1 extras=$2; shift 2
  if [ ! -x "$dir/bin/python" ]; then python3 -m venv "$dir"; fi
  "$dir/bin/pip" install -q torch==2.13.0
  "$dir/bin/pip" install -q torch==2.13.0 "$@" -e ".[$extras]"
}

# The CPU kernels of a machine without AVX-512 (oneDNN/MKL and ATen's own), on any x86-64 machine.
as_avx2() { MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 "$@"; }

phase "setup transformers 5.23.0" setup .venv dev transformers==5.23.0
phase "tests, transformers 5.23.0" .venv/bin/python -m pytest -q
phase "golden and docs tests on AVX2 kernels" as_avx2 .venv/bin/python -m pytest -q \
  tests/test_explain.py -k "golden or docs" tests/test_docs.py tests/test_golden_rules.py
phase "docs build" env PATH="$PWD/.venv/bin:$PATH" bash scripts/docs.sh

phase "setup transformers 5.17.0 + llmcompressor" setup .venv-5.17 dev,llmcompressor transformers==5.17.0
phase "tests, transformers 5.17.0 + llmcompressor" .venv-5.17/bin/python -m pytest -q tests/test_models.py \
  tests/test_zoo_fixtures.py tests/test_zoo.py tests/test_llmcompressor.py tests/test_checkpoint_names.py tests/test_zoo_oneshot.py \
  "tests/test_explain.py::test_reports_the_configs_experts_and_k" tests/test_docs.py tests/test_golden_rules.py

phase "setup transformers 5.25.0" setup .venv-5.25 dev transformers==5.25.0
phase "tests, transformers 5.25.0" .venv-5.25/bin/python -m pytest -q tests/test_models.py \
  tests/test_zoo_fixtures.py tests/test_zoo.py tests/test_golden_rules.py
