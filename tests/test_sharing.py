"""``autocal.shared_input_groups``: the expert Linears that receive the same input tensor in calibration mode.

The groups are read from the synthesized graph; here they are checked against what each expert Linear really
receives in one calibration forward, recorded by forward pre-hooks: every Linear of a group gets the very same
tensor (same storage, same values) in every call, and Linears outside a common group get different inputs.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import autocal
from autocal.integrations.llmcompressor import expert_linears
from autocal.testing import zoo

MODELS = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]


def recorded_inputs(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """Every expert Linear's input in each of its calls during one calibration forward."""
    inputs = {lin.path: [] for lin in expert_linears(model)}

    def record(path):
        def hook(module, args):
            inputs[path].append(args[0])
        return hook

    handles = [model.get_submodule(path).register_forward_pre_hook(record(path)) for path in inputs]
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.data_ptr() == y.data_ptr() and torch.equal(x, y) for x, y in zip(a, b))


def equal_values(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("chunk", [None, 3], ids=["dense", "chunked"])
@pytest.mark.parametrize("name", MODELS)
def test_groups_are_the_linears_that_receive_the_same_tensor(name, chunk):
    """All experts' gate and up projections of a block share one input; with ``calibration_chunk_size`` each expert
    gets its own rows, and only the Linears of one expert share."""
    model = zoo.build_model(name)
    autocal.convert(model, calibrate_all_experts=True, calibration_chunk_size=chunk)
    groups = autocal.shared_input_groups(model)
    inputs = recorded_inputs(model)
    assert all(inputs.values()), "every expert Linear ran"
    # the tiny models have 2 MoE blocks of 8 experts, whose gate and up projections take the expert's input
    assert sorted(map(len, groups)) == ([16, 16] if chunk is None else [2] * 16)
    grouped = {path for group in groups for path in group}
    for group in groups:
        assert all(same_tensors(inputs[group[0]], inputs[path]) for path in group[1:]), group
    group_of = {path: number for number, group in enumerate(groups) for path in group}
    for a, b in itertools.combinations(inputs, 2):
        if group_of.get(a, a) != group_of.get(b, b):
            assert not equal_values(inputs[a], inputs[b]), f"{a} and {b} receive the same input but share no group"
    assert grouped < set(inputs), "the down projections take each expert's own activations"


def test_no_groups_without_calibration_modules():
    assert autocal.shared_input_groups(zoo.build_model("qwen3_moe")) == []
