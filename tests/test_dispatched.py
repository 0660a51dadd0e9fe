"""Packed experts run on a dispatched tensor (autocal/detect/dispatched.py, autocal/synthesize/dispatched.py).

Tokens placed in capacity slots by a 0/1 contraction (GShard's einsum, Switch's matmul of the mask's transpose),
one experts module on the whole ``[..., E, capacity, d]`` tensor, a weighted combine. With calibration off the
output is the original's bitwise; on, within rounding, every expert Linear given each token once, and the tokens
the capacity drops stay dropped. Experts that mix the rows of their slots are refused.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import autocal
from autocal.errors import AutocalError
from autocal.testing.assertions import count_rows, expert_linears
from autocal.testing.corpus import ENTRIES
from autocal.testing.patterns import BmmExperts, SwitchCapacityMoE
from autocal.verify import compare_outputs



def _switch() -> SwitchCapacityMoE:
    torch.manual_seed(0)
    return SwitchCapacityMoE().eval()


BLOCKS = {"switch_bmm": _switch, "gshard_einsum": lambda: ENTRIES["gshard_top2"].build(0)}


def _inputs(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (2, 32)])
def test_every_expert_sees_every_token_and_dropped_tokens_stay_dropped(name, shape):
    block = BLOCKS[name]()
    module = autocal.synthesize(BLOCKS[name]())
    assert module.structure.level == "gathered" and module.plan.dispatch.slots is not None
    x = _inputs(*shape)
    tokens = x.numel() // x.shape[-1]
    with torch.no_grad():
        expected = block(x)
        module.calibrate_all_experts = False
        assert torch.equal(module(x), expected)
        module.calibrate_all_experts = True
        linears = expert_linears(module)
        with count_rows(linears) as rows:
            on = module(x)
    assert expected.abs().max() > 0
    assert compare_outputs(expected, on)[2]
    assert len(linears) == 2 * block.num_experts and rows == {n: tokens for n in linears}, rows


@pytest.mark.parametrize("name", list(BLOCKS))
def test_the_long_input_drops_tokens(name):
    """The setup above is not degenerate: with room for every token, the block gives another output."""
    block = BLOCKS[name]()
    roomy = copy.deepcopy(block)
    roomy.capacity_factor = 100.0
    x = _inputs(2, 32)
    with torch.no_grad():
        assert not torch.allclose(block(x), roomy(x))


class _PooledExperts(BmmExperts):
    """Not row-wise: each expert's hidden rows are centred over its slots."""

    def forward(self, x):
        h = torch.bmm(x, self.w_in.transpose(1, 2))
        return torch.bmm(F.relu(h - h.mean(1, keepdim=True)), self.w_out)


def test_experts_that_mix_their_slots_are_refused():
    block = _switch()
    block.experts = _PooledExperts()
    with pytest.raises(AutocalError) as raised:
        autocal.synthesize(block)
    assert "dispatch" in str(raised.value)
