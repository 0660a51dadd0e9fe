"""What verification runs: the original's output from the model's own call of the block where there is one, a
fresh run of the original only where the calibration module does not reproduce that output, and transformers'
eager experts only for ``explain``."""

import torch
from torch import nn

import autocal
from autocal.api import Converter
from autocal.numerics import compare_outputs, kept_output
from autocal.testing import zoo
from autocal.testing.toy_moe import ToyMoEConfig, example_hidden_states, make_toy_block
from autocal.trace.calls import capture_calls
from autocal.verify import verify


class _Holder(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden_states):
        return self.block(hidden_states) * 2  # the output is used after the block returns it


class _AutocastHolder(_Holder):
    """A model that runs its block under bfloat16 autocast: the output its call gives is not the one a run of
    the block outside the model gives."""

    def forward(self, hidden_states):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.block(hidden_states)


def _counted(block: nn.Module) -> list[int]:
    calls: list[int] = []
    block.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_the_models_call_keeps_a_copy_of_the_output_of_the_blocks_named():
    config = ToyMoEConfig()
    model, x = _Holder(make_toy_block(config)), example_hidden_states(config, batch=2, seq=4)
    calls, _ = capture_calls(model, ["block", "block.experts"], {"hidden_states": x}, outputs={"block"})
    assert compare_outputs(calls["block"].output, model.block(x))[1]
    assert calls["block.experts"].output is None


def test_verify_runs_the_original_only_where_the_given_output_is_not_reproduced():
    config = ToyMoEConfig()
    block, x = make_toy_block(config), example_hidden_states(config, batch=2, seq=4)
    module = autocal.synthesize(block)
    right = kept_output(block(x))
    calls = _counted(block)
    assert verify(block, module, (x,), expected=right, eager=False).passed
    assert calls == []
    assert verify(block, module, (x,), expected=[2 * t for t in right], eager=False).passed
    assert calls == [1]


def test_a_block_its_model_runs_under_autocast_is_verified_against_a_fresh_run():
    """The output the model's call gave (bfloat16) differs from the calibration module's (float32): the original
    runs again, outside the model, and the block converts."""
    config = ToyMoEConfig()
    model = _AutocastHolder(make_toy_block(config))
    x = example_hidden_states(config, batch=2, seq=4)
    with torch.no_grad():
        expected = model.block(x)
    autocal.convert(model, example_inputs={"hidden_states": x})
    with torch.no_grad():
        assert compare_outputs(expected, model.block(x))[2]


def test_convert_leaves_the_eager_comparison_to_explain():
    """Only ``explain`` reports how calibration off compares with transformers' eager experts; ``convert`` does
    not run them."""
    model = zoo.build_model("qwen3_moe", experts_implementation="grouped_mm")
    block = model.model.layers[0].mlp
    converter = Converter()
    converter.build(block)
    verification = next(iter(converter.classes.values())).verification
    assert verification.experts_implementation == "grouped_mm" and verification.passed
    assert verification.bitwise_off_eager is None
