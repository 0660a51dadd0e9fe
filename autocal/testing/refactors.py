"""MoE blocks as a future transformers release might write them (the next step of refactors seen from 5.17 to 5.25).

Each block is a mutated copy, written here, of a transformers v5 sparse MoE block (a router module, a packed
experts module called with the routing, shared experts): one kind of change that transformers made to its MoE
code between 5.17 and 5.25 (router outputs reordered, routers split from blocks, experts rewritten for the
decorator, sentinel ids, identity experts moved into the block...), taken one step further. Experts that keep
transformers' runtime contract are decorated with its ``use_experts_implementation`` when it is installed, so that
every block runs with each experts implementation (``eager``, ``batched_mm``, ``grouped_mm``) its layout allows.

Public API: :data:`VARIANTS` (name -> :class:`Variant`), :func:`implementations`.

Example:
    >>> block = VARIANTS["router_reordered"].make("eager")
    >>> block(torch.randn(1, 3, HIDDEN)).shape
    torch.Size([1, 3, 16])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HIDDEN", "ExpertsNormaliseBlock", "GatheredRouteBlock", "MaskedDenseBlock", "MaskedInputsBlock",
           "MoEOutput", "PaddedLoopBlock", "RouteRowsBlock", "RouterOutput", "RouterReorderedBlock", "RoutingMapBlock",
           "SortedRouteRowsBlock", "TransposedCastBlock", "Variant", "VARIANTS", "implementations"]

HIDDEN, INTER, EXPERTS, TOP_K = 16, 12, 6, 2
ALL_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")

try:  # transformers' experts decorator; without it every block runs its eager loop
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation
except ImportError:  # pragma: no cover - transformers is a test dependency
    ALL_EXPERTS_FUNCTIONS, use_experts_implementation = None, None


class TinyConfig:
    """The few config fields the blocks read; ``_experts_implementation`` as transformers' configs hold it."""

    def __init__(self, implementation: str = "eager", attribute: str = "_experts_implementation"):
        self.hidden_size, self.moe_intermediate_size = HIDDEN, INTER
        self.num_experts, self.num_experts_per_tok = EXPERTS, TOP_K
        setattr(self, attribute, implementation)


def _decorated(cls: type, **flags) -> type:
    return use_experts_implementation(**flags)(cls) if use_experts_implementation is not None else cls


# ---------------------------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------------------------


class _PackedExperts(nn.Module):
    """Packed SwiGLU experts, ``gate_up_proj [E, 2I, H]`` (``[E, H, 2I]`` transposed), an eager where loop that
    skips the sentinel expert ``E``, as transformers 5.23 writes them."""

    transposed = False

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        shapes = ((2 * INTER, HIDDEN), (HIDDEN, INTER))
        if self.transposed:
            shapes = tuple(s[::-1] for s in shapes)
        self.gate_up_proj = nn.Parameter(torch.empty(EXPERTS, *shapes[0]))
        self.down_proj = nn.Parameter(torch.empty(EXPERTS, *shapes[1]))
        self.act_fn = nn.SiLU()

    def _weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.transpose(0, 1) if self.transposed else weight

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit:
            expert = expert[0]
            if expert == self.num_experts:
                continue
            slot, token = torch.where(mask[expert])
            gate, up = F.linear(hidden_states[token], self._weight(self.gate_up_proj[expert])).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self._weight(self.down_proj[expert]))
            final.index_add_(0, token, out * top_k_weights[token, slot, None])
        return final


PackedExperts = _decorated(type("PackedExperts", (_PackedExperts,), {}))
TransposedExperts = _decorated(type("TransposedExperts", (_PackedExperts,), {"transposed": True}),
                               is_transposed=True)


