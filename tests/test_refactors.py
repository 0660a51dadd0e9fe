"""autocal on MoE blocks as a future transformers release might write them (autocal/testing/refactors.py).

Each variant runs with every experts implementation its layout allows (transformers' ``eager``, ``batched_mm``,
``grouped_mm``), through ``synthesize`` and ``convert`` (with and without example inputs), compared with the
original block: calibration off bitwise (against the original itself, or, where autocal computes the experts as
the eager loop does, against the original run with its eager experts: docs/how-it-works.md), calibration on within
``autocal.verify`` tolerances with every expert Linear seeing every token once; ``explain`` reports the true k.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autocal
from autocal.registry import MoECalibrationModule
from autocal.testing.corpus import Mismatch, equivalent, init_normal
from autocal.testing.refactors import HIDDEN, VARIANTS, implementations

# (variant, implementation) -> why autocal fails it today (strict xfails).
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

CASES = [pytest.param(name, impl, id=f"{name}-{impl}",
                      marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name, impl])]
                      if (name, impl) in KNOWN_FAILURES else [])
         for name, variant in VARIANTS.items() for impl in implementations(variant)]


class Holder(nn.Module):
    """A user's model around the block, keeping the hidden states of a tuple-returning block."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden_states):
        out = self.block(hidden_states)
        return out[0] if isinstance(out, tuple) else out


def _build(name: str, impl: str) -> nn.Module:
    return init_normal(VARIANTS[name].make(impl), seed=0)


def _inputs() -> list[tuple]:
    shapes = ((1, 1, HIDDEN), (2, 5, HIDDEN), (1, 9, HIDDEN))
    return [(torch.randn(shape, generator=torch.Generator().manual_seed(i)),) for i, shape in enumerate(shapes)]


def _check(original, converted) -> None:
    """``equivalent`` against the original itself, or against its eager run where the implementation rounds
    otherwise (only for a non-eager implementation)."""
    name, impl, wrap = original
    for args in _inputs():
        try:
            equivalent(wrap(_build(name, impl)), converted, args, {})
        except Mismatch:
            if impl == "eager":
                raise
            equivalent(wrap(_build(name, "eager")), converted, args, {})


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_synthesize(name, impl):
    module = autocal.synthesize(_build(name, impl))
    _check((name, impl, lambda block: block), module)


@pytest.mark.parametrize("with_example", [False, True], ids=["no-example", "example"])
@pytest.mark.parametrize(("name", "impl"), CASES)
def test_convert(name, impl, with_example):
    model = Holder(_build(name, impl))
    hidden = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    example = {"hidden_states": hidden} if with_example else None
    autocal.convert(model, example_inputs=example)
    assert isinstance(model.block, MoECalibrationModule)
    _check((name, impl, Holder), model)


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_explain_reports_k(name, impl):
    report = autocal.explain(Holder(_build(name, impl)), verify=False)
    block = next(b for b in report.blocks if "block" in b.paths)
    assert block.failure is None, block.failure
    assert block.top_k == VARIANTS[name].top_k


@pytest.mark.parametrize("name", ["transposed_cast", "padded_loop", "route_rows", "masked_inputs"])
def test_synthesize_bfloat16(name):
    """A bfloat16 model: where the experts cast their weights (``transposed_cast``: a transposed view cast to
    float32), the cast is a copy, followed back to the parameter it copies."""
    def build():
        return _build(name, "eager").to(torch.bfloat16)
    module = autocal.synthesize(build())
    for (hidden,) in _inputs():
        equivalent(build(), module, (hidden.to(torch.bfloat16),), {})
