"""The pattern catalogue: each way of writing an MoE block, with the rule of ``autocal/rules.py`` it must match.

Every toy kind of ``toy_moe.py`` is a pattern, and so are the blocks below,
written the way other code bases write them (a soft mixture, GShard's
capacity dispatch, a dispatching ``ModuleDict``, DeepSeek's remote code, …),
and blocks that no rule may match, each with the error kind it must end in
(or ``NOT_AN_MOE``: a candidate the rules show is no MoE, skipped). A few
models holding such blocks are here too, for tests that need a model around
them. ``tests/test_rules.py`` checks each pattern against its rule or its
failure, and that every rule has a pattern; ``tests/test_reliability.py``
tests the blocks one by one.

Example:
    >>> pattern = PATTERNS["soft_mixture"]
    >>> pattern.rule, tuple(pattern.example()[0].shape)
    ('gated', (2, 5, 16))
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import errors
from ..registry import MoECalibrationModule
from .toy_moe import KINDS, ToyMoEConfig, make_toy_block

__all__ = ["Pattern", "PATTERNS", "NOT_AN_MOE", "registered_pass_through", "SwiGLU", "SoftMixture", "CapacityExpert", "CapacityMoE",
           "DictLoopMoE", "NoRuleMatches", "PackedButUnrouted", "UnroutedSlice", "ReluMLP", "PerSampleExperts",
           "PerSampleMoE", "PerSampleModel", "ChainedLayers", "ChainHolder", "TableRoutingMoE", "DeclaringModel",
           "ExpertsWithWeightlessChoices", "WeightlessChoicesMoE", "ItemAssignmentMoE", "MaskedDictMoE",
           "WeightBank", "BankedExperts", "BanksBelowRouterMoE", "GroupedGemmMoE", "RoutingBanks",
           "LogitsToBanksMoE", "HeadBank", "HeadExperts",
           "MixtureOfHeadsAttention", "GatheredFFN", "GatheredMoE", "OwnWeightsMoE", "NeuronExperts",
           "TwoPositionTables", "LayoutThenMoE", "ExpertChoiceMoE", "LoopOverOwnWeights", "SummedHeads",
           "MaskedEncoder", "HeadsThenMoE", "ProjExpert", "HostSlicedMoE", "TokenByTokenMoE", "SortedChoiceMoE",
           "ThresholdChoiceMoE", "TopPChoiceMoE",
           "ScoredInputsMoE", "TwoLevelMoE",
           "TupleIndexMoE", "ExpertIdProjection", "ExpertIdMoE", "DecodeGatherMoE", "GroupedWeights",
           "GroupedWeightsMoE", "InOutLinear", "InOutLinearMoE", "CastGroupedMoE", "WholeContractionMoE", "MaskedModalityMoE",
           "PrefixSplitMoE",
           "BmmExperts", "SwitchCapacityMoE", "ParameterListMoE",
           "FunctionalEnsembleMoE", "PaddedCapacityMoE", "BiasFirstMoE", "SampledRoutingMoE",
           "SoftSlotsMoE", "DirectForwardMoE", "ChannelsFirstMoE"]

NOT_AN_MOE = "not-an-moe"  # a pattern's failure: the rules show the candidate is no MoE (convert skips it)


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


class PackedButUnrouted(nn.Module):
    """Looks like experts (stacked weights) but the block never routes tokens to them."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 8, 4))
        self.down_proj = nn.Parameter(torch.randn(4, 4, 4))

    def forward(self, hidden_states):
        return hidden_states * self.gate_up_proj.mean()


class NoRuleMatches(nn.Module):
    """Packed experts and a router beside them, but the forward routes nothing to the experts."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 4)
        self.experts = PackedButUnrouted()

    def forward(self, hidden_states):
        return self.experts(hidden_states) + self.router(hidden_states)


class UnroutedSlice(nn.Module):
    """Packed expert weights beside a router; the forward uses one slice of them on inputs no made-up shape fits."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(4, 8, 4))
        self.experts.down_proj = nn.Parameter(torch.randn(4, 4, 4))
        self.router = nn.Linear(4, 4)

    def forward(self, hidden_states):
        return hidden_states @ self.experts.gate_up_proj[0].T[:4]


