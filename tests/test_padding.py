"""Rows padded with zeros to an alignment before a grouped matmul (torchtitan's permute indices) are not tokens:
the experts' Linears never see them, and the row counts are tokens only."""

from __future__ import annotations

import pytest
import torch

import autocal
from autocal.numerics import compare_outputs
from autocal.testing.assertions import count_rows, expert_linears
from autocal.testing.corpus import ENTRIES


@pytest.mark.parametrize("tokens", [1, 3, 10, 17])
def test_padding_rows_reach_no_expert_linear(tokens):
    """Calibration off, the Linears (hooked) see each expert's routed tokens, not its padded row count; on, every
    token once; no all-zero row ever; the outputs are the original's (off and unhooked: bitwise)."""
    entry = ENTRIES["aligned_grouped_mm"]
    original, block = entry.build(0), entry.build(0)
    module = autocal.synthesize(block)
    x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(tokens))
    module.calibrate_all_experts = False
    with torch.no_grad():
        assert torch.equal(module(x), original(x))
    linears = expert_linears(module)
    zero_rows = []
    hooks = [linear.register_forward_pre_hook(lambda _, args: zero_rows.append(int(args[0].eq(0).all(-1).sum())))
             for linear in linears.values()]
    with torch.no_grad():
        expected = original(x)
        routed = original.router(x.reshape(-1, 16))[2].long()
        module.calibrate_all_experts = False
        with count_rows(linears) as off_rows:
            off = module(x)
        module.calibrate_all_experts = True
        with count_rows(linears) as on_rows:
            on = module(x)
    for hook in hooks:
        hook.remove()
    assert compare_outputs(expected, off)[2] and compare_outputs(expected, on)[2]
    padded = ((routed + 7) // 8 * 8).clamp(min=8)
    assert (padded > routed).any()  # the block does pad
    for name, rows in off_rows.items():
        expert = int(name.rsplit(".", 1)[-1])
        assert rows == routed[expert], name
    assert set(on_rows.values()) == {tokens}
    assert zero_rows and set(zero_rows) == {0}
