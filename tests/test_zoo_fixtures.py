"""Every MoE architecture of the installed transformers has a tiny fixture that builds and runs.

Run: python -m pytest tests/test_zoo_fixtures.py -q
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import transformers


def _load_zoo():
    # zoo.py imports nothing from autocal; load it by path so these fixture tests do not depend on the
    # rest of the package importing cleanly.
    path = Path(__file__).resolve().parents[1] / "autocal" / "testing" / "zoo.py"
    spec = importlib.util.spec_from_file_location("autocal_testing_zoo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()
ARCHS = zoo.moe_architectures()

# Forward failures that are bugs of a given transformers version, as (name, predicate, exception, reason).
KNOWN_FORWARD_BUGS = [
    (
        "doge",
        lambda: zoo.transformers_version() < (5, 18),
        TypeError,
        "transformers 5.17: DogeDecoderLayer passes DogeCDMoE's (hidden_states, router_logits) tuple to "
        "F.dropout, so any is_moe=True Doge model fails in forward (works in 5.23)",
    ),
]

# Classes of the modules that apply experts; used only to prove the MoE path runs.
EXPERTS_CLASS = re.compile(r"Experts?$|ExpertGLU$|NaiveMoe$|CDMoE$")


def _forward_params():
    params = []
    for name in ARCHS:
        marks = [
            pytest.mark.xfail(raises=exc, strict=True, reason=reason)
            for bug_name, applies, exc, reason in KNOWN_FORWARD_BUGS
            if bug_name == name and applies()
        ]
        params.append(pytest.param(name, marks=marks))
    return params


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    items = output.values() if isinstance(output, dict) else output
    for item in items:
        if item is None:
            continue
        found = _first_tensor(item) if not isinstance(item, torch.Tensor) else item
        if found is not None:
            return found
    return None


def test_architecture_scan_finds_known_models():
    assert "mixtral" in ARCHS and "qwen3_moe" in ARCHS
    assert not set(zoo.NOT_MOE) & set(ARCHS)


@pytest.mark.parametrize("name", ARCHS)
def test_fixture_exists(name):
    fixture = zoo.load_fixture(name)
    assert fixture["model_type"] == name
    assert hasattr(transformers, fixture["auto_class"]), fixture["auto_class"]
    assert isinstance(fixture["config"], dict) and isinstance(fixture.get("notes", ""), str)


@pytest.mark.parametrize("name", _forward_params())
def test_builds_and_runs_on_cpu(name):
    model = zoo.build_model(name)
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())

    calls, routed = [], set()

    def record(module, args, kwargs, out):
        calls.append(type(module).__name__)
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
                routed.update(value.flatten().tolist())

    for module in model.modules():
        if EXPERTS_CLASS.search(type(module).__name__):
            module.register_forward_hook(record, with_kwargs=True)

    inputs = zoo.example_inputs(model, batch=2, seq=6)
    with torch.no_grad():
        out = _first_tensor(zoo.forward_module(model)(**inputs))
    assert out is not None and out.is_floating_point()
    assert torch.isfinite(out).all()
    assert out.float().std() > 0
    assert calls, "no experts module ran: the fixture lost its MoE layer"
    if routed:  # experts modules that receive expert indices (or a dispatch mask)
        assert len(routed) > 1, f"degenerate routing: only {routed} used"


@pytest.mark.parametrize("name", ARCHS)
def test_builds_on_meta(name):
    model = zoo.build_model(name, device="meta")
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)


def test_build_is_seeded():
    a = zoo.build_model("mixtral", seed=3)
    b = zoo.build_model("mixtral", seed=3)
    c = zoo.build_model("mixtral", seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_bfloat16_build():
    model = zoo.build_model("qwen3_moe", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(**zoo.example_inputs(model)).logits
    assert torch.isfinite(logits.float()).all()
