"""The pattern catalogue: each way of writing an MoE block, with the rule of ``autocal/rules.py`` it must match.

Every toy kind of ``toy_moe.py`` is a pattern, and so are the blocks below,
written the way other code bases write them (a soft mixture, GShard's
capacity dispatch, a dispatching ``ModuleDict``). ``tests/test_rules.py``
checks each pattern against its rule, and that every rule has a pattern.

Example:
    >>> pattern = PATTERNS["soft_mixture"]
    >>> pattern.rule, tuple(pattern.example().shape)
    ('gated', (2, 5, 16))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .toy_moe import KINDS, ToyMoEConfig, make_toy_block

__all__ = ["Pattern", "PATTERNS", "SwiGLU", "SoftMixture", "CapacityExpert", "CapacityMoE", "DictLoopMoE",
           "TupleIndexMoE", "ExpertIdProjection", "ExpertIdMoE", "DecodeGatherMoE", "GroupedWeights",
           "GroupedWeightsMoE"]


class SwiGLU(nn.Module):
    def __init__(self, hidden: int = 16, width: int = 24) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = (nn.Linear(hidden, width, bias=False), nn.Linear(width, hidden, bias=False),
                                     nn.Linear(hidden, width, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SoftMixture(nn.Module):
    """Every expert on every token, weighted by a softmax over all of them (no top-k)."""

    def __init__(self, experts: int = 3) -> None:
        super().__init__()
        self.gate = nn.Linear(16, experts)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.gate(x).softmax(-1)
        return sum(weights[..., i:i + 1] * expert(x) for i, expert in enumerate(self.experts))


class CapacityExpert(nn.Module):
    def __init__(self, hidden: int = 16, width: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, width), nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CapacityMoE(nn.Module):
    """GShard / DeepSpeed-MoE style: top-k gating with a capacity per expert, einsum dispatch and combine."""

    def __init__(self, hidden: int = 16, experts: int = 4, k: int = 1, capacity_factor: float = 1.0) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList([CapacityExpert(hidden) for _ in range(experts)])
        self.k, self.capacity_factor = k, capacity_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        tokens, experts = flat.shape[0], len(self.experts)
        gates = self.wg(flat).softmax(-1)
        capacity = max(1, int(self.capacity_factor * self.k * tokens / experts))
        weights, chosen = gates.topk(self.k, dim=-1)
        combine = torch.zeros(tokens, experts, capacity)
        filled = torch.zeros(experts, dtype=torch.long)
        for slot in range(self.k):  # first come, first served; tokens past an expert's capacity are dropped
            mask = F.one_hot(chosen[:, slot], experts)
            position = filled + torch.cumsum(mask, 0) - 1
            kept = mask * (position < capacity)
            filled = filled + kept.sum(0)
            where = F.one_hot((position * kept).sum(-1), capacity)
            combine = combine + weights[:, slot, None, None] * kept[:, :, None] * where[:, None, :]
        dispatched = torch.einsum("sec,sm->ecm", (combine > 0).to(flat.dtype), flat)
        outputs = torch.stack([expert(rows) for expert, rows in zip(self.experts, dispatched)])
        return torch.einsum("sec,ecm->sm", combine, outputs).view_as(x)


class _DispatchingDict(nn.ModuleDict):
    """Experts keyed by name, with a dispatch loop of their own (NLLB-MoE, Switch Transformers)."""

    def forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for number, expert in enumerate(self.values()):
            token, slot = torch.where(index == number)
            if token.numel():
                out.index_add_(0, token, expert(hidden[token]) * weights[token, slot, None])
        return out


class DictLoopMoE(nn.Module):
    """A router beside a ``ModuleDict`` of experts that dispatches in its own forward."""

    def __init__(self, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.top_k, self.router = k, nn.Linear(16, experts, bias=False)
        self.experts = _DispatchingDict({f"expert_{e}": SwiGLU() for e in range(experts)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        return self.experts(flat, index, weights).view_as(x)


class TupleIndexMoE(nn.Module):
    """Packed weights on the block gathered by tuple indexing (``W[idx, ...]``, ``W[idx, :, :]``), contracted by an
    einsum of its own subscripts and by ``bmm`` over the flattened slots, biases added after each."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 5, k: int = 2) -> None:
        super().__init__()
        self.k, self.gate = k, nn.Linear(hidden, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, hidden, width) / hidden ** 0.5)  # [E, in, out]
        self.b_in = nn.Parameter(torch.randn(experts, width) / 10)
        self.w_out = nn.Parameter(torch.randn(experts, hidden, width) / width ** 0.5)  # [E, out, in]
        self.b_out = nn.Parameter(torch.randn(experts, hidden) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.gate(t).softmax(-1).topk(self.k, dim=-1)
        h = F.gelu(torch.einsum("nd,nkdw->nkw", t, self.w_in[idx, ...]) + self.b_in[idx, ...])
        w_out = self.w_out[idx, :, :].reshape(-1, *self.w_out.shape[1:]).transpose(1, 2)  # [tokens * k, in, out]
        y = torch.bmm(h.reshape(-1, 1, h.shape[-1]), w_out).view(*idx.shape, -1) + self.b_out[idx]
        return (y * weights.unsqueeze(-1)).sum(1).view_as(x)


class ExpertIdProjection(nn.Module):
    """One projection of every expert (``weight [E, out, in]``, ``bias [E, out]``), applied to one expert's rows."""

    def __init__(self, experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, out_features, in_features) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.randn(experts, out_features) / 10)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(x, self.weight[expert], self.bias[expert])


