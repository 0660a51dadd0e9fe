"""Expert weights cast before use (``w.bfloat16()``, ``w.to(x.dtype)``, ``w.half()``, ``w.float()``), as training
frameworks write grouped experts in a model of another dtype: the copy is attributed to the parameter it copies, and
the experts' Linears compute in the copy's dtype, so the calibration module computes as the block does."""

from __future__ import annotations

import copy

import pytest
import torch

import autocal
from autocal.numerics import TOLERANCES
from autocal.testing.assertions import count_rows, expert_linears
from autocal.testing.patterns import CastGroupedMoE

# (spelling, the dtype the experts compute in, gathered per token (else a grouped matmul), the model's dtype)
_CASES = [
    ("bfloat16", torch.bfloat16, False, torch.float32),
    ("to_dtype", torch.bfloat16, False, torch.float32),
    ("half", torch.float16, False, torch.float32),
    ("bfloat16", torch.bfloat16, True, torch.float32),
    ("to_dtype", torch.float16, True, torch.float32),
    ("float", torch.float32, False, torch.bfloat16),
    ("float", torch.float32, True, torch.bfloat16),
]


def _block(spelling, dtype, gather, model_dtype):
    torch.manual_seed(0)
    return CastGroupedMoE(spelling, dtype, gather).to(model_dtype).eval()


@pytest.mark.parametrize("spelling, dtype, gather, model_dtype", _CASES,
                         ids=[f"{c[0]}-{c[1]}-{'gather' if c[2] else 'grouped_mm'}-in-{c[3]}" for c in _CASES])
def test_experts_on_cast_weights_convert_and_compute_in_the_cast_dtype(spelling, dtype, gather, model_dtype):
    """Calibration off: the block's own output, bitwise. On: the original's output within the tolerance of the dtype
    the experts compute in (the cast rounds), every expert Linear seeing every token once, in that dtype, while its
    weight stays a view of the stored parameter (no copy kept)."""
    original = _block(spelling, dtype, gather, model_dtype)
    module = autocal.synthesize(copy.deepcopy(original))
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1)).to(model_dtype)
    linears = expert_linears(module)
    assert len(linears) == 3 * 4
    stored = {module.get_submodule(n.rpartition(".")[0]).__dict__[n.rpartition(".")[2]].untyped_storage().data_ptr()
              for n in ("w1", "w2", "w3")}
    assert {linear.weight.untyped_storage().data_ptr() for linear in linears.values()} == stored
    seen = []
    hooks = [linear.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype)) for linear in
             linears.values()]
    with torch.no_grad():
        expected = original(x)
        module.calibrate_all_experts = False
        assert torch.equal(module(x), expected)
        module.calibrate_all_experts = True
        with count_rows(linears) as rows:
            on = module(x)
    for hook in hooks:
        hook.remove()
    rtol, atol = TOLERANCES[dtype if dtype.itemsize < model_dtype.itemsize else model_dtype]
    assert (on.double() - expected.double()).abs().max() <= atol + rtol * expected.double().abs().max()
    assert expected.abs().max() > 0 and set(rows.values()) == {18} and set(seen) == {dtype}


def test_linears_whose_forward_reads_its_weight_elsewhere_compute_in_their_own_dtype():
    """A Linear whose forward was replaced (a quantization wrapper, an offloading hook keeping the weight in a cache
    of its own) cannot be given a cast weight for the call: it gets the rows in its weight's dtype and gives its
    output back in theirs, observed or not (oneshot had it fail on bf16 rows: 'expected m1 and m2 to have the same
    dtype'). The block's output then agrees within the rounding of the dtype the block computes in."""
    import torch.nn.functional as F

    original = _block("bfloat16", torch.bfloat16, False, torch.float32)
    module = autocal.synthesize(copy.deepcopy(original))
    seen = []
    for linear in expert_linears(module).values():
        def forward(rows, stored=linear.weight):  # the weight as a cache holds it, not the module's attribute
            seen.append(rows.dtype)
            return F.linear(rows, stored)
        linear.forward = forward
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = original(x)
        with count_rows(expert_linears(module)) as rows:
            on = module(x)
    rtol, atol = TOLERANCES[torch.bfloat16]
    assert (on - expected).abs().max() <= atol + rtol * expected.abs().max()
    assert set(rows.values()) == {18} and set(seen) == {torch.float32}


class _UpcastSliceMoE(torch.nn.Module):
    """A bfloat16 block whose loop casts each expert's slice up before its matmul (``F.linear(x.float(),
    w[e].float())``, Step3's remote code), accumulating in float32."""

    def __init__(self, hidden=16, width=12, experts=4):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.up = torch.nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)
        self.down = torch.nn.Parameter(torch.randn(experts, hidden, width) / width ** 0.5)

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(t).float().softmax(-1).topk(2, dim=-1)
        out = torch.zeros(t.shape, dtype=torch.float32)
        for e in range(self.up.shape[0]):
            token, slot = torch.where(chosen == e)
            h = torch.nn.functional.silu(torch.nn.functional.linear(t[token].float(), self.up[e].float()))
            out.index_add_(0, token, torch.nn.functional.linear(h, self.down[e].float()) * weights[token, slot, None])
        return out.to(x.dtype).view_as(x)


def test_expert_slices_cast_up_after_they_are_taken_convert():
    """Before, the slice's contraction was checked in bfloat16 against the float32 product and refused (``not
    contracted slot by slot``)."""
    torch.manual_seed(0)
    original = _UpcastSliceMoE().to(torch.bfloat16).eval()
    module = autocal.synthesize(copy.deepcopy(original))
    x = torch.randn(1, 9, 16).to(torch.bfloat16)
    with torch.no_grad():
        expected = original(x)
        module.calibrate_all_experts = False
        assert torch.equal(module(x), expected)
        module.calibrate_all_experts = True
        with count_rows(expert_linears(module)) as rows:
            module(x)
    assert len(rows) == 2 * 4 and set(rows.values()) == {9}
