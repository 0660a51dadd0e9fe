#!/usr/bin/env bash
# Build the documentation site into site/ with warnings as errors.
#   bash scripts/docs.sh            install the docs requirements into the current environment, then build
#   bash scripts/docs.sh serve      the same, then serve it with live reload (http://127.0.0.1:8000)
# The examples in the pages are executed by the tests (tests/test_docs.py), not here.
# Pages of the nav written elsewhere (docs/llmcompressor.md, docs/benchmarks.md) are left out of the
# nav, with a notice, while they do not exist, so that the strict build does not fail on them.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q "mkdocs==1.6.1" "mkdocstrings==1.0.8" "mkdocstrings-python==2.0.11" "griffelib==2.4.1"

config=mkdocs.yml
missing=()
for page in llmcompressor.md benchmarks.md; do
  [ -f "docs/$page" ] || missing+=("$page")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "docs.sh: not yet written, left out of the nav: ${missing[*]}" >&2
  config=$(mktemp ./.mkdocs-XXXXXX.yml)  # beside mkdocs.yml, so relative paths resolve the same
  trap 'rm -f "$config"' EXIT
  python - "$config" "${missing[@]}" <<'EOF'
import sys
import yaml

out, missing = sys.argv[1], set(sys.argv[2:])

def keep(nav):
    kept = []
    for item in nav:
        (title, value), = item.items() if isinstance(item, dict) else ((None, item),)
        if isinstance(value, list):
            value = keep(value)
        if value and not (isinstance(value, str) and value in missing):
            kept.append({title: value} if title else value)
    return kept

with open("mkdocs.yml") as f:
    nav = yaml.safe_load(f)["nav"]
with open(out, "w") as f:
    yaml.safe_dump({"INHERIT": "mkdocs.yml", "nav": keep(nav)}, f, sort_keys=False)
EOF
fi

if [ "${1:-build}" = serve ]; then
  python -m mkdocs serve --strict -f "$config"
else
  python -m mkdocs build --strict -f "$config"
fi