class NormalisingExperts(PackedExperts):
    """The weights' renormalisation moved from the router into the experts, before the implementation runs."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return super().forward(hidden_states, top_k_index, top_k_weights / top_k_weights.sum(-1, keepdim=True))


def _backend(cls: type) -> type:
    """The experts implementation chosen through a renamed config attribute (``moe_backend``), dispatched through
    transformers' interface table: a decorator that tracing does not know how to pin."""
    eager = cls.forward

    def forward(self, *args):
        return ALL_EXPERTS_FUNCTIONS.get_interface(self.config.moe_backend, eager)(self, *args)

    def __init__(self, config):
        _PackedExperts.__init__(self, config)
        self.has_gate, self.has_bias, self.is_transposed, self.is_concatenated = True, False, False, True
        self.has_post_expert_norm, self._is_expert_parallel = False, False

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    return type("BackendExperts", (cls,), {"forward": forward, "__init__": __init__, "_apply_gate": _apply_gate})


BackendExperts = _backend(_PackedExperts) if ALL_EXPERTS_FUNCTIONS is not None else PackedExperts


class KeywordExperts(PackedExperts):
    """Experts with an optional argument after the routing (a per-call flag a release might add)."""

    def forward(self, hidden_states, top_k_index, top_k_weights, expert_parallel_mask=None):
        if expert_parallel_mask is not None:
            top_k_weights = top_k_weights * expert_parallel_mask
        return super().forward(hidden_states, top_k_index, top_k_weights)


class UnflattenedExperts(PackedExperts):
    """Experts taking ``[batch, seq, ...]`` hidden states and routing, flattening them themselves."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        k, dim = top_k_index.shape[-1], hidden_states.shape[-1]
        out = super().forward(hidden_states.reshape(-1, dim), top_k_index.reshape(-1, k), top_k_weights.reshape(-1, k))
        return out.view_as(hidden_states)


class Int32Experts(_PackedExperts):
    """Compile-friendly experts given int32 expert ids (as grouped kernels take them), rows found by ``==``."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, slot = torch.nonzero(top_k_index == expert, as_tuple=True)
            gate, up = F.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            final.index_add_(0, token, out * top_k_weights[token, slot, None])
        return final


class RoutingObjectExperts(_PackedExperts):
    """Experts reading the routing from the router's output object (``routing.top_k_index``...)."""

    def forward(self, hidden_states, routing):
        return super().forward(hidden_states, routing.top_k_index, routing.top_k_weights)


class RoutingMapExperts(nn.Module):
    """Experts given a dense ``[tokens, experts]`` routing map (zero where not routed) instead of indices."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(EXPERTS, 2 * INTER, HIDDEN))
        self.down_proj = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, routing_map):
        final = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token = routing_map[:, expert].nonzero().squeeze(-1)
            gate, up = F.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            final.index_add_(0, token, out * routing_map[token, expert, None])
        return final


class SeparateProjExperts(nn.Module):
    """Gate and up kept as two packed tensors ``[E, I, H]`` instead of one concatenated ``gate_up_proj``."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate_proj = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))
        self.up_proj = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))
        self.down_proj = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        for expert in mask.sum(dim=(-1, -2)).nonzero().squeeze(-1).tolist():
            slot, token = torch.where(mask[expert])
            x = hidden_states[token]
            h = self.act_fn(F.linear(x, self.gate_proj[expert])) * F.linear(x, self.up_proj[expert])
            final.index_add_(0, token, F.linear(h, self.down_proj[expert]) * top_k_weights[token, slot, None])
        return final


class GatheredRouteExperts(_PackedExperts):
    """Compile-friendly experts: no data-dependent Python branch; each route gathers its expert's weights, bmm,
    and the routes are scattered back (``index_add``); sentinel expert ids clamped in range (their weights are 0)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        k = top_k_index.shape[-1]
        experts = top_k_index.reshape(-1).clamp(0, self.num_experts - 1)
        token = torch.arange(experts.numel(), device=experts.device) // k
        h = torch.bmm(self.gate_up_proj[experts], hidden_states[token].unsqueeze(-1)).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        out = torch.bmm(self.down_proj[experts], (self.act_fn(gate) * up).unsqueeze(-1)).squeeze(-1)
        out = out * top_k_weights.reshape(-1, 1)
        return torch.zeros_like(hidden_states).index_add(0, token, out)


class MaskedDenseExperts(_PackedExperts):
    """Compile-friendly experts: a static loop over every expert, each run on every token, weighted by a mask of
    the routing (zero where not routed)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            weight = (top_k_weights * (top_k_index == expert)).sum(-1, keepdim=True)
            gate, up = F.linear(hidden_states, self.gate_up_proj[expert]).chunk(2, dim=-1)
            final = final + F.linear(self.act_fn(gate) * up, self.down_proj[expert]) * weight
        return final


