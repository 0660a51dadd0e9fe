"""``autocal.linear_calls``: expert Linears computed past wrappers a rule vouches for, and group hooks.

Every check compares against the Linears called as modules, with their wrappers: the same outputs,
bitwise, and hooks that see the same inputs.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autocal
from autocal import linear_calls
from autocal.synthesize import grouped
from autocal.integrations.llmcompressor import expert_linears
from autocal.testing import zoo


def wrap_forward(linear: nn.Linear, calls: list[str]) -> None:
    """A ``functools.wraps`` wrapper on the instance's forward that notes each call (as offloading wrappers do)."""
    original = linear.forward.__func__

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        calls.append("wrapper")
        return original(self, *args, **kwargs)

    linear.forward = forward.__get__(linear)


def vouch_for(vouched: list[bool]):
    """A rule vouching for any wrapper while ``vouched[0]`` is true (a stand-in for a library's state)."""
    return linear_calls.register_transparency_rule(lambda linear, function, x: vouched[0])


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(8, 5)


def test_vouched_wrapper_is_skipped_and_hooks_run_as_the_module_runs_them(linear):
    """Pre-hooks that replace the input (with and without kwargs) and forward hooks that replace the output:
    the result is the module call's, bitwise, and the wrapper is not called."""
    calls: list[str] = []
    wrap_forward(linear, calls)
    linear.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    linear.register_forward_pre_hook(lambda m, args, kwargs: ((args[0] + 1,), kwargs), with_kwargs=True)
    linear.register_forward_hook(lambda m, args, out: out - args[0].sum())
    linear.register_forward_hook(lambda m, args, kwargs, out: out * 3, with_kwargs=True)
    x = torch.randn(4, 8)
    expected = linear(x)
    assert calls == ["wrapper"]
    handle = vouch_for([True])
    try:
        calls.clear()
        assert torch.equal(linear_calls.call_linear(linear, x), expected)
        assert calls == []
    finally:
        handle.remove()


def test_unvouched_wrapper_is_called(linear):
    calls: list[str] = []
    wrap_forward(linear, calls)
    x = torch.randn(3, 8)
    vouched = [False]
    handle = vouch_for(vouched)
    try:
        assert torch.equal(linear_calls.call_linear(linear, x), linear(x))
        assert calls == ["wrapper", "wrapper"]
        vouched[0] = True
        calls.clear()
        assert torch.equal(linear_calls.call_linear(linear, x), linear(x))
        assert calls == ["wrapper"]  # only the module call
    finally:
        handle.remove()
    calls.clear()
    linear_calls.call_linear(linear, x)
    assert calls == ["wrapper"], "a removed rule vouches for nothing"


def test_global_hook_means_a_module_call(linear):
    calls: list[str] = []
    wrap_forward(linear, calls)
    seen = []
    handle = vouch_for([True])
    hook = nn.modules.module.register_module_forward_pre_hook(lambda m, args: seen.append(m))
    try:
        linear_calls.call_linear(linear, torch.randn(2, 8))
    finally:
        hook.remove()
        handle.remove()
    assert calls == ["wrapper"] and seen == [linear]


def calibration_run(model: nn.Module, ids: torch.Tensor, group_hook: bool, extra_hook: str | None = None):
    """One calibration forward with a recording pre-hook on every expert Linear: the output, each Linear's
    inputs, and how the hooks were called. Without ``group_hook``, the reference: Linears called as modules.
    With it, a wrapper on each Linear's forward that a rule vouches for, and a group hook standing for the
    recording hooks."""
    paths = {model.get_submodule(lin.path): lin.path for lin in expert_linears(model)}
    inputs = {path: [] for path in paths.values()}
    calls: list[str] = []
    stats = {"group calls": 0, "module hooks": 0}

    def record(module, args):
        stats["module hooks"] += 1
        inputs[paths[module]].append(args[0].clone())

    def record_group(linears, rows):
        stats["group calls"] += 1
        for module, row in zip(linears, rows):
            inputs[paths[module]].append(row.clone())

    handles = [(module, module.register_forward_pre_hook(record)) for module in paths]
    for module in paths if group_hook else ():
        wrap_forward(module, calls)
    rule = vouch_for([True]) if group_hook else None
    group = linear_calls.register_group_hook(record_group, handles) if group_hook else None
    extra = model.get_submodule(extra_hook).register_forward_hook(lambda m, a, o: None) if extra_hook else None
    try:
        with torch.no_grad():
            output = model(input_ids=ids).logits
    finally:
        for handle in [h for _, h in handles] + [rule, group, extra]:
            if handle is not None:
                handle.remove()
    return output, inputs, calls, stats


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked weights", "one matmul per Linear"])
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_group_hooks_see_what_module_hooks_see(name, stacked, monkeypatch):
    """A group hook standing for every expert Linear's hook is called once per projection and group of
    experts, with the inputs each Linear's hook would have seen; outputs are bitwise the module calls', whether
    a group's Linears are computed by one batched matmul on their stacked weights or one by one."""
    model = zoo.build_model(name)
    autocal.convert(model, calibrate_all_experts=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    reference, reference_inputs, _, reference_stats = calibration_run(model, ids, group_hook=False)
    monkeypatch.setattr(grouped, "STACK_BYTES", {False: 1 << 40, True: 1 << 40} if stacked else {False: 0, True: 0})
    linear_calls_made = []
    monkeypatch.setattr(grouped, "F", SimpleNamespace(linear=lambda *a: linear_calls_made.append(1) or F.linear(*a)))
    output, inputs, calls, stats = calibration_run(model, ids, group_hook=True)
    assert torch.equal(output, reference)
    assert (not linear_calls_made) if stacked else linear_calls_made
    assert calls == [], "no expert Linear was called as a module"
    assert stats["module hooks"] == 0 and 0 < stats["group calls"] < reference_stats["module hooks"]
    assert inputs.keys() == reference_inputs.keys()
    for path, seen in reference_inputs.items():
        assert len(inputs[path]) == len(seen) > 0 and all(torch.equal(a, b) for a, b in zip(inputs[path], seen)), path


def test_a_hook_no_group_hook_stands_for_keeps_the_module_hooks():
    """One Linear with a hook nobody stands for: its projection's Linears run their own hooks (past the wrapper,
    which the rule vouches for), and the inputs seen are the same."""
    model = zoo.build_model("qwen3_moe")
    autocal.convert(model, calibrate_all_experts=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    reference, reference_inputs, _, _ = calibration_run(model, ids, group_hook=False)
    extra = expert_linears(model)[0].path
    output, inputs, calls, stats = calibration_run(model, ids, group_hook=True, extra_hook=extra)
    assert torch.equal(output, reference) and calls == []
    assert stats["module hooks"] > 0 and stats["group calls"] > 0
    for path, seen in reference_inputs.items():
        assert len(inputs[path]) == len(seen) and all(torch.equal(a, b) for a, b in zip(inputs[path], seen)), path