class ExpertIdMoE(nn.Module):
    """A router beside per-projection modules holding every expert, called with the expert's number in a loop."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k, self.router = k, nn.Linear(hidden, experts, bias=False)
        self.fc1, self.fc2 = ExpertIdProjection(experts, hidden, width), ExpertIdProjection(experts, width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.router(t).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(t)
        for e in range(self.router.out_features):
            token, slot = torch.where(idx == e)
            out.index_add_(0, token, self.fc2(F.gelu(self.fc1(t[token], e)), e) * weights[token, slot, None])
        return out.view_as(x)


class DecodeGatherMoE(nn.Module):
    """Packed experts run in a loop over ``W[e]``; one token (decode) instead gathers its experts' weights by
    ``index_select`` and contracts them by einsum. Verification runs one token too: detection must see both."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k, self.router = k, nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, width) / width ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.router(t).softmax(-1).topk(self.k, dim=-1)
        if t.shape[0] == 1:
            chosen = idx[0]
            h = F.gelu(torch.einsum("kwh,h->kw", torch.index_select(self.w1, 0, chosen), t[0]))
            return (weights[0] @ torch.einsum("khw,kw->kh", torch.index_select(self.w2, 0, chosen), h)).view_as(x)
        out = torch.zeros_like(t)
        for e in range(self.w1.shape[0]):
            token, slot = torch.where(idx == e)
            out.index_add_(0, token, F.linear(F.gelu(F.linear(t[token], self.w1[e])), self.w2[e])
                           * weights[token, slot, None])
        return out.view_as(x)


class GroupedWeights(nn.Module):
    """Every expert's weights side by side in two 2-D parameters (``[H, E * I]``, ``[E * I, H]``), viewed per expert
    in the forward, rows split by per-expert counts."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 4) -> None:
        super().__init__()
        self.experts = experts
        self.weight1 = nn.Parameter(torch.randn(hidden, experts * width) / hidden ** 0.5)
        self.weight2 = nn.Parameter(torch.randn(experts * width, hidden) / width ** 0.5)

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1 = self.weight1.view(self.experts, self.weight1.shape[0], -1)
        w2 = self.weight2.view(self.experts, -1, self.weight2.shape[1])
        return torch.cat([F.gelu(part @ w1[e]) @ w2[e] for e, part in enumerate(rows.split(counts.tolist()))])


class GroupedWeightsMoE(nn.Module):
    """Rows sorted by expert (``argsort``), a grouped MLP of side-by-side weights, weighted and scattered back."""

    def __init__(self, hidden: int = 16, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k, self.router = k, nn.Linear(hidden, experts, bias=False)
        self.mlp = GroupedWeights(hidden, experts=experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.router(t).softmax(-1).topk(self.k, dim=-1)
        order = idx.reshape(-1).argsort(stable=True)
        counts = torch.bincount(idx.reshape(-1), minlength=self.router.out_features)
        out = self.mlp(t[order // self.k], counts) * weights.reshape(-1)[order, None]
        return torch.zeros_like(t).index_add_(0, order // self.k, out).view_as(x)


@dataclass(frozen=True)
class Pattern:
    """A way of writing an MoE block: how to make one, an input for it, and the rule it must match."""

    name: str
    rule: str
    make: Callable[[], nn.Module]
    hidden_size: int = 16

    def example(self, seed: int = 0) -> torch.Tensor:
        return torch.randn(2, 5, self.hidden_size, generator=torch.Generator().manual_seed(seed))


# The rule each toy kind matches: packed experts called as transformers v5 calls them, unless said otherwise.
_TOY_RULES = {kind: "experts" for kind in KINDS} | {
    "modulelist_loop": "block", "scores_on_inputs": "block-dense", "masked_loop": "recorded-block",
    "sorted_banks": "sorted", "gathered": "gathered", "sliced_loop": "gathered", "attention_heads": "sorted",
}


def _toy(kind: str) -> Pattern:
    config = ToyMoEConfig(kind=kind)
    return Pattern(kind, _TOY_RULES[kind], lambda: make_toy_block(config), config.hidden_size)


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def seeded() -> nn.Module:
        torch.manual_seed(0)
        return make().eval()
    return seeded


PATTERNS: dict[str, Pattern] = {p.name: p for p in [
    *(_toy(kind) for kind in KINDS),
    Pattern("soft_mixture", "gated", _seeded(SoftMixture)),
    Pattern("capacity_mask", "mask-dispatch", _seeded(lambda: CapacityMoE(k=2, capacity_factor=1.25))),
    Pattern("dispatching_dict", "container", _seeded(DictLoopMoE)),
    Pattern("tuple_index_gather", "gathered", _seeded(TupleIndexMoE)),
    Pattern("expert_id_projections", "gathered", _seeded(ExpertIdMoE)),
    Pattern("decode_gather", "gathered", _seeded(DecodeGatherMoE)),
    Pattern("grouped_side_by_side", "gathered", _seeded(GroupedWeightsMoE)),
]}
