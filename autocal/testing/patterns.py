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
           "ScoredInputsMoE", "TwoLevelMoE"]


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


class ScoredInputsMoE(nn.Module):
    """Every expert on every token, its input multiplied by the token's score for it if chosen by the top-k, else
    by zero: no dispatch a specialised rule reads; the last resort forces the top-k.

    ``normalize``: the chosen scores are a softmax over the ``k`` chosen logits, so an expert's input scale depends
    on the expert chosen beside it: forcing cannot give it the inputs the router gives it, and the last resort
    refuses the block."""

    def __init__(self, experts: int = 5, k: int = 2, normalize: bool = False) -> None:
        super().__init__()
        self.k, self.normalize, self.router = k, normalize, nn.Linear(16, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        top, chosen = logits.topk(self.k, dim=-1)
        scores = torch.zeros_like(logits).scatter(-1, chosen, top.softmax(-1) if self.normalize else top.sigmoid())
        return sum(expert(x * scores[..., e, None]) for e, expert in enumerate(self.experts))


class TwoLevelMoE(nn.Module):
    """A group chosen by argmax, then the top-k experts of that group by the group's own gate (two choices)."""

    def __init__(self, groups: int = 3, per_group: int = 2, k: int = 1) -> None:
        super().__init__()
        self.per_group, self.k = per_group, k
        self.group_gate = nn.Linear(16, groups, bias=False)
        self.expert_gates = nn.Parameter(torch.randn(groups, per_group, 16) * 0.3)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(groups * per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        group = self.group_gate(flat).argmax(-1)
        weights, inner = torch.einsum("th,tph->tp", flat, self.expert_gates[group]).softmax(-1).topk(self.k, -1)
        chosen = group[:, None] * self.per_group + inner
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.view_as(x)


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
    Pattern("scored_inputs", "last-resort", _seeded(ScoredInputsMoE)),
    Pattern("two_level_gate", "last-resort", _seeded(TwoLevelMoE)),
]}