class ReluMLP(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class PerSampleExperts(nn.ModuleList):
    """Each expert on every token, its output zeroed for the samples that did not pick it."""

    def forward(self, hidden, choice):
        out = torch.zeros_like(hidden)
        for i, expert in enumerate(self):
            out = out + expert(hidden) * (choice.view(-1, 1, 1) == i)
        return out


class PerSampleMoE(nn.Module):
    def __init__(self, hidden=8, experts=3):
        super().__init__()
        self.shared = nn.Linear(hidden, hidden)
        self.experts = PerSampleExperts(ReluMLP(hidden) for _ in range(experts))

    def forward(self, hidden, choice):
        return self.shared(hidden) + self.experts(hidden, choice)


class PerSampleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = PerSampleMoE()

    def forward(self, hidden, choice):
        return self.block(hidden, choice)


class ChainedLayers(nn.ModuleList):
    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x


class ChainHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = ChainedLayers(nn.Linear(4, 4) for _ in range(3))

    def forward(self, hidden_states):
        return self.layers(hidden_states)


class TableRoutingMoE(nn.Module):
    """An MoE autocal cannot read (experts are rows of a table), declared by its model as giving router logits."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.table = nn.Embedding(16, 8)

    def forward(self, hidden_states):
        logits = self.router(hidden_states)
        return hidden_states + self.table(logits.topk(2).indices).sum(-2), logits


class DeclaringModel(nn.Module):
    _can_record_outputs = {"router_logits": TableRoutingMoE}

    def __init__(self):
        super().__init__()
        self.mlp = TableRoutingMoE()

    def forward(self, hidden_states):
        return self.mlp(hidden_states)[0]


class ExpertsWithWeightlessChoices(nn.Module):
    """Packed experts plus choices that have no weights: ``E`` MLPs, then ``Z`` choices that scale the input."""

    def __init__(self, experts=4, weightless=3, hidden=8, width=6):
        super().__init__()
        self.experts, self.weightless = experts, weightless
        self.w_in = nn.Parameter(torch.randn(experts + weightless, width, hidden) / 3)  # extra entries unused
        self.w_out = nn.Parameter(torch.randn(experts, hidden, width) / 3)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in range(self.experts + self.weightless):
            slot, token = torch.where(top_k_index.transpose(0, 1) == expert)
            if token.numel() == 0:
                continue
            rows = hidden_states[token]
            if expert < self.experts:
                rows = F.linear(torch.tanh(F.linear(rows, self.w_in[expert])),
                                                  self.w_out[expert])
            else:
                rows = 0.5 * rows
            out.index_add_(0, token, rows * top_k_weights[token, slot, None])
        return out


class WeightlessChoicesMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 7, bias=False)
        self.experts = ExpertsWithWeightlessChoices()

    def forward(self, hidden_states):
        weights, index = self.gate(hidden_states).softmax(-1).topk(3, dim=-1)
        return self.experts(hidden_states, index, weights)


class ItemAssignmentMoE(nn.Module):
    """``y[token] += expert(x[token]) * w``, and a shared expert: item assignment fx cannot trace."""

    def __init__(self, experts=5, k=2):
        super().__init__()
        self.top_k, self.router = k, nn.Linear(16, experts)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(experts))
        self.shared = SwiGLU()

    def forward(self, x):
        weights, index = self.router(x).softmax(-1).topk(self.top_k)
        flat, index, weights = x.reshape(-1, 16), index.reshape(-1, self.top_k), weights.reshape(-1, self.top_k)
        y = torch.zeros_like(flat)
        for e in range(len(self.experts)):
            token, slot = (index == e).nonzero(as_tuple=True)
            y[token] += self.experts[e](flat[token]) * weights[token, slot, None]
        return y.view_as(x) + self.shared(x)


class MaskedDictMoE(nn.Module):
    """Top-1 over a ``ModuleDict`` keyed by name; rows picked from ``[batch, seq, hidden]`` with a 2-D mask."""

    def __init__(self, experts=4):
        super().__init__()
        self.top_k, self.classifier = 1, nn.Linear(16, experts)
        self.experts = nn.ModuleDict({f"expert_{i}": SwiGLU() for i in range(experts)})

    def forward(self, x):
        weight, index = self.classifier(x).softmax(-1).max(-1)
        out = torch.zeros_like(x)
        for i in range(len(self.experts)):
            chosen = index == i
            out[chosen] = self.experts[f"expert_{i}"](x[chosen]) * weight[chosen].unsqueeze(-1)
        return out


class WeightBank(nn.Module):
    def __init__(self, experts, n_in, n_out, scaled=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, n_in, n_out) / n_in ** 0.5)
        self.scale = nn.Parameter(torch.ones(())) if scaled else None

    def forward(self, x, counts):  # rows sorted by expert, ``counts`` rows each
        out = torch.cat([part @ w for part, w in zip(x.split(counts), self.weight)])
        return out if self.scale is None else out * self.scale


class BankedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = WeightBank(4, 8, 12, scaled=True), WeightBank(4, 12, 8, scaled=True)

    def forward(self, x, counts):
        return self.fc2(torch.relu(self.fc1(x, counts)), counts)


class BanksBelowRouterMoE(nn.Module):
    """Experts one level down in two scaled weight banks (not recognised); the router two levels above."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4, bias=False)
        self.experts = BankedExperts()

    def forward(self, x):
        expert = self.router(x).argmax(-1)
        order = expert.argsort()
        counts = torch.bincount(expert, minlength=4).tolist()
        out = torch.empty_like(x)
        out[order] = self.experts(x[order], counts)
        return out


class GroupedGemmMoE(nn.Module):
    """Megablocks-style: rows sorted by expert, weight banks called with the row count of each expert."""

    def __init__(self, experts=5, k=2):
        super().__init__()
        self.k, self.router = k, nn.Linear(8, experts, bias=False)
        self.up, self.down = WeightBank(experts, 8, 12), WeightBank(experts, 12, 8)

    def forward(self, x):
        flat = x.reshape(-1, 8)
        weights, index = self.router(flat).softmax(-1).topk(self.k)
        order = index.flatten().argsort(stable=True)
        counts = torch.bincount(index.flatten(), minlength=self.router.out_features).tolist()
        rows = flat[order // self.k]
        out = self.down(F.gelu(self.up(rows, counts)), counts)
        out = out * weights.flatten()[order, None]
        return torch.zeros_like(flat).index_add(0, order // self.k, out).view_as(x)


class RoutingBanks(nn.Module):
    """An experts module that routes: given the token rows and the router's logits, it takes the top-k, sorts the
    slots by expert and runs two weight banks (GELU between) on the sorted rows."""

    def __init__(self, experts: int = 5, k: int = 2):
        super().__init__()
        self.k, self.up, self.down = k, WeightBank(experts, 8, 12), WeightBank(experts, 12, 8)

    def forward(self, rows, logits):
        top, chosen = torch.topk(logits, self.k, dim=-1)
        order = chosen.flatten().argsort(stable=True)
        counts = torch.bincount(chosen.flatten(), minlength=logits.shape[-1]).tolist()
        out = self.down(F.gelu(self.up(rows[order // self.k], counts)), counts)
        out = out * top.softmax(dim=-1).flatten()[order, None]
        return torch.zeros_like(rows).index_add_(0, order // self.k, out)


class LogitsToBanksMoE(nn.Module):
    """A layer holding the router and a shared expert, handing the router's logits to experts that route them
    through their weight banks (Aria's layout in transformers 5.17)."""

    def __init__(self, experts: int = 5):
        super().__init__()
        self.router = nn.Linear(8, experts, bias=False)
        self.experts, self.shared = RoutingBanks(experts), SwiGLU(8, 12)

    def forward(self, x):
        t = x.reshape(-1, 8)
        return (self.experts(t, self.router(t)) + self.shared(t)).view_as(x)


class HeadBank(nn.Module):
    """One projection per expert, ``[E, out, in]``, taking rows sorted by expert and a tensor of counts."""

    def __init__(self, experts, features_in, features_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, features_out, features_in) / features_in ** 0.5)

    def forward(self, rows, counts):
        return torch.cat([F.linear(part, w) for part, w in zip(rows.split(counts.tolist()), self.w)])


class HeadExperts(nn.Module):
    """Mixture of attention heads: a query and an output projection per expert, used through two methods."""

    def __init__(self, experts=6, k=2, hidden=8, head=4):
        super().__init__()
        self.k, self.head = k, head
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.query, self.out = HeadBank(experts, hidden, head), HeadBank(experts, head, hidden)

    def forward(self, x):
        raise NotImplementedError("called through project() and combine()")

    def project(self, x):  # [T, hidden] -> queries [T, k, head]
        scores, chosen = torch.topk(self.gate(x).sigmoid(), self.k, dim=-1)
        order = chosen.flatten().argsort(stable=True)
        counts = torch.bincount(chosen.flatten(), minlength=self.gate.out_features)
        queries = torch.zeros(x.shape[0] * self.k, self.head).index_copy(
            0, order, self.query(x[order // self.k], counts))
        return queries.view(x.shape[0], self.k, self.head), (order, counts, scores / scores.sum(-1, keepdim=True))

    def combine(self, attended, topology):  # [T, k, head] -> [T, hidden]
        order, counts, weights = topology
        rows = self.out(attended.reshape(-1, self.head)[order], counts)
        slots = torch.zeros(attended.shape[0] * self.k, rows.shape[-1]).index_copy(0, order, rows)
        return (slots.view(attended.shape[0], self.k, -1) * weights[..., None]).sum(1)


class MixtureOfHeadsAttention(nn.Module):
    """Causal attention whose queries and output projections are routed experts; keys and values are shared."""

    def __init__(self, **sizes):
        super().__init__()
        self.heads = HeadExperts(**sizes)
        self.kv = nn.Linear(8, 2 * self.heads.head, bias=False)

    def attend(self, queries, keys, values):  # queries [T, k, head]; every slot attends over all earlier tokens
        scores = torch.einsum("tkd,sd->kts", queries, keys) / keys.shape[-1] ** 0.5
        causal = torch.ones(keys.shape[0], keys.shape[0], dtype=torch.bool).tril()
        return torch.einsum("kts,sd->tkd", scores.masked_fill(~causal, float("-inf")).softmax(-1), values)

    def forward(self, x):
        queries, topology = self.heads.project(x)
        keys, values = self.kv(x).chunk(2, dim=-1)
        return self.heads.combine(self.attend(queries, keys, values), topology)

    def what_expert_sees(self, x, expert):
        """The output projection input of ``expert`` for every token, had the router chosen it (written out)."""
        keys, values = self.kv(x).chunk(2, dim=-1)
        queries = F.linear(x, self.heads.query.w[expert])
        return self.attend(queries[:, None], keys, values)[:, 0]


class GatheredFFN(nn.Module):
    """gpt-fast's pattern: per token, the chosen experts' weights are gathered and contracted in one einsum."""

    def __init__(self, experts, hidden, width):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)
        self.w3 = nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, width) / width ** 0.5)

    def forward(self, x, expert_indices):  # -> one output per slot, [T, k, hidden]
        x1 = F.silu(torch.einsum("ti,taoi->tao", x, self.w1[expert_indices]))
        x3 = torch.einsum("ti,taoi->tao", x, self.w3[expert_indices])
        return torch.einsum("tao,taio->tai", x1 * x3, self.w2[expert_indices])


class GatheredMoE(nn.Module):
    def __init__(self, experts=6, hidden=16, width=24, k=2):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.cond_ffn = GatheredFFN(experts, hidden, width)
        self.hidden, self.k = hidden, k

    def forward(self, x):
        flat = x.view(-1, self.hidden)
        weights, indices = torch.topk(self.gate(flat).softmax(-1), self.k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return torch.einsum("tai,ta->ti", self.cond_ffn(flat, indices), weights).view_as(x)


class OwnWeightsMoE(nn.Module):
    """Expert weights on the block itself, ``[E, in, out]``, gathered with index_select and applied by matmul."""

    def __init__(self, experts=5, hidden=8, width=12, k=3):
        super().__init__()
        self.router = nn.Parameter(torch.randn(experts, hidden))
        self.up = nn.Parameter(torch.randn(experts, hidden, width) / hidden ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, width, hidden) / width ** 0.5)
        self.k = k

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores, chosen = (x @ self.router.T).sigmoid().topk(self.k)
        flat = chosen.reshape(-1)
        h = torch.relu(torch.matmul(x.repeat_interleave(self.k, 0)[:, None], self.up.index_select(0, flat)))
        out = torch.matmul(h, self.down.index_select(0, flat)).view(x.shape[0], self.k, -1)
        return (out * scores[..., None]).sum(1).view_as(hidden_states)


class NeuronExperts(nn.Module):
    """Experts of one neuron each, rows of two embedding tables, chosen over a product of two key sets."""

    def __init__(self, keys=3, hidden=8, k=2):
        super().__init__()
        self.k = k
        self.keys = nn.Linear(hidden, 2 * keys, bias=False)
        self.down, self.up = nn.Embedding(keys * keys, hidden), nn.Embedding(keys * keys, hidden)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        rows, columns = self.keys(flat).chunk(2, dim=-1)
        scores, chosen = (rows[:, :, None] + columns[:, None, :]).flatten(1).topk(self.k)
        h = torch.einsum("th,tkh->tk", flat, self.down(chosen)).relu() * scores.softmax(-1)
        return torch.einsum("tk,tkh->th", h, self.up(chosen)).view_as(x)


class TwoPositionTables(nn.Module):
    """Not an MoE: two position tables of one shape (as in layout models), looked up by coordinates."""

    def __init__(self):
        super().__init__()
        self.x_position, self.y_position = nn.Embedding(16, 8), nn.Embedding(16, 8)

    def forward(self, coordinates):
        return self.x_position(coordinates[..., 0]) + self.y_position(coordinates[..., 1])


class LayoutThenMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.layout = TwoPositionTables()
        self.moe = make_toy_block(ToyMoEConfig(hidden_size=8))

    def forward(self, coordinates):
        return self.moe(self.layout(coordinates))


class ExpertChoiceMoE(nn.Module):
    """Experts choose their tokens (top-C over the tokens per expert, C from the number of tokens)."""

    def __init__(self, hidden=16, experts=6, k=2):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList([CapacityExpert(hidden) for _ in range(experts)])
        self.k = k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        capacity = max(1, flat.shape[0] * self.k // len(self.experts))  # a Python number a recording bakes in
        weights, tokens = self.gate(flat).softmax(-1).t().topk(capacity, dim=-1)
        out = torch.zeros_like(flat)
        for expert, module in enumerate(self.experts):
            out.index_add_(0, tokens[expert], module(flat[tokens[expert]]) * weights[expert, :, None])
        return out.view_as(x)


class LoopOverOwnWeights(nn.Module):
    """Expert weights on the block itself, sliced per expert in a Python loop (three ways of applying them)."""

    def __init__(self, style, experts=6, hidden=16, width=24, k=2):
        super().__init__()
        self.style, self.k = style, k
        self.gate = nn.Linear(hidden, experts, bias=False)
        up_shape = (experts, hidden, width) if style == "matmul" else (experts, width, hidden)
        down_shape = (experts, width, hidden) if style == "matmul" else (experts, hidden, width)
        self.up = nn.Parameter(torch.randn(up_shape) / hidden ** 0.5)
        self.down = nn.Parameter(torch.randn(down_shape) / width ** 0.5)

    def _project(self, rows, weight):
        if self.style == "linear":
            return F.linear(rows, weight)
        return rows @ weight.T if self.style == "transposed" else rows @ weight

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat).softmax(-1).topk(self.k)
        out = torch.zeros_like(flat)
        for expert in chosen.unique():  # a 0-d tensor per expert hit
            token, slot = torch.where(chosen == expert)
            h = self._project(F.silu(self._project(flat[token], self.up[expert])), self.down[expert])
            out.index_add_(0, token, h * weights[token, slot, None])
        return out.view_as(x)


class SummedHeads(nn.ModuleList):
    """A list of identical projections with a forward of its own."""

    def forward(self, x):
        return sum(layer(x) for layer in self)


class MaskedEncoder(nn.Module):
    """Not an MoE: the heads' user needs a mask autocal cannot make up."""

    def __init__(self):
        super().__init__()
        self.heads = SummedHeads([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x, keep):
        return self.heads(x) * keep[..., None]


class HeadsThenMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = MaskedEncoder()
        self.moe = make_toy_block(ToyMoEConfig(hidden_size=8))

    def forward(self, x):
        return self.moe(self.encoder(x, torch.ones(x.shape[:-1])))


class ProjExpert(nn.Module):
    def __init__(self, hidden=16, width=24):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, width, bias=False), nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HostSlicedMoE(nn.Module):
    """The pattern of DeepSeek-V2/V3's remote code (``moe_infer``): rows sorted by expert, counts taken to numpy
    on the host, each expert given its slice of the sorted rows."""

    def __init__(self, hidden=16, experts=8, k=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden) / 4)
        self.experts = nn.ModuleList([ProjExpert(hidden) for _ in range(experts)])
        self.k = k

    def forward(self, hidden_states):
        x = hidden_states.view(-1, hidden_states.shape[-1])
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        topk_idx = torch.topk(scores, k=self.k, dim=-1, sorted=False)[1]
        topk_weight = scores.gather(1, topk_idx)
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        counts = topk_idx.new_zeros((topk_idx.shape[0], len(self.experts))).scatter_(1, topk_idx, 1).sum(0)
        idxs = topk_idx.view(-1).argsort()
        sorted_tokens = x[idxs // topk_idx.shape[1]]
        outputs, start = [], 0
        for i, num_tokens in enumerate(counts.cpu().numpy()):
            end = start + num_tokens
            if num_tokens == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start:end]))
            start = end
        outs = torch.cat(outputs, dim=0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        y = new_x.view(*topk_idx.shape, -1).type(topk_weight.dtype).mul_(topk_weight.unsqueeze(-1)).sum(1)
        return y.type(new_x.dtype).view_as(hidden_states)


class TokenByTokenMoE(nn.Module):
    """A naive reference: every token's every slot, one expert call at a time, expert numbers read on the host."""

    def __init__(self, hidden=16, experts=5, k=2):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList([ProjExpert(hidden) for _ in range(experts)])
        self.k = k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(self.gate(flat).softmax(-1), self.k)
        out = torch.zeros_like(flat)
        for token in range(flat.shape[0]):
            for slot in range(self.k):
                out[token] += weights[token, slot] * self.experts[int(chosen[token, slot])](flat[token:token + 1])[0]
        return out.view_as(x)


class SortedChoiceMoE(nn.Module):
    """Experts in a ModuleDict; the choice is a full sort of the scores, then the first k."""

    def __init__(self, hidden=16, experts=5, k=2):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleDict({f"e{i}": ProjExpert(hidden) for i in range(experts)})
        self.k = k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        scores, order = self.gate(flat).softmax(-1).sort(dim=-1, descending=True)
        weights, chosen = scores[:, :self.k], order[:, :self.k]
        out = torch.zeros_like(flat)
        for e in range(len(self.experts)):
            mask = chosen == e
            rows = mask.any(-1)
            if rows.any():
                out[rows] += self.experts[f"e{e}"](flat[rows]) * (weights * mask).sum(-1, keepdim=True)[rows]
        return out.view_as(x)


class ThresholdChoiceMoE(nn.Module):
    """The choice is a threshold: scores at or above their own (E - k + 1)-th smallest value (``kthvalue``) are
    kept, the weights a softmax over the kept logits, each expert run on the rows that kept it."""

    def __init__(self, hidden=16, experts=6, k=2):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(ProjExpert(hidden) for _ in range(experts))
        self.k = k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)
        threshold = logits.kthvalue(logits.shape[-1] - self.k + 1, dim=-1, keepdim=True).values
        kept = logits >= threshold
        weights = logits.masked_fill(~kept, float("-inf")).softmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = kept[:, e]
            if rows.any():
                out[rows] += weights[rows, e, None] * expert(flat[rows])
        return out.view_as(x)


class TopPChoiceMoE(nn.Module):
    """Top-p (dynamic k) routing: each token keeps its best experts until their probabilities reach ``p``, so k
    varies by token. ``spelling`` "kept": a kept mask (``cumsum - probs < p``) scattered back to the experts,
    weights the probabilities it keeps; "removed": the sorted probabilities past ``p`` (``cumsum > p``, shifted
    right so the best stays) filled with 0, renormalised and scattered back."""

    def __init__(self, hidden=16, experts=6, p=0.6, spelling="kept"):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(ProjExpert(hidden) for _ in range(experts))
        self.p, self.spelling = p, spelling

    def _weights(self, probs):
        ranked, order = probs.sort(-1, descending=True)
        if self.spelling == "kept":
            kept = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ranked.cumsum(-1) - ranked < self.p)
            return probs * kept
        removed = ranked.cumsum(-1) > self.p
        removed = torch.cat([torch.zeros_like(removed[:, :1]), removed[:, :-1]], dim=-1)
        ranked = ranked.masked_fill(removed, 0.0)
        return torch.zeros_like(probs).scatter(-1, order, ranked / ranked.sum(-1, keepdim=True))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights = self._weights(self.router(flat).softmax(-1))
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = (weights[:, e] > 0).nonzero().squeeze(-1)
            out.index_add_(0, rows, weights[rows, e, None] * expert(flat[rows]))
        return out.view_as(x)


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


class WholeContractionMoE(nn.Module):
    """Every expert on every token: ``[E, out, in]`` weights contracted whole with all tokens (experts first in
    the outputs, the second projection on each expert's own rows), then the chosen experts' outputs taken along
    the expert dimension by the top-k and weighted."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 5, k: int = 2) -> None:
        super().__init__()
        self.k, self.gate = k, nn.Linear(hidden, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)
        self.w_out = nn.Parameter(torch.randn(experts, hidden, width) / width ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.gate(t).softmax(-1).topk(self.k, dim=-1)
        h = F.silu(torch.matmul(t, self.w_in.transpose(1, 2)))  # [E, tokens, width]
        y = torch.einsum("enw,edw->end", h, self.w_out)  # [E, tokens, hidden]
        picked = torch.take_along_dim(y, idx.T.unsqueeze(-1), dim=0)  # [k, tokens, hidden]
        return (picked * weights.T.unsqueeze(-1)).sum(0).view_as(x)


class BmmExperts(nn.Module):
    """Packed experts on ``[E, capacity, d]`` rows by ``bmm``: ``w_in`` stored ``[E, out, in]``, ``w_out`` ``[E, in, out]``."""

    def __init__(self, hidden: int = 16, width: int = 24, experts: int = 4) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)
        self.w_out = nn.Parameter(torch.randn(experts, width, hidden) / width ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(F.relu(torch.bmm(x, self.w_in.transpose(1, 2))), self.w_out)


class SwitchCapacityMoE(nn.Module):
    """Switch-style top-1 with a capacity (tokens past it dropped): tokens placed in ``[E, capacity, d]`` by a
    matmul of the dispatch mask's transpose with the token rows, packed ``bmm`` experts, combined by a matmul."""

    def __init__(self, hidden: int = 16, experts: int = 4, capacity_factor: float = 0.75) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = BmmExperts(hidden, experts=experts)
        self.num_experts, self.capacity_factor = experts, capacity_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        count, experts = tokens.shape[0], self.num_experts
        capacity = max(1, int(self.capacity_factor * count / experts))
        gate, chosen = self.router(tokens).softmax(-1).max(-1)
        one_hot = F.one_hot(chosen, experts)
        position = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1)
        kept = one_hot * (position < capacity)[:, None]
        dispatch = (kept[:, :, None] * F.one_hot(position.clamp(max=capacity - 1), capacity)[:, None]).to(x.dtype)
        flat = dispatch.reshape(count, experts * capacity)
        outputs = self.experts((flat.T @ tokens).view(experts, capacity, -1))
        return ((flat * gate[:, None]) @ outputs.reshape(experts * capacity, -1)).view_as(x)


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


def _cast(w: torch.Tensor, spelling: str, x: torch.Tensor) -> torch.Tensor:
    """Expert weights cast before use, as training code writes it (``x`` already in the dtype computed in)."""
    return {"bfloat16": lambda: w.bfloat16(), "to_dtype": lambda: w.to(x.dtype), "half": lambda: w.half(),
            "float": lambda: w.float(), "detach_contiguous": lambda: w.detach().contiguous()}[spelling]()


class CastGroupedMoE(nn.Module):
    """torchtitan's grouped experts in a model of another dtype: rows sorted by expert, cast to ``dtype``, and
    ``F.grouped_mm`` with packed ``[E, out, in]`` weights cast the same way (``w.bfloat16()``, ``w.to(x.dtype)``)
    and transposed; the output cast back. ``gather``: each token's chosen experts' weights gathered from the cast
    copy (``w.to(x.dtype)[idx]``) and contracted by einsum instead (gpt-fast's pattern)."""

    def __init__(self, spelling: str = "bfloat16", dtype: torch.dtype = torch.bfloat16, gather: bool = False,
                 hidden: int = 16, width: int = 32, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.spelling, self.dtype, self.gather, self.k = spelling, dtype, gather, k
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)
        self.w3 = nn.Parameter(torch.randn(experts, width, hidden) / hidden ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, width) / width ** 0.5)

    def _grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        w1, w2, w3 = (_cast(w, self.spelling, rows).transpose(-2, -1) for w in (self.w1, self.w2, self.w3))
        h = F.silu(F.grouped_mm(rows, w1, offs=offsets)) * F.grouped_mm(rows, w3, offs=offsets)
        return F.grouped_mm(h, w2, offs=offsets)

    def _gathered(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        rows = t.to(self.dtype)
        w1, w2, w3 = (_cast(w, self.spelling, rows)[idx] for w in (self.w1, self.w2, self.w3))
        h = F.silu(torch.einsum("ti,tkoi->tko", rows, w1)) * torch.einsum("ti,tkoi->tko", rows, w3)
        return torch.einsum("tko,tkio->tki", h, w2).to(t.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.router(t).softmax(-1).topk(self.k, dim=-1)
        if self.gather:
            return torch.einsum("tki,tk->ti", self._gathered(t, idx), weights).view_as(x)
        order = idx.reshape(-1).argsort(stable=True)
        rows = t[order // self.k].to(self.dtype)
        out = self._grouped(rows, torch.bincount(idx.reshape(-1), minlength=self.router.out_features))
        out = out.to(t.dtype) * weights.reshape(-1)[order, None]
        return torch.zeros_like(t).index_add_(0, order // self.k, out).view_as(x)


class InOutLinear(nn.Module):
    """A Linear class of its own storing ``weight [in, out]``, used as ``x @ weight``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) / in_features ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class InOutLinearMoE(nn.Module):
    """Experts of ``InOutLinear`` s in a ``ModuleList``, a top-k and a loop adding into the chosen rows."""

    def __init__(self, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.top_k, self.router = k, nn.Linear(16, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(InOutLinear(16, 32), nn.ReLU(), InOutLinear(32, 16))
                                     for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(index == e)
            out[rows] += weights[rows, slot, None] * expert(flat[rows])
        return out.view_as(x)


class MaskedModalityMoE(nn.Module):
    """Two expert sets of different sizes: the tokens an ``is_image`` mask marks are routed among the vision
    experts, the rest among the text experts, each set by its own top-k (boolean rows, one-hot dispatch)."""

    def __init__(self, text: int = 4, vision: int = 3, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.text_gate, self.vision_gate = nn.Linear(16, text, bias=False), nn.Linear(16, vision, bias=False)
        self.text_experts = nn.ModuleList(SwiGLU() for _ in range(text))
        self.vision_experts = nn.ModuleList(SwiGLU() for _ in range(vision))

    def forward(self, x: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        flat, image = x.reshape(-1, x.shape[-1]), is_image.reshape(-1)
        out = torch.zeros_like(flat)
        for chosen, gate, experts in ((~image, self.text_gate, self.text_experts),
                                      (image, self.vision_gate, self.vision_experts)):
            rows = flat[chosen]
            weights, picked = gate(rows).softmax(-1).topk(self.k, dim=-1)
            hit = F.one_hot(picked, len(experts)).permute(2, 1, 0)  # [experts, k, rows]
            routed = torch.zeros_like(rows)
            for e, expert in enumerate(experts):
                slot, token = torch.where(hit[e])
                routed.index_add_(0, token, expert(rows[token]) * weights[token, slot, None])
            out[chosen] = routed
        return out.view_as(x)


class PrefixSplitMoE(nn.Module):
    """Vision experts for the first ``prefix`` positions of each sequence (image patches placed first), text
    experts for the rest, each set with its own router: a position split, no input beyond the hidden states."""

    def __init__(self, prefix: int = 3, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.prefix, self.k = prefix, k
        self.vision_router, self.text_router = (nn.Linear(16, experts, bias=False) for _ in range(2))
        self.vision_experts = nn.ModuleList(SwiGLU() for _ in range(experts))
        self.text_experts = nn.ModuleList(SwiGLU() for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vision = self._routed(x[:, :self.prefix], self.vision_router, self.vision_experts)
        text = self._routed(x[:, self.prefix:], self.text_router, self.text_experts)
        return torch.cat([vision, text], dim=1)

    def _routed(self, part: torch.Tensor, router: nn.Linear, experts: nn.ModuleList) -> torch.Tensor:
        flat = part.reshape(-1, part.shape[-1])
        weights, index = router(flat).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(experts):
            rows, slot = torch.where(index == e)
            out.index_add_(0, rows, weights[rows, slot, None] * expert(flat[rows]))
        return out.view_as(part)


def _image_mask(generator: torch.Generator) -> torch.Tensor:
    """A ``[2, 5]`` mask with 4 image tokens among 10, placed at random."""
    return (torch.randperm(10, generator=generator) < 4).reshape(2, 5)


class ParameterListMoE(nn.Module):
    """Experts as one weight per expert in ``nn.ParameterList`` s (``x @ self.w_in[e]``): no Linear, no ``[E, a, b]``
    tensor; the gathered rule reads each list as packed storage, entry ``e`` for slice ``e`` (``detect/listed.py``)."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k, self.router = k, nn.Linear(hidden, experts, bias=False)
        self.w_in = nn.ParameterList(nn.Parameter(torch.randn(hidden, width) / hidden ** 0.5) for _ in range(experts))
        self.w_out = nn.ParameterList(nn.Parameter(torch.randn(width, hidden) / width ** 0.5) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.router(t).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(t)
        for e, (w_in, w_out) in enumerate(zip(self.w_in, self.w_out)):
            token, slot = torch.where(idx == e)
            y = F.gelu(t[token] @ w_in) @ w_out * weights[token, slot, None]
            out.scatter_add_(0, token[:, None].expand(-1, t.shape[-1]), y)
        return out.view_as(x)


class FunctionalEnsembleMoE(nn.Module):
    """Every expert module run at once through ``torch.func`` (their weights stacked, ``vmap`` over
    ``functional_call``), the chosen outputs gathered by the top-k: the expert modules are never called on their
    own, so no calibration can observe them; the block routes among them all the same (an error, never a skip)."""

    def __init__(self, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k, self.router = k, nn.Linear(16, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.router(t).softmax(-1).topk(self.k, dim=-1)
        params, buffers = torch.func.stack_module_state(list(self.experts))
        run = lambda p, b, rows: torch.func.functional_call(self.experts[0], (p, b), (rows,))  # noqa: E731
        outputs = torch.vmap(run, in_dims=(0, 0, None))(params, buffers, t)  # [E, tokens, hidden]
        picked = outputs[idx, torch.arange(t.shape[0])[:, None]]
        return (picked * weights.unsqueeze(-1)).sum(1).view_as(x)


class PaddedCapacityMoE(nn.Module):
    """Each expert's rows written into a buffer ``[E, C, H]`` padded to the largest count, packed weights
    contracted whole with it by ``bmm``, each slot's output read back: the contraction is over routed rows, not
    every token (once taken for every expert on every token); the rows are followed as copies of token rows."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k, self.router = k, nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, hidden, width) / hidden ** 0.5)
        self.w2 = nn.Parameter(torch.randn(experts, width, hidden) / width ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.router(t).softmax(-1).topk(self.k, dim=-1)
        flat = idx.reshape(-1)
        hits = F.one_hot(flat, self.w1.shape[0])
        position = ((hits.cumsum(0) - 1) * hits).sum(-1)
        buffer = t.new_zeros(self.w1.shape[0], int(hits.sum(0).max()), t.shape[-1])
        buffer[flat, position] = t.repeat_interleave(self.k, dim=0)
        y = torch.bmm(F.gelu(torch.bmm(buffer, self.w1)), self.w2)
        return (y[flat, position].view(-1, self.k, t.shape[-1]) * weights.unsqueeze(-1)).sum(1).view_as(x)


class SoftSlotsMoE(nn.Module):
    """Soft MoE: each expert runs on slots, softmax mixtures of every token (dispatch weights over tokens), and each
    token's output mixes every slot's output: nothing chooses among experts, so there is nothing to rewrite."""

    def __init__(self, experts: int = 3, slots: int = 2) -> None:
        super().__init__()
        self.slot_embeds = nn.Parameter(torch.randn(experts, slots, 16) / 4)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("bnd,esd->bnes", x, self.slot_embeds)
        slots = torch.einsum("bnd,bnes->besd", x, logits.softmax(dim=1))
        outputs = torch.stack([expert(slots[:, e]) for e, expert in enumerate(self.experts)], dim=1)
        return torch.einsum("besd,bnes->bnd", outputs, logits.flatten(2).softmax(dim=-1).view_as(logits))


class DirectForwardMoE(nn.Module):
    """Experts run as ``expert.forward(rows)``: no module call, so no hook on an expert fires (autocal's, or an
    observer's on the expert); refused, saying how to call them."""

    def __init__(self, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k, self.router = k, nn.Linear(16, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.router(t).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            out[token] += weights[token, slot, None] * expert.forward(t[token])
        return out.view_as(x)


class SampledRoutingMoE(nn.Module):
    """Experts drawn at inference: ``torch.multinomial`` over the softmax, or, with ``noisy``, a top-k of logits
    with noise added on every call (a training-time noisy gate left on in eval). No calibration forward can give
    the experts the tokens a run routes to them: refused, naming the draw."""

    def __init__(self, noisy: bool = False, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.noisy, self.k, self.router = noisy, k, nn.Linear(16, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        logits = self.router(t)
        if self.noisy:
            weights, idx = (logits + torch.randn_like(logits)).softmax(-1).topk(self.k, dim=-1)
        else:
            idx = torch.multinomial(logits.softmax(-1), self.k)
            weights = logits.softmax(-1).gather(1, idx)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            out[token] += weights[token, slot, None] * expert(t[token])
        return out.view_as(x)


class BiasFirstMoE(nn.Module):
    """Each slot's weights and biases gathered by the flattened choices and applied by ``baddbmm(b[idx][:, None],
    rows, W[idx])``: the bias, the first operand, reaches the contraction through a view."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 5, k: int = 2) -> None:
        super().__init__()
        self.k, self.gate = k, nn.Linear(hidden, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, hidden, width) / hidden ** 0.5)
        self.b_in = nn.Parameter(torch.randn(experts, width) / 10)
        self.w_out = nn.Parameter(torch.randn(experts, width, hidden) / width ** 0.5)
        self.b_out = nn.Parameter(torch.randn(experts, hidden) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        weights, idx = self.gate(t).softmax(-1).topk(self.k, dim=-1)
        slots = idx.reshape(-1)
        rows = t[:, None].expand(-1, self.k, -1).reshape(-1, 1, t.shape[-1])
        h = F.silu(torch.baddbmm(self.b_in[slots][:, None], rows, self.w_in[slots]))
        y = torch.baddbmm(self.b_out[slots].unsqueeze(1), h, self.w_out[slots]).view(*idx.shape, -1)
        return (y * weights.unsqueeze(-1)).sum(1).view_as(x)


class ChannelsFirstMoE(nn.Module):
    """A conv net's MoE over positions, features first: ``[B, S, H]`` moved to ``[B, H, S]``, a kernel-1
    ``Conv1d`` router scoring each position, the top-k over the channel dimension, experts of kernel-1 convs run on
    the gathered columns and added back. Its router is a ``[E, H, 1]`` weight; its experts take columns, not rows:
    refused (naming the expert call), never skipped."""

    def __init__(self, hidden: int = 16, width: int = 12, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k, self.router = k, nn.Conv1d(hidden, experts, kernel_size=1)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Conv1d(hidden, width, 1), nn.GELU(), nn.Conv1d(width, hidden, 1)) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = x.transpose(1, 2)  # [B, H, S]
        weights, idx = self.router(columns).softmax(dim=1).topk(self.k, dim=1)  # [B, k, S]
        flat = columns.permute(1, 0, 2).reshape(x.shape[-1], -1)  # [H, B * S]
        idx, weights = idx.permute(1, 0, 2).reshape(self.k, -1), weights.permute(1, 0, 2).reshape(self.k, -1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            slot, column = torch.where(idx == e)
            if column.numel():
                out[:, column] += expert(flat[:, column].unsqueeze(0)).squeeze(0) * weights[slot, column]
        return out.view(x.shape[-1], x.shape[0], x.shape[1]).permute(1, 2, 0)


@dataclass(frozen=True)
class Pattern:
    """A way of writing an MoE block: how to make one, inputs for it, and the rule it must match.

    ``rule`` None: no rule may match, and ``fails`` is the error kind that gives
    (``errors.KINDS``), or ``NOT_AN_MOE``. ``inputs`` makes the example inputs
    where they are more than one hidden-states tensor of ``shape``;
    ``detected_on_example``: detection needs them (made-up inputs do not show
    the block's kind, as a per-sample expert choice given as an input).
    """

    name: str
    rule: str | None
    make: Callable[[], nn.Module]
    shape: tuple[int, ...] = (2, 5, 16)
    fails: str | None = None
    inputs: Callable[[torch.Generator], tuple] | None = None
    detected_on_example: bool = False

    def example(self, seed: int = 0) -> tuple:
        """The block's positional inputs."""
        generator = torch.Generator().manual_seed(seed)
        return self.inputs(generator) if self.inputs else (torch.randn(*self.shape, generator=generator),)


# The rule each toy kind matches: packed experts called as transformers v5 calls them, unless said otherwise.
_TOY_RULES = {kind: "experts" for kind in KINDS} | {
    "modulelist_loop": "block", "scores_on_inputs": "block-dense", "masked_loop": "recorded-block",
    "sorted_banks": "sorted", "gathered": "gathered", "sliced_loop": "gathered", "attention_heads": "sorted",
}


def _toy(kind: str) -> Pattern:
    config = ToyMoEConfig(kind=kind)
    return Pattern(kind, _TOY_RULES[kind], lambda: make_toy_block(config), (2, 5, config.hidden_size))


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def seeded() -> nn.Module:
        torch.manual_seed(0)
        return make().eval()
    return seeded


def _failing(name: str, fails: str, make: Callable[[], nn.Module], shape: tuple[int, ...] = (2, 5, 16),
             **more) -> Pattern:
    return Pattern(name, None, _seeded(make), shape, fails, **more)


PATTERNS: dict[str, Pattern] = {p.name: p for p in [
    *(_toy(kind) for kind in KINDS),
    Pattern("soft_mixture", "gated", _seeded(SoftMixture)),
    Pattern("capacity_mask", "mask-dispatch", _seeded(lambda: CapacityMoE(k=2, capacity_factor=1.25))),
    Pattern("dispatching_dict", "container", _seeded(DictLoopMoE)),
    Pattern("in_out_linear_class", "recorded-block", _seeded(InOutLinearMoE)),
    Pattern("per_sample_choice", "gated", _seeded(PerSampleMoE), detected_on_example=True,
            inputs=lambda g: (torch.randn(2, 5, 8, generator=g), torch.tensor([2, 0]))),
    Pattern("weightless_choices", "experts", _seeded(WeightlessChoicesMoE), (40, 8)),
    Pattern("item_assignment", "recorded-block", _seeded(ItemAssignmentMoE), (3, 5, 16)),
    Pattern("masked_dict", "recorded-block", _seeded(MaskedDictMoE), (3, 5, 16)),
    Pattern("expert_choice", "recorded-block", _seeded(ExpertChoiceMoE), (1, 14, 16)),
    Pattern("host_sliced", "recorded-block", _seeded(HostSlicedMoE), (1, 14, 16)),
    Pattern("token_by_token", "recorded-block", _seeded(TokenByTokenMoE), (1, 9, 16)),
    Pattern("sort_then_first_k", "recorded-block", _seeded(SortedChoiceMoE), (1, 9, 16)),
    Pattern("kthvalue_threshold", "recorded-block", _seeded(ThresholdChoiceMoE), (1, 9, 16)),
    *(Pattern(f"top_p_{spelling}", "block", _seeded(lambda spelling=spelling: TopPChoiceMoE(spelling=spelling)),
              (1, 9, 16)) for spelling in ("kept", "removed")),
    Pattern("grouped_gemm", "sorted", _seeded(GroupedGemmMoE), (2, 9, 8)),
    Pattern("mixture_of_heads", "sorted", _seeded(lambda: MixtureOfHeadsAttention(experts=5, k=2)), (7, 8)),
    Pattern("gathered_ffn", "gathered", _seeded(GatheredMoE)),
    Pattern("own_weights", "gathered", _seeded(OwnWeightsMoE), (9, 8)),
    Pattern("neuron_tables", "gathered", _seeded(NeuronExperts), (2, 6, 8)),
    *(Pattern(f"own_weights_loop_{style}", "gathered", _seeded(lambda style=style: LoopOverOwnWeights(style)),
              (2, 7, 16)) for style in ("linear", "transposed", "matmul")),
    _failing("no_rule_matches", errors.UNSUPPORTED_DISPATCH, NoRuleMatches, (2, 5, 4)),
    _failing("unrouted_slice", errors.TRACE_FAILED, UnroutedSlice, (2, 5, 4)),
    _failing("chained_layers", errors.NO_MOE_BLOCK, lambda: ChainedLayers(nn.Linear(4, 4) for _ in range(3)),
             (2, 5, 4)),
    _failing("summed_heads", errors.NO_MOE_BLOCK, lambda: SummedHeads([nn.Linear(8, 8) for _ in range(3)]),
             (2, 5, 8)),
    _failing("table_routing", errors.NO_MOE_BLOCK, TableRoutingMoE, (2, 3, 8)),
    _failing("banks_below_router", errors.NO_MOE_BLOCK, BanksBelowRouterMoE, (9, 8)),
    _failing("position_tables", NOT_AN_MOE, TwoPositionTables,
             inputs=lambda g: (torch.randint(0, 16, (1, 5, 2), generator=g),)),
    _failing("masked_encoder", NOT_AN_MOE, MaskedEncoder,
             inputs=lambda g: (torch.randn(2, 5, 8, generator=g), torch.ones(2, 5))),
    Pattern("scored_inputs", "last-resort", _seeded(ScoredInputsMoE)),
    Pattern("two_level_gate", "last-resort", _seeded(TwoLevelMoE)),
    Pattern("tuple_index_gather", "gathered", _seeded(TupleIndexMoE)),
    Pattern("expert_id_projections", "gathered", _seeded(ExpertIdMoE)),
    Pattern("decode_gather", "gathered", _seeded(DecodeGatherMoE)),
    Pattern("grouped_side_by_side", "gathered", _seeded(GroupedWeightsMoE)),
    Pattern("whole_contraction", "gathered", _seeded(WholeContractionMoE)),
    Pattern("modality_mask", "recorded-block", _seeded(MaskedModalityMoE), detected_on_example=True,
            inputs=lambda g: (torch.randn(2, 5, 16, generator=g), _image_mask(g))),
    Pattern("prefix_split", "recorded-block", _seeded(PrefixSplitMoE), (2, 7, 16)),
    Pattern("switch_capacity_bmm", "gathered", _seeded(SwitchCapacityMoE), (2, 9, 16)),
    Pattern("bias_first_baddbmm", "gathered", _seeded(BiasFirstMoE)),
    Pattern("cast_grouped_mm", "gathered", _seeded(CastGroupedMoE)),
    Pattern("cast_gathered", "gathered", _seeded(lambda: CastGroupedMoE("to_dtype", gather=True))),
    Pattern("parameter_list_experts", "gathered", _seeded(ParameterListMoE)),
    _failing("functional_ensemble", errors.UNSUPPORTED_DISPATCH, FunctionalEnsembleMoE),
    Pattern("padded_capacity_bmm", "gathered", _seeded(PaddedCapacityMoE)),
    _failing("soft_slots", NOT_AN_MOE, SoftSlotsMoE),
    _failing("direct_forward_calls", errors.UNSUPPORTED_DISPATCH, DirectForwardMoE),
    _failing("multinomial_routing", errors.UNSUPPORTED_DISPATCH, SampledRoutingMoE),
    _failing("noise_at_inference", errors.UNSUPPORTED_DISPATCH, lambda: SampledRoutingMoE(noisy=True)),
    _failing("channels_first_conv", errors.UNSUPPORTED_DISPATCH, ChannelsFirstMoE),
]}


@contextmanager
def registered_pass_through(block_class: str) -> Iterator[type[MoECalibrationModule]]:
    """Within, a module that only calls the original is registered for ``block_class`` (the override rule's pattern)."""

    @MoECalibrationModule.register(block_class)
    class Override(MoECalibrationModule):
        def __init__(self, original, config, calibrate_all_experts=True):
            super().__init__()
            self.original = original

        def forward(self, *args, **kwargs):
            return self.original(*args, **kwargs)

    try:
        yield Override
    finally:
        MoECalibrationModule.unregister(block_class)