class MaskedInputsExperts(_PackedExperts):
    """Compile-friendly experts: every expert's batch holds every token, the rows not routed to it zeroed, one bmm
    per projection over ``[E, T, H]``, outputs combined by a dense weight map."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        routed = F.one_hot(top_k_index, self.num_experts).to(hidden_states.dtype)  # [T, k, E]
        dense_weights = (routed * top_k_weights.unsqueeze(-1)).sum(1).transpose(0, 1)  # [E, T]
        inputs = hidden_states.unsqueeze(0) * routed.sum(1).transpose(0, 1).unsqueeze(-1)  # [E, T, H]
        gate, up = torch.bmm(inputs, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2))  # [E, T, H]
        return (out * dense_weights.unsqueeze(-1)).sum(0)


ALIGN = 4  # rows per expert padded to a multiple of this (training frameworks pad to 8 or 16 for their kernels)


class PaddedLoopExperts(_PackedExperts):
    """Routes sorted by expert into a buffer whose expert segments are padded with zero rows to a multiple of
    ``ALIGN``, one plain matmul per segment in a loop (no ``F.grouped_mm``), the padding dropped after."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        k, flat = top_k_index.shape[-1], top_k_index.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        padded = (counts + ALIGN - 1) // ALIGN * ALIGN
        ends, firsts = padded.cumsum(0), counts.cumsum(0) - counts
        rank = torch.arange(order.numel(), device=order.device) - firsts.repeat_interleave(counts)
        position = (ends - padded).repeat_interleave(counts) + rank
        buffer = hidden_states.new_zeros(int(ends[-1]), hidden_states.shape[-1])
        buffer[position] = hidden_states[order // k]
        outputs = hidden_states.new_zeros(buffer.shape[0], hidden_states.shape[-1])
        for expert, (start, end) in enumerate(zip((ends - padded).tolist(), ends.tolist())):
            gate, up = F.linear(buffer[start:end], self.gate_up_proj[expert]).chunk(2, dim=-1)
            outputs[start:end] = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
        routes = outputs[position] * top_k_weights.reshape(-1)[order, None]
        return torch.zeros_like(hidden_states).index_add(0, order // k, routes)


class TransposedCastExperts(_PackedExperts):
    """Experts computing in float32 whatever the model's dtype: the weights transposed once to ``[E, H, 2I]``, that
    view cast (``.float()``, a copy in a bfloat16 model), then ``x @ w[e]`` in a loop over the experts."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        gate_up = self.gate_up_proj.transpose(1, 2).float()
        down = self.down_proj.transpose(1, 2).float()
        x, final = hidden_states.float(), hidden_states.new_zeros(hidden_states.shape, dtype=torch.float32)
        for expert in range(self.num_experts):
            token, slot = torch.nonzero(top_k_index == expert, as_tuple=True)
            gate, up = (x[token] @ gate_up[expert]).chunk(2, dim=-1)
            out = (self.act_fn(gate) * up) @ down[expert]
            final.index_add_(0, token, out * top_k_weights[token, slot, None].float())
        return final.to(hidden_states.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Routers and blocks
# ---------------------------------------------------------------------------------------------------------------


class TopKRouter(nn.Module):
    """transformers' router module: a raw ``weight [E, H]``, float32 logits, softmax, top-k, renormalised."""

    def __init__(self, config: TinyConfig, normalise: bool = True):
        super().__init__()
        self.top_k, self.normalise = config.num_experts_per_tok, normalise
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, hidden_states):
        logits = F.linear(hidden_states.reshape(-1, self.weight.shape[1]).float(), self.weight.float())
        weights, indices = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(hidden_states.dtype), indices


class SharedExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    """A sparse MoE block: ``gate`` router, ``experts`` and a shared expert; the variants override ``route``."""

    experts_class: type = PackedExperts

    def __init__(self, implementation: str = "eager", normalise: bool = True):
        super().__init__()
        self.config = TinyConfig(implementation)
        self.gate = TopKRouter(self.config, normalise)
        self.experts = self.experts_class(self.config)
        self.shared_expert = SharedExpert()

    def route(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _, weights, indices = self.gate(hidden_states)
        return self.experts(hidden_states, indices, weights)

    def forward(self, hidden_states: torch.Tensor):
        batch, seq, dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, dim)
        out = self.route(hidden_states) + self.shared_expert(hidden_states)
        return out.reshape(batch, seq, dim)


class ReorderedRouter(TopKRouter):
    """A router returning ``(indices, weights, logits)``: the order of its outputs changed."""

    def forward(self, hidden_states):
        logits, weights, indices = super().forward(hidden_states)
        return indices, weights, logits


class RouterReorderedBlock(_Block):
    def __init__(self, implementation: str = "eager"):
        super().__init__(implementation)
        self.gate = ReorderedRouter(self.config)

    def route(self, hidden_states):
        indices, weights, _ = self.gate(hidden_states)
        return self.experts(hidden_states, indices, weights)


class ExpertsNormaliseBlock(_Block):
    experts_class = NormalisingExperts

    def __init__(self, implementation: str = "eager"):
        super().__init__(implementation, normalise=False)


class RoutingMapBlock(_Block):
    experts_class = RoutingMapExperts

    def route(self, hidden_states):
        _, weights, indices = self.gate(hidden_states)
        routing_map = torch.zeros(hidden_states.shape[0], EXPERTS, dtype=weights.dtype, device=weights.device)
        return self.experts(hidden_states, routing_map.scatter(1, indices, weights))


class SeparateProjBlock(_Block):
    experts_class = SeparateProjExperts


class BackendBlock(_Block):
    experts_class = BackendExperts

    def __init__(self, implementation: str = "eager"):
        super().__init__()
        del self.config._experts_implementation
        self.config.moe_backend = implementation


class TransposedBlock(_Block):
    experts_class = TransposedExperts


class GatheredRouteBlock(_Block):
    experts_class = GatheredRouteExperts


class MaskedDenseBlock(_Block):
    experts_class = MaskedDenseExperts


class MaskedInputsBlock(_Block):
    experts_class = MaskedInputsExperts


class PaddedLoopBlock(_Block):
    experts_class = PaddedLoopExperts


class TransposedCastBlock(_Block):
    experts_class = TransposedCastExperts


class ScoreBeforeExpertsBlock(_Block):
    """Top-1 routing whose sigmoid score scales the token before the experts, which apply unit weights."""

    def route(self, hidden_states):
        logits = F.linear(hidden_states, self.gate.weight)
        score, index = logits.max(dim=-1, keepdim=True)
        routed = hidden_states * torch.sigmoid(score)
        return self.experts(routed, index, torch.ones_like(score))


class RouteRowsBlock(_Block):
    """Each route's copy of its token scaled by the routing weight before the experts, the experts' outputs summed
    with unit weights (one route per row)."""

    def route(self, hidden_states):
        _, weights, indices = self.gate(hidden_states)
        k = indices.shape[-1]
        routed = hidden_states.repeat_interleave(k, dim=0) * weights.reshape(-1, 1)
        flat = indices.reshape(-1, 1)
        out = self.experts(routed, flat, torch.ones_like(flat, dtype=routed.dtype))
        return out.view(-1, k, hidden_states.shape[-1]).sum(1)


class SortedRouteRowsBlock(_Block):
    """Each route a row of its own, the routes sorted by expert and their tokens' rows gathered by
    ``index_select``; the experts weight their outputs, which are put back in route order and summed per token."""

    def route(self, hidden_states):
        _, weights, indices = self.gate(hidden_states)
        k, flat = indices.shape[-1], indices.reshape(-1)
        order = flat.argsort(stable=True)
        rows = hidden_states.index_select(0, order // k)
        out = self.experts(rows, flat[order, None], weights.reshape(-1)[order, None])
        return torch.zeros_like(out).index_copy(0, order, out).view(-1, k, out.shape[-1]).sum(1)


class MoEOutput(NamedTuple):
    hidden_states: torch.Tensor
    router_logits: torch.Tensor


class NamedOutputBlock(_Block):
    """Returns a ``NamedTuple(hidden_states, router_logits)`` instead of a tensor."""

    def forward(self, hidden_states):
        batch, seq, dim = hidden_states.shape
        flat = hidden_states.view(-1, dim)
        logits, weights, indices = self.gate(flat)
        out = self.experts(flat, indices, weights) + self.shared_expert(flat)
        return MoEOutput(out.reshape(batch, seq, dim), logits)


class LogitsRouterBlock(_Block):
    """The router reduced to a Linear returning logits; the block takes softmax, an unsorted top-k and the
    renormalisation itself."""

    def __init__(self, implementation: str = "eager"):
        super().__init__(implementation)
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)

    def route(self, hidden_states):
        probs = torch.softmax(self.gate(hidden_states).float(), dim=-1)
        weights, indices = probs.topk(TOP_K, dim=-1, sorted=False)
        weights = (weights / weights.sum(-1, keepdim=True)).to(hidden_states.dtype)
        return self.experts(hidden_states, indices, weights)


@dataclass
class RouterOutput:
    """A router's outputs as one object, as transformers' model outputs are."""

    router_logits: torch.Tensor
    top_k_weights: torch.Tensor
    top_k_index: torch.Tensor


class ObjectRouter(TopKRouter):
    def forward(self, hidden_states):
        return RouterOutput(*super().forward(hidden_states))


class RouterObjectBlock(_Block):
    """The router returns a dataclass; the block reads its fields by name."""

    def __init__(self, implementation: str = "eager"):
        super().__init__(implementation)
        self.gate = ObjectRouter(self.config)

    def route(self, hidden_states):
        routing = self.gate(hidden_states)
        return self.experts(hidden_states, routing.top_k_index, routing.top_k_weights)


class KeywordExpertsBlock(_Block):
    """The experts called by keyword, with an optional argument beyond the routing (left at its default)."""

    experts_class = KeywordExperts

    def route(self, hidden_states):
        _, weights, indices = self.gate(hidden_states)
        return self.experts(top_k_weights=weights, top_k_index=indices, hidden_states=hidden_states)


class RoutingObjectExpertsBlock(_Block):
    """The experts given the router's output object whole."""

    experts_class = RoutingObjectExperts

    def __init__(self, implementation: str = "eager"):
        super().__init__(implementation)
        self.gate = ObjectRouter(self.config)

    def route(self, hidden_states):
        return self.experts(hidden_states, self.gate(hidden_states))


class UnflattenedBlock(_Block):
    """Neither the hidden states nor the routing flattened in the block: ``[batch, seq, k]`` indices."""

    experts_class = UnflattenedExperts

    def forward(self, hidden_states):
        _, weights, indices = self.gate(hidden_states)
        shape = (*hidden_states.shape[:-1], -1)
        out = self.experts(hidden_states, indices.view(shape), weights.view(shape))
        return out + self.shared_expert(hidden_states)


class Int32IndicesBlock(_Block):
    experts_class = Int32Experts

    def route(self, hidden_states):
        _, weights, indices = self.gate(hidden_states)
        return self.experts(hidden_states, indices.to(torch.int32), weights)


ZERO_EXPERTS = 2


class ZeroExpertsBlock(_Block):
    """Identity (zero-computation) experts beside the packed ones, handled in the block: their routes get a real
    expert's index with weight zero, and the token itself times their summed weight is added."""

    def __init__(self, implementation: str = "eager"):
        super().__init__(implementation)
        self.gate.weight = nn.Parameter(torch.empty(EXPERTS + ZERO_EXPERTS, HIDDEN))

    def route(self, hidden_states):
        _, weights, indices = self.gate(hidden_states)
        identity = indices >= EXPERTS
        identity_weights = weights.masked_fill(~identity, 0.0).sum(dim=-1, keepdim=True)
        indices = torch.where(identity, (indices - EXPERTS) * EXPERTS // ZERO_EXPERTS, indices)
        out = self.experts(hidden_states, indices, weights.masked_fill(identity, 0.0))
        return out + hidden_states * identity_weights


class SentinelBlock(_Block):
    """Routes below a weight threshold dropped by the sentinel index ``E`` (which the experts skip)."""

    def route(self, hidden_states):
        _, weights, indices = self.gate(hidden_states)
        dropped = weights < 0.3
        return self.experts(hidden_states, indices.masked_fill(dropped, EXPERTS), weights.masked_fill(dropped, 0.0))


# ---------------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One block: its name, the kind of change it takes a step further, how to build it for an experts
    implementation, the implementations it runs with, and k (routes per token, identity experts included)."""

    name: str
    change: str
    make: Callable[[str], nn.Module]
    runs_with: tuple[str, ...] = ALL_IMPLEMENTATIONS
    top_k: int = TOP_K
    num_experts: int = EXPERTS


def implementations(variant: Variant) -> tuple[str, ...]:
    """The experts implementations ``variant`` runs with here (eager only without transformers)."""
    return variant.runs_with if use_experts_implementation is not None else ("eager",)


_EAGER = ("eager",)

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("router_reordered", "the router's outputs in another order", RouterReorderedBlock),
    Variant("experts_normalise", "weights renormalised in the experts instead of the router", ExpertsNormaliseBlock),
    Variant("routing_map", "experts given a dense routing map instead of indices", RoutingMapBlock, _EAGER),
    Variant("separate_gate_up", "gate and up kept as separate packed tensors", SeparateProjBlock, _EAGER),
    Variant("renamed_backend", "the experts implementation chosen through a new attribute name", BackendBlock),
    Variant("transposed", "grouped_mm / batched_mm over transposed [E, H, 2I] weights", TransposedBlock),
    Variant("gathered_routes", "compile-friendly experts: per-route weight gather, bmm, index_add",
            GatheredRouteBlock, _EAGER),
    Variant("masked_dense", "compile-friendly experts: static loop, every expert on every token, masked weights",
            MaskedDenseBlock, _EAGER),
    Variant("masked_inputs", "compile-friendly experts: every expert's batch holds every token, unrouted rows "
            "zeroed, bmm over [E, T, H]", MaskedInputsBlock, _EAGER),
    Variant("padded_loop", "rows sorted by expert, each segment padded with zero rows, a matmul loop over the "
            "segments", PaddedLoopBlock, _EAGER),
    Variant("transposed_cast", "weights transposed, then cast to float32 (the experts' compute dtype), before the loop",
            TransposedCastBlock, _EAGER),
    Variant("score_before_experts", "a top-1 sigmoid score applied to the experts' input, unit weights after",
            ScoreBeforeExpertsBlock, top_k=1),
    Variant("route_rows", "the routing weight applied to each route's copy of its token, one route per row",
            RouteRowsBlock),
    Variant("sorted_route_rows", "each route a row of its own, routes sorted by expert, rows gathered by "
            "index_select", SortedRouteRowsBlock),
    Variant("named_output", "the block returns a NamedTuple (hidden_states, router_logits)", NamedOutputBlock),
    Variant("logits_router", "a Linear router; softmax and an unsorted top-k in the block", LogitsRouterBlock),
    Variant("zero_experts_in_block", "identity experts handled in the block by index remapping",
            ZeroExpertsBlock, num_experts=EXPERTS + ZERO_EXPERTS),
    Variant("router_object", "the router returns a dataclass read by field", RouterObjectBlock),
    Variant("keyword_experts", "experts called by keyword, with an optional extra argument", KeywordExpertsBlock),
    Variant("routing_object_experts", "experts given the router's output object whole", RoutingObjectExpertsBlock,
            _EAGER),
    Variant("unflattened", "hidden states and routing passed [batch, seq, ...] to the experts", UnflattenedBlock),
    Variant("int32_indices", "int32 expert ids, rows found by ==", Int32IndicesBlock, _EAGER),
    Variant("sentinel_routes", "routes dropped through the sentinel expert index E", SentinelBlock, _EAGER),
)}
