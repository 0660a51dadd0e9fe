#!/usr/bin/env bash
# Set up one virtual environment per transformers version and run the tests.
#   .venv       transformers 5.23.0 (newest): every test, then the docs build (warnings as errors)
#   .venv-5.17  transformers 5.17.0 + llmcompressor 0.14.0.1 (what LLM Compressor users run):
#               the real-model, zoo, explain-against-config and LLM Compressor tests
#   .venv-5.25  transformers 5.25.0 (the newest release; no upper pin keeps it installable):
#               the real-model and zoo tests
set -euo pipefail
cd "$(dirname "$0")/.."

setup() {  # setup DIR EXTRAS PACKAGES...
  local dir=$1 extras=$2; shift 2
  if [ ! -x "$dir/bin/python" ]; then python3 -m venv "$dir"; fi
  "$dir/bin/pip" install -q torch==2.13.0
  "$dir/bin/pip" install -q torch==2.13.0 "$@" -e ".[$extras]"
}

setup .venv dev transformers==5.23.0
.venv/bin/python -m pytest -q
PATH="$PWD/.venv/bin:$PATH" bash scripts/docs.sh

setup .venv-5.17 dev,llmcompressor transformers==5.17.0
.venv-5.17/bin/python -m pytest -q tests/test_models.py tests/test_zoo_fixtures.py tests/test_zoo.py \
  tests/test_llmcompressor.py "tests/test_explain.py::test_reports_the_configs_experts_and_k"

setup .venv-5.25 dev transformers==5.25.0
.venv-5.25/bin/python -m pytest -q tests/test_models.py tests/test_zoo_fixtures.py tests/test_zoo.py
