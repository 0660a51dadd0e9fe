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
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

import autocal
from autocal.errors import AutocalError
from autocal.testing.assertions import count_rows, expert_linears
from autocal.testing.corpus import ENTRIES, EinsumExperts, init_normal
from autocal.testing.patterns import BmmExperts, SwitchCapacityMoE
from autocal.verify import compare_outputs



def _switch() -> SwitchCapacityMoE:
    torch.manual_seed(0)
    return SwitchCapacityMoE().eval()


class _ExpertsFirstMoE(torch.nn.Module):
    """Top-1 with a capacity per sequence, the dispatched tensor experts first (``ebcd``) and reshaped to
    ``[E, batch * capacity, d]`` for the experts, the outputs reshaped back for the combine."""

    def __init__(self, capacity_factor: float = 1.0) -> None:
        super().__init__()
        self.w_gating = torch.nn.Parameter(torch.empty(16, 6))
        self.experts = EinsumExperts()
        self.num_experts, self.capacity_factor = 6, capacity_factor

    def forward(self, x):
        e, n = self.num_experts, x.shape[1]
        gate, index = torch.einsum("bnd,de->bne", x, self.w_gating).softmax(-1).max(-1)
        mask = F.one_hot(index, e).to(x.dtype)
        capacity = max(1, int(n * self.capacity_factor / e))
        position = ((mask.cumsum(1) - 1) * mask).sum(-1).long()
        kept = mask * (position < capacity)[..., None]
        dispatch = kept[..., None] * F.one_hot(position.clamp(max=capacity - 1), capacity)[..., None, :]
        expert_inputs = torch.einsum("bnd,bnec->ebcd", x, dispatch)
        outputs = self.experts(expert_inputs.reshape(e, -1, x.shape[-1])).reshape(expert_inputs.shape)
        return torch.einsum("ebcd,bnec->bnd", outputs, dispatch * gate[..., None, None])


class _NormalizedBmmExperts(BmmExperts):
    """Each row normalized before the first projection (row-wise, no weight): the rows the weights are contracted
    with first are made from the module's input, not the input itself."""

    def forward(self, x):
        return super().forward(F.normalize(x, dim=-1))


def _normalized_switch() -> SwitchCapacityMoE:
    block = _switch()
    block.experts = _NormalizedBmmExperts()
    return block


BLOCKS = {"switch_bmm": _switch, "gshard_einsum": lambda: ENTRIES["gshard_top2"].build(0),
          "experts_first": lambda: init_normal(_ExpertsFirstMoE(), 0).eval(), "normalized_rows": _normalized_switch}


def _inputs(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(seed))


def _check(block, module, x) -> None:
    """Off: bitwise. On: within tolerance, every expert Linear given each token once, the output not zero."""
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
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (2, 32)])
def test_every_expert_sees_every_token_and_dropped_tokens_stay_dropped(name, shape):
    block = BLOCKS[name]()
    module = autocal.synthesize(BLOCKS[name]())
    assert module.structure.level == "gathered" and module.plan.dispatch.slots is not None
    _check(block, module, _inputs(*shape))


@settings(max_examples=12)
@given(capacity_factor=st.floats(0.05, 2.0), batch=st.integers(1, 3), seq=st.integers(1, 24),
       seed=st.integers(0, 2**16))
@example(capacity_factor=0.05, batch=1, seq=24, seed=0)  # capacity 1: most tokens dropped
def test_any_capacity_and_token_count(capacity_factor, batch, seq, seed):
    """One converted module (detected at the default capacity) on drawn capacities and token counts."""
    block, module = _switch(), autocal.synthesize(_switch())
    block.capacity_factor = module.capacity_factor = capacity_factor
    note(f"SwitchCapacityMoE(capacity_factor={capacity_factor}) on randn({batch}, {seq}, 16), seed {seed}")
    _check(block, module, _inputs(batch, seq, seed))


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
    assert "not computed each on its own" in str(raised.value)
