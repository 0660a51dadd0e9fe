"""Every MoE architecture of the installed transformers, converted with no model code and no inputs.

Each row builds the tiny fixture model, converts it with ``autocal.convert(model)``
alone (autocal makes its own example inputs), and checks whole-model logits
(calibration off: bitwise; on: within rounding), expert coverage and restore().
The result must also match the row saved in docs/zoo/transformers-<version>.json,
from which docs/supported-models.md is generated, so the page cannot drift from the code.

Architectures autocal does not handle yet are listed in KNOWN_FAILURES with the
reason; they run and are expected to fail (strict: a fix makes them fail here
until the entry is removed). They are open work, shown as FAIL in the docs.
"""

import json
from pathlib import Path

import pytest
import transformers

from autocal.testing import zoo
from autocal.testing.zoo_runner import run_architecture

KNOWN_FAILURES = {}
# Architectures whose original model cannot run here: listed with the reason, checked to still fail.
UNBUILDABLE = {}
if zoo.transformers_version() < (5, 18):
    UNBUILDABLE["doge"] = "transformers 5.17: the model's own forward fails (a tuple passed to dropout)"

SAVED = Path(__file__).resolve().parents[1] / "docs" / "zoo" / f"transformers-{transformers.__version__}.json"


def _params():
    for name in zoo.moe_architectures():
        if name in UNBUILDABLE:
            continue
        marks = [pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=True)] if name in KNOWN_FAILURES else []
        yield pytest.param(name, marks=marks, id=name)


def _saved_row(name):
    if not SAVED.exists():
        return None
    return next((r for r in json.loads(SAVED.read_text()) if r["architecture"] == name), None)


@pytest.mark.parametrize("name", list(_params()))
def test_zoo_architecture(name):
    result = run_architecture(name, given_inputs=False)
    saved = _saved_row(name)
    assert saved is not None, f"{SAVED.name} has no row for {name}: run python scripts/zoo_report.py"
    assert saved["passed"] == result.passed, "docs/zoo results are stale: run python scripts/zoo_report.py"
    assert result.passed, result.failure


# Decorated experts of distinct layouts: transposed with biases and clamps (gpt_oss), transposed (aria), ungated
# (nemotron_h), ungated transposed projections wrapped with a per-expert norm (ergo), identity experts remapped in
# the block (longcat_flash), clamps in `_apply_gate` (step3p7), the usual [E, 2I, H] (qwen3_moe).
IMPLEMENTED = ["aria", "ergo", "gpt_oss", "longcat_flash", "nemotron_h", "qwen3_moe", "step3p7"]


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("name", [n for n in IMPLEMENTED if n in zoo.moe_architectures()])
def test_zoo_architecture_with_other_experts_implementations(name, implementation):
    """transformers' default experts implementation is grouped_mm: convert(model) alone works on models built with
    it and with batched_mm (calibration off bitwise against the eager experts, on within rounding)."""
    result = run_architecture(name, given_inputs=False, experts_implementation=implementation)
    assert result.passed, result.failure


@pytest.mark.parametrize("name", sorted(UNBUILDABLE))
def test_unbuildable_architecture_still_cannot_run(name):
    """A listed architecture is one whose own model fails before autocal runs; once it runs, it is a zoo row."""
    result = run_architecture(name, given_inputs=False)
    assert result.unbuildable and not result.passed, f"{name} runs now: remove it from UNBUILDABLE"
    assert _saved_row(name)["unbuildable"], "docs/zoo results are stale: run python scripts/zoo_report.py"
