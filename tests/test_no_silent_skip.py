"""No MoE block is skipped silently, and autocal raises nothing but ``AutocalError``.

``convert`` refuses a model with a module routing among experts that no rule
converts, naming it; ``strict=False`` leaves it, warns and lists it
(``autocal.unconverted``); ``explain`` shows it as a failure.
"""

from __future__ import annotations

import pytest
import torch

import autocal
from autocal import MoECalibrationModule
from autocal.testing.corpus import ENTRIES, Holder, Mixed, TypedHolder


def _mixed(name: str) -> Mixed:
    return Mixed(ENTRIES[name].build(0), seed=0)


@pytest.mark.parametrize("name", ["megatron_grouped"])  # the corpus entry whose experts no rule reads yet
def test_convert_names_experts_no_rule_converts_and_converts_nothing(name):
    model = _mixed(name)
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(model)
    error = raised.value
    assert error.kind == autocal.errors.UNSUPPORTED_DISPATCH
    assert error.module_path == "block" and error.block_class == type(model.block).__name__
    assert "strict=False" in str(error)
    assert not any(isinstance(m, MoECalibrationModule) for m in model.modules()), "nothing is converted"


def test_strict_false_converts_the_rest_and_lists_what_it_left():
    model = _mixed("megatron_grouped")
    args, _ = ENTRIES["megatron_grouped"].inputs(2, 5)
    with torch.no_grad():
        expected = model(*args)
    with pytest.warns(UserWarning, match="block"):
        autocal.convert(model, strict=False)
    assert isinstance(model.toy, MoECalibrationModule)
    assert not isinstance(model.block, MoECalibrationModule)
    assert [(u.path, u.block_class) for u in autocal.unconverted(model)] == [("block", "MegatronMoELayer")]
    for module in model.modules():
        if isinstance(module, MoECalibrationModule):
            module.calibrate_all_experts = False
    with torch.no_grad():
        torch.testing.assert_close(model(*args), expected, rtol=0, atol=0)


def test_strict_false_lists_a_block_no_rule_converts():
    model = _mixed("gshard_top2")
    with pytest.warns(UserWarning, match="unsupported-dispatch"):
        autocal.convert(model, strict=False)
    assert [u.path for u in autocal.unconverted(model)] == ["block"]
    assert isinstance(model.toy, MoECalibrationModule)


def test_explain_shows_experts_no_rule_converts_as_a_failure():
    report = autocal.explain(_mixed("megatron_grouped"), verify=False)
    failed = [b for b in report.blocks if not b.ok]
    assert [b.paths for b in failed] == [["block"]]
    assert failed[0].failure["kind"] == autocal.errors.UNSUPPORTED_DISPATCH


@pytest.mark.parametrize("name", list(ENTRIES))
def test_convert_raises_nothing_but_autocal_errors(name):
    """Every corpus entry, through convert (with its example inputs where it needs them): converted, or an
    AutocalError with a kind, the block and a next step, the original exception as its cause when there was one."""
    entry = ENTRIES[name]
    args, kwargs = entry.inputs(2, 5)
    model = (TypedHolder if entry.extra_inputs else Holder)(entry.build(0))
    try:
        autocal.convert(model, example_inputs={"hidden_states": args[0], **kwargs} if kwargs else None)
    except autocal.AutocalError as error:
        assert error.kind in autocal.errors.KINDS
        assert error.block_class
        assert autocal.errors.next_steps(error.kind, error.block_class, error.hints)
        if "could not follow the forward" in error.explanation.split(" (rule")[0]:
            assert error.__cause__ is not None and not isinstance(error.__cause__, autocal.AutocalError)


def test_verification_runs_one_token_too():
    """The decode branch of a block (one token) is verified, not only the many-token path detection read."""
    block = ENTRIES["decode_gather"].build(0)
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.synthesize(block)
    assert raised.value.kind == autocal.errors.VERIFICATION_FAILED
    assert "1 tokens" in raised.value.explanation




@pytest.mark.parametrize("name", ["side_by_side", "dropless_experts"])
def test_experts_side_by_side_are_never_skipped_silently(name):
    """Every expert's weights side by side in raw ``[E * I, H]`` tensors, on the block beside its router or on a
    child: named by convert, left and listed with ``strict=False``."""
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(_mixed(name))
    assert raised.value.module_path == "block" and raised.value.kind == autocal.errors.UNSUPPORTED_DISPATCH
    model = _mixed(name)
    with pytest.warns(UserWarning, match="block"):
        autocal.convert(model, strict=False)
    assert [u.path for u in autocal.unconverted(model)] == ["block"]
