#!/usr/bin/env bash
# Set up a virtual environment per transformers version and run the tests.
#   .venv       transformers 5.23.0 (newest): every test
#   .venv-5.17  transformers 5.17.0 (what LLM Compressor users run): the model tests
set -euo pipefail
cd "$(dirname "$0")/.."

setup() {  # setup DIR TRANSFORMERS_VERSION
  if [ ! -x "$1/bin/python" ]; then python3 -m venv "$1"; fi
  "$1/bin/pip" install -q torch==2.13.0
  "$1/bin/pip" install -q "transformers==$2" -e ".[dev]"
}

setup .venv 5.23.0
.venv/bin/python -m pytest -q
setup .venv-5.17 5.17.0
.venv-5.17/bin/python -m pytest -q tests/test_models.py tests/test_zoo_fixtures.py
