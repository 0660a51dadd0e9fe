"""Experts kept as one weight per expert in ``nn.ParameterList`` s, applied by the block's own code
(``autocal/detect/listed.py``, read by the gathered rule).

Each list is read as packed ``[E, a, b]`` storage, entry ``e`` for slice ``e``: the calibration module holds, where
each list was, one ``nn.Linear`` per expert whose weight views that expert's entry. Against the original block's
real output: calibration off is bitwise the original's, calibration on is within ``autocal.verify`` tolerances, and
every expert's Linears see every token once. Lists with no router beside them, or of different lengths, are no
experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autocal
from autocal.errors import AutocalError
from autocal.testing.assertions import count_rows, expert_linears
from autocal.testing.patterns import PATTERNS, ParameterListMoE
from autocal.verify import compare_outputs


def _listed(experts: int, *shape: int) -> nn.ParameterList:
    return nn.ParameterList(nn.Parameter(torch.randn(*shape) / shape[-1] ** 0.5) for _ in range(experts))


class LinearListsMoE(nn.Module):
    """Gate, up and down lists applied by ``F.linear(x, self.w_gate[e], self.b_gate[e])`` (weights ``[out, in]``;
    biases in lists of their own, or None), a where loop."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 4, k: int = 2, bias: bool = False) -> None:
        super().__init__()
        self.k, self.gate = k, nn.Linear(hidden, experts, bias=False)
        self.w_gate, self.w_up = _listed(experts, width, hidden), _listed(experts, width, hidden)
        self.w_down = _listed(experts, hidden, width)
        self.b_gate, self.b_up, self.b_down = ((_listed(experts, width), _listed(experts, width),
                                                _listed(experts, hidden)) if bias else (None, None, None))

    def _bias(self, biases: nn.ParameterList | None, e: int) -> torch.Tensor | None:
        return None if biases is None else biases[e]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.gate(t).topk(self.k, dim=-1)
        weights = weights.softmax(-1)
        out = torch.zeros_like(t)
        for e in range(len(self.w_gate)):
            token, slot = torch.where(idx == e)
            if token.numel() == 0:
                continue
            rows = t[token]
            gate = F.linear(rows, self.w_gate[e], self._bias(self.b_gate, e))
            up = F.linear(rows, self.w_up[e], self._bias(self.b_up, e))
            y = F.linear(F.silu(gate) * up, self.w_down[e], self._bias(self.b_down, e))
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.view_as(x)


class ExpertsOfLists(nn.Module):
    """An experts module holding nothing but the lists, called with ``(rows, expert)``."""

    def __init__(self, hidden: int, width: int, experts: int) -> None:
        super().__init__()
        self.w_in = nn.ParameterList(nn.Parameter(torch.randn(hidden, width) / hidden ** 0.5) for _ in range(experts))
        self.w_out = nn.ParameterList(nn.Parameter(torch.randn(width, hidden) / width ** 0.5) for _ in range(experts))

    def forward(self, rows: torch.Tensor, expert: int) -> torch.Tensor:
        return F.gelu(rows @ self.w_in[expert]) @ self.w_out[expert]


class NestedListsMoE(nn.Module):
    """``x @ w[e]`` lists one level down, in an experts module beside the router; experts called per expert."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k, self.router = k, nn.Linear(hidden, experts, bias=False)
        self.experts = ExpertsOfLists(hidden, width, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.router(t).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(t)
        for e in range(len(self.experts.w_in)):
            token, slot = torch.where(idx == e)
            out.index_add_(0, token, self.experts(t[token], e) * weights[token, slot, None])
        return out.view_as(x)


class UnroutedListsMoE(nn.Module):
    """Lists of one shape with no router-shaped weight beside them: no experts."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Linear(16, 16, bias=False)
        self.w = nn.ParameterList(nn.Parameter(torch.randn(16, 12)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(self.scale(x) @ w for w in self.w)


def _seeded(make) -> nn.Module:
    torch.manual_seed(0)
    return make().eval()


BLOCKS = {"linear_lists": LinearListsMoE, "matmul_lists": ParameterListMoE, "nested_lists": NestedListsMoE,
          "biased_lists": lambda: LinearListsMoE(bias=True)}


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("shape", [(2, 5, 16), (1, 1, 16), (3, 7, 16)])
def test_lists_convert_against_the_original(name, shape):
    original = _seeded(BLOCKS[name])
    model = nn.Sequential(_seeded(BLOCKS[name]))
    autocal.convert(model)
    module = model[0]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    tokens = x.numel() // x.shape[-1]
    assert module.structure.level == "gathered"
    with torch.no_grad():
        expected = original(x)
        module.calibrate_all_experts = False
        assert torch.equal(module(x), expected)
        module.calibrate_all_experts = True
        linears = expert_linears(model)
        with count_rows(linears) as rows:
            on = module(x)
    assert expected.abs().max() > 0
    assert compare_outputs(expected, on)[2]
    lists = sum(1 for m in original.modules() if isinstance(m, nn.ParameterList) and m[0].dim() == 2)
    assert len(linears) == lists * 4 and rows == {n: tokens for n in linears}, rows


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_each_linear_views_its_entry_in_its_place(name):
    """Expert ``e``'s Linear of list ``w`` sits at ``w.{e}`` (checkpoint key ``w.{e}.weight``) and views entry ``e``
    (transposed for ``x @ w[e]``); the original block keeps its lists, and ``restore`` gives it back."""
    original = _seeded(BLOCKS[name])
    module = autocal.synthesize(original)
    everything = {n: m for n, m in original.named_modules() if isinstance(m, nn.ParameterList)}
    lists = {n: m for n, m in everything.items() if m[0].dim() == 2}
    for path, entries in lists.items():
        for e, entry in enumerate(entries):
            linear = module.get_submodule(f"{path}.{e}")
            assert type(linear) is nn.Linear
            assert linear.weight.data_ptr() == entry.data_ptr()
            assert torch.equal(linear.weight, entry if linear.in_features == entry.shape[1] else entry.T)
            bias = everything.get(path.replace("w_", "b_"))
            assert (linear.bias is None) == (bias is None)
            assert bias is None or linear.bias.data_ptr() == bias[e].data_ptr()
    names = ("weight", "bias") if len(everything) > len(lists) else ("weight",)
    expected = [k for k in original.state_dict() if not any(k.startswith(f"{p}.") for p in everything)]
    expected += [f"{p}.{e}.{n}" for p, entries in lists.items() for e in range(len(entries)) for n in names]
    assert sorted(module.state_dict()) == sorted(expected)
    assert module.restore() is original and all(isinstance(m, nn.ParameterList) for m in everything.values())


def test_explain_reads_the_lists_as_packed_weights():
    report = autocal.explain(PATTERNS["parameter_list_experts"].make())
    text = str(report)
    assert report.successful(), text
    assert "gathered" in text and "w_in [4, 16, 12]" in text and "experts covered 4/4" in text


def test_lists_with_no_router_beside_them_are_no_experts():
    with pytest.raises(AutocalError) as raised:
        autocal.synthesize(_seeded(UnroutedListsMoE))
    assert raised.value.kind == autocal.errors.NO_MOE_BLOCK
