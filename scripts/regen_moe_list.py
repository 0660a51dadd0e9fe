#!/usr/bin/env python
"""List the MoE architectures of the installed transformers and report missing zoo fixtures.

Usage: python scripts/regen_moe_list.py

Prints one row per MoE model type (found from transformers' modeling sources and auto
mappings, see ``autocal.testing.zoo.moe_architectures``), marks the ones without a
``fixtures/models/<model_type>.json`` file, and exits with status 1 if any is missing, so a
new transformers release shows up as missing rows.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ZOO_PATH = Path(__file__).resolve().parents[1] / "autocal" / "testing" / "zoo.py"


def _load_zoo():
    # Load the file directly: zoo.py depends on nothing else in autocal.
    spec = importlib.util.spec_from_file_location("autocal_testing_zoo", ZOO_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    zoo = _load_zoo()
    import transformers

    archs = zoo.moe_architectures()
    fixtures = set(zoo.fixture_names())
    missing = [name for name in archs if name not in fixtures]

    print(f"transformers {transformers.__version__}: {len(archs)} MoE architectures")
    for name in archs:
        if name in fixtures:
            print(f"  {name:28s} {zoo.load_fixture(name)['auto_class']}")
        else:
            print(f"  {name:28s} MISSING fixtures/models/{name}.json")
    print("excluded (marker matches that are not MoE):")
    for folder, reason in sorted(zoo.NOT_MOE.items()):
        print(f"  {folder:28s} {reason}")
    extra = sorted(fixtures - set(archs))
    if extra:
        print(f"fixtures for architectures not in this transformers: {', '.join(extra)}")
    if missing:
        print(f"{len(missing)} architecture(s) without a fixture: {', '.join(missing)}")
        return 1
    print("every MoE architecture has a fixture")
    return 0


if __name__ == "__main__":
    sys.exit(main())
