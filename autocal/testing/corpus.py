"""MoE blocks written the way public code outside transformers writes them (issue 19, item h).

Each block imitates a *style* seen in public code: reference inference code of
open-weight MoE models, training frameworks, research libraries, remote code of
hub models. None is copied from anywhere; each is written here, small, with torch
only, to exercise the code patterns issue 19 lists (1-8):

1. experts from a custom Linear class, with an extra parameter, or nested deeper;
2. packed weights on the block, gathered by tuple indexing and contracted by einsum;
3. token rows sorted by expert, experts called with (rows, counts);
4. every expert on every token, the input scaled by a detached routing score;
5. capacity-based einsum dispatch with ``b, n, d, e = *x.shape, ...``; two-level gating;
6. a separate single-token (decode) branch;
7. per-expert post-processing after the down projection;
8. identity/zero experts, tuple-returning experts, modality expert sets,
   expert-id linears, Megatron's ``[seq, batch, hidden]`` grouped MLP, sparsemixer routing.

Every block is a correct top-k MoE: experts see only the tokens routed to them,
and the output is the routing-weighted sum of the chosen experts' outputs
(``tests/test_corpus.py`` checks each against a dense reference written there).

Public API: :data:`ENTRIES` (by name), :class:`CorpusEntry`, and the checks autocal is measured by (used by
``tests/test_corpus.py`` and ``scripts/corpus_report.py``): :func:`check_synthesize`, :func:`check_convert`,
:func:`check_mixed`, :func:`check_explain_k`, each raising :class:`Silent` or :class:`Mismatch` when autocal returns
a wrong or missing result, and :func:`outcome`, which names what a check did.

Example:
    >>> entry = ENTRIES["mixtral_reference"]
    >>> block = entry.build(seed=0)
    >>> args, kwargs = entry.inputs(batch=1, seq=3, seed=1)
    >>> block(*args, **kwargs).shape
    torch.Size([1, 3, 16])
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import errors
from ..api import convert, synthesize
from ..explain import explain
from ..registry import MoECalibrationModule
from ..trace.forcing import fresh_inputs
from ..verify import compare_outputs
from .assertions import count_rows, expert_linears
from . import refactors
from .toy_moe import ToyMoEConfig, make_toy_block

__all__ = [
    "CHECKS",
    "CorpusEntry",
    "ENTRIES",
    "HIDDEN",
    "Mismatch",
    "Silent",
    "check_convert",
    "check_explain_k",
    "check_mixed",
    "check_synthesize",
    "equivalent",
    "outcome",
    "synthesize_example",
]

HIDDEN = 16  # hidden size of every block
INTER = 12  # intermediate size of one expert
EXPERTS = 6
TOP_K = 2
_SCALE_NAMES = ("norm", "multiplier")  # 1-D parameters initialised around 1, not around 0


def init_normal(module: nn.Module, seed: int) -> nn.Module:
    """Normal weights (std 0.3), biases and buffers around 0 (std 0.1), norms and multipliers around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.ndim >= 2:
                tensor.copy_(noise * 0.3)
            elif any(word in name.rsplit(".", 1)[-1] for word in _SCALE_NAMES):
                tensor.copy_(1 + 0.1 * noise)
            else:
                tensor.copy_(0.1 * noise)
    return module.eval()


# ---------------------------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------------------------


class ShardLinear(nn.Module):
    """A Linear as tensor-parallel inference code writes it: a module holding ``weight``, calling ``F.linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class ShardMLP(nn.Module):
    """SwiGLU expert of ``ShardLinear`` s (w1 gate, w3 up, w2 down)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = ShardLinear(dim, inter)
        self.w2 = ShardLinear(inter, dim)
        self.w3 = ShardLinear(dim, inter)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SwiGLUExpert(nn.Module):
    """SwiGLU expert of ``nn.Linear`` s, no biases."""

    def __init__(self, dim: int = HIDDEN, inter: int = INTER):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluExpert(nn.Module):
    """Two-layer GELU expert with biases."""

    def __init__(self, dim: int = HIDDEN, inter: int = INTER):
        super().__init__()
        self.fc1 = nn.Linear(dim, inter)
        self.fc2 = nn.Linear(inter, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class MultipliedExpert(nn.Module):
    """An expert with a learned multiplier on its gate projection beside its Linears."""

    def __init__(self, dim: int = HIDDEN, inter: int = INTER):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)
        self.gate_multiplier = nn.Parameter(torch.empty(inter))

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x) * self.gate_multiplier) * self.up_proj(x))


class TupleExpert(nn.Module):
    """An expert returning ``(output, pre-activation)``; the block keeps only the output."""

    def __init__(self, dim: int = HIDDEN, inter: int = INTER):
        super().__init__()
        self.up = nn.Linear(dim, inter, bias=False)
        self.down = nn.Linear(inter, dim, bias=False)

    def forward(self, x):
        pre = self.up(x)
        return self.down(F.gelu(pre)), pre


class ZeroExpert(nn.Module):
    """A zero-computation expert: contributes nothing."""

    def forward(self, x):
        return torch.zeros_like(x)


class ParamExpert(nn.Module):
    """An expert of raw ``nn.Parameter`` matmuls (``x @ W``), gate and up packed side by side."""

    def __init__(self, dim: int = HIDDEN, inter: int = INTER):
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(dim, 2 * inter))
        self.w_out = nn.Parameter(torch.empty(inter, dim))

    def forward(self, x):
        gate, up = (x @ self.w_in).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_out


class ConvExpert(nn.Module):
    """An expert of kernel-1 ``Conv1d`` s over ``[rows, hidden, 1]``."""

    def __init__(self, dim: int = HIDDEN, inter: int = INTER):
        super().__init__()
        self.fc1 = nn.Conv1d(dim, inter, kernel_size=1)
        self.fc2 = nn.Conv1d(inter, dim, kernel_size=1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x.unsqueeze(-1)))).squeeze(-1)


class ExpertIdLinear(nn.Module):
    """One projection of every expert: ``weight [E, out, in]``, called with the expert's id."""

    def __init__(self, experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(experts, out_features))

    def forward(self, x, expert_id: int):
        return F.linear(x, self.weight[expert_id], self.bias[expert_id])


def _swiglu_clamped(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Interleaved gate/up (even columns gate, odd up), both clamped, ``(up + 1)``."""
    gate, up = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def _loop_experts(t, weights, indices, experts) -> torch.Tensor:
    """Mixtral-reference dispatch: for each expert, its (token, slot) pairs by ``torch.where``."""
    out = torch.zeros_like(t)
    for i, expert in enumerate(experts):
        token, slot = torch.where(indices == i)
        out[token] += weights[token, slot, None] * expert(t[token])
    return out


def _softmax_topk(logits, k, renormalize=True):
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    weights, indices = probs.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), indices


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------


class SigmoidGate(nn.Module):
    """Reference-code gate: sigmoid scores, a selection bias, the unbiased scores renormalised and scaled."""

    def __init__(self, dim: int, experts: int, k: int, route_scale: float = 1.5):
        super().__init__()
        self.topk, self.route_scale = k, route_scale
        self.weight = nn.Parameter(torch.empty(experts, dim))
        self.bias = nn.Parameter(torch.empty(experts))

    def forward(self, x):
        scores = F.linear(x, self.weight).sigmoid()
        indices = torch.topk(scores + self.bias, self.topk, dim=-1)[1]
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.route_scale
        return weights.type_as(x), indices


class ReferenceMoE(nn.Module):
    """Reference inference code of an open-weight MoE: ShardLinear experts, a Gate module, shared experts."""

    def __init__(self):
        super().__init__()
        self.dim, self.n_routed_experts = HIDDEN, EXPERTS
        self.gate = SigmoidGate(HIDDEN, EXPERTS, TOP_K)
        self.experts = nn.ModuleList(ShardMLP(HIDDEN, INTER) for _ in range(EXPERTS))
        self.shared_experts = ShardMLP(HIDDEN, 2 * INTER)

    def forward(self, x):
        shape = x.size()
        x = x.view(-1, self.dim)
        weights, indices = self.gate(x)
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts).tolist()
        for i in range(self.n_routed_experts):
            if counts[i] == 0:
                continue
            idx, top = torch.where(indices == i)
            y[idx] += self.experts[i](x[idx]) * weights[idx, top, None]
        return (y + self.shared_experts(x)).view(shape)


class MixtralReferenceMoE(nn.Module):
    """Reference code of an open-weight sparse MoE: top-k of the logits, softmax over the k, a where loop."""

    def __init__(self, expert: Callable[[], nn.Module] = SwiGLUExpert):
        super().__init__()
        self.num_experts_per_tok = TOP_K
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(expert() for _ in range(EXPERTS))

    def forward(self, inputs):
        squashed = inputs.view(-1, inputs.shape[-1])
        weights, selected = torch.topk(self.gate(squashed), self.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros_like(squashed)
        for i, expert in enumerate(self.experts):
            batch_idx, nth_expert = torch.where(selected == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(squashed[batch_idx])
        return results.view_as(inputs)


class PerProjectionListsMoE(nn.Module):
    """Reference inference code keeping one ``ModuleList`` per projection: expert ``e`` is ``w1[e]``, ``w3[e]`` and
    ``w2[e]``; softmax, top-k, renormalised; a nonzero loop, ``index_add_``."""

    def __init__(self):
        super().__init__()
        self.k = TOP_K
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w1 = nn.ModuleList(nn.Linear(HIDDEN, INTER, bias=False) for _ in range(EXPERTS))
        self.w3 = nn.ModuleList(nn.Linear(HIDDEN, INTER, bias=False) for _ in range(EXPERTS))
        self.w2 = nn.ModuleList(nn.Linear(INTER, HIDDEN, bias=False) for _ in range(EXPERTS))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, index = self.gate(x).softmax(-1).topk(self.k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(len(self.w1)):
            token, slot = (index == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            rows = x[token]
            y = self.w2[e](F.silu(self.w1[e](rows)) * self.w3[e](rows))
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.reshape(shape)


class MultipliedExpertsMoE(nn.Module):
    """Remote code: experts with a gating multiplier, a one-hot mask loop with ``index_add_``."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.top_k = EXPERTS, TOP_K
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(MultipliedExpert() for _ in range(EXPERTS))

    def forward(self, hidden_states):
        t = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, indices = _softmax_topk(self.router(t), self.top_k)
        out = torch.zeros_like(t)
        mask = F.one_hot(indices, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            out.index_add_(0, token, self.experts[e](t[token]) * weights[token, slot, None])
        return out.reshape(hidden_states.shape)


class ExpertBank(nn.Module):
    """A research library's expert bank: the experts one level down, in ``.experts``."""

    def __init__(self):
        super().__init__()
        self.num_experts = EXPERTS
        self.experts = nn.ModuleList(GeluExpert() for _ in range(EXPERTS))


class NestedExpertsMoE(nn.Module):
    """Research library: ``self.experts.experts[i]``, rows found by a boolean mask, weights summed over slots."""

    def __init__(self):
        super().__init__()
        self.k = TOP_K
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = ExpertBank()

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, indices = _softmax_topk(self.router(t), self.k)
        out = torch.zeros_like(t)
        for i in range(self.experts.num_experts):
            chosen = indices == i
            rows = chosen.any(dim=-1).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            weight = (weights * chosen)[rows].sum(dim=-1, keepdim=True)
            out[rows] += weight * self.experts.experts[i](t[rows])
        return out.reshape(x.shape)


class PackedEinsumMoE(nn.Module):
    """Reference inference code with packed weights on the block: ``W[idx, ...]`` gathered per slot, einsum,
    biases, interleaved gate/up and a clamped SwiGLU."""

    def __init__(self, alpha: float = 1.702, limit: float = 2.0):
        super().__init__()
        self.experts_per_token, self.alpha, self.limit = TOP_K, alpha, limit
        self.gate = nn.Linear(HIDDEN, EXPERTS)
        self.mlp1_weight = nn.Parameter(torch.empty(EXPERTS, 2 * INTER, HIDDEN))
        self.mlp1_bias = nn.Parameter(torch.empty(EXPERTS, 2 * INTER))
        self.mlp2_weight = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.mlp2_bias = nn.Parameter(torch.empty(EXPERTS, HIDDEN))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        top = torch.topk(self.gate(t), k=self.experts_per_token, dim=-1, sorted=True)
        expert_weights = F.softmax(top.values, dim=1)
        expert_indices = top.indices
        mlp1_weight = self.mlp1_weight[expert_indices, ...]
        mlp1_bias = self.mlp1_bias[expert_indices, ...]
        h = torch.einsum("beck,bk->bec", mlp1_weight, t) + mlp1_bias
        h = _swiglu_clamped(h, self.alpha, self.limit)
        mlp2_weight = self.mlp2_weight[expert_indices, ...]
        mlp2_bias = self.mlp2_bias[expert_indices, ...]
        h = torch.einsum("beck,bek->bec", mlp2_weight, h) + mlp2_bias
        return torch.einsum("bec,be->bc", h, expert_weights).reshape(x.shape)


class SplitExperts(nn.Module):
    """Training framework experts: called with rows sorted by expert and per-expert counts."""

    def __init__(self):
        super().__init__()
        self.mlps = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, rows, counts):
        chunks = torch.split(rows, counts.tolist())
        return torch.cat([mlp(chunk) for mlp, chunk in zip(self.mlps, chunks)])


class SortedSplitMoE(nn.Module):
    """Training framework: slots sorted by expert with ``argsort``, experts run through a split loop."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.top_k = EXPERTS, TOP_K
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = SplitExperts()

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, indices = _softmax_topk(self.router(t), self.top_k)
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        token = order // self.top_k
        out = self.experts(t[token], counts) * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(t).index_add_(0, token, out).reshape(x.shape)


class OptionalMaskMoE(SortedSplitMoE):
    """Training framework: an optional padding mask, made of ones from the token count where none is given
    (``torch.ones(t.shape[0])``: a recording holds the number, not the shape it came from), zeroing padded rows
    before routing; then the sorted split loop."""

    def forward(self, x, padding_mask=None):
        t = x.reshape(-1, x.shape[-1])
        if padding_mask is None:
            padding_mask = torch.ones(t.shape[0], dtype=t.dtype, device=t.device)
        return super().forward(t * padding_mask.reshape(-1, 1)).reshape(x.shape)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Pure-torch stand-in for a grouped matmul: rows ``offsets[i-1]:offsets[i]`` times ``w[i]``."""
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for i, end in enumerate(offsets.tolist()):
        out[start:end] = x[start:end] @ w[i]
        start = end
    return out


class GroupedExperts(nn.Module):
    """Training framework grouped experts: packed ``w1, w3 [E, H, I]``, ``w2 [E, I, H]``, grouped matmuls."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.w2 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))
        self.w3 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))

    def forward(self, rows, counts):
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = F.silu(grouped_mm(rows, self.w1, offsets)) * grouped_mm(rows, self.w3, offsets)
        return grouped_mm(h, self.w2, offsets)


class GroupedMatmulMoE(nn.Module):
    """Training framework: sigmoid router with a load-balancing selection bias, sorted rows, grouped matmul."""

    def __init__(self, route_scale: float = 2.0):
        super().__init__()
        self.num_experts, self.top_k, self.route_scale = EXPERTS, TOP_K, route_scale
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.register_buffer("expert_bias", torch.empty(EXPERTS))
        self.experts = GroupedExperts()

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        scores = torch.sigmoid(self.router(t).float())
        _, indices = torch.topk(scores + self.expert_bias, self.top_k, dim=-1)
        weights = scores.gather(1, indices)
        weights = (weights / weights.sum(dim=-1, keepdim=True) * self.route_scale).to(t.dtype)
        flat = indices.reshape(-1)
        counts = torch.bincount(flat, minlength=self.num_experts)
        order = torch.argsort(flat, stable=True)
        out = self.experts(t[order // self.top_k], counts)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return (unsorted.view(-1, self.top_k, t.shape[-1]) * weights.unsqueeze(-1)).sum(dim=1).reshape(x.shape)


class CountingRouter(nn.Module):
    """A router module returning the chosen experts' scores, their indices, and the tokens per expert."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)

    def forward(self, t):
        scores = torch.sigmoid(self.gate(t).float())
        top_scores, indices = torch.topk(scores, TOP_K, dim=-1)
        top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
        counts = torch.histc(indices.reshape(-1).float(), bins=EXPERTS, min=0, max=EXPERTS)
        return top_scores, indices, counts


class FusedGroupedExperts(nn.Module):
    """Packed ``[E, out, in]`` weights applied transposed by the fused grouped matmul (``F.grouped_mm``)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))
        self.w2 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.w3 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))

    def forward(self, rows, counts):
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = F.silu(F.grouped_mm(rows, self.w1.transpose(-2, -1), offs=offsets))
        h = h * F.grouped_mm(rows, self.w3.transpose(-2, -1), offs=offsets)
        return F.grouped_mm(h, self.w2.transpose(-2, -1), offs=offsets)


class FusedGroupedMoE(nn.Module):
    """Training framework: rows sorted by expert, one fused grouped matmul per projection, combined by
    ``scatter_add``."""

    def __init__(self):
        super().__init__()
        self.router = CountingRouter()
        self.experts = FusedGroupedExperts()

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        scores, indices, counts = self.router(t)
        order = torch.argsort(indices.reshape(-1), stable=True)
        token = order // TOP_K
        out = self.experts(t[token], counts) * scores.reshape(-1)[order, None].to(t.dtype)
        combined = torch.zeros_like(t).scatter_add(0, token[:, None].expand(-1, t.shape[-1]), out)
        return combined.reshape(x.shape)


def aligned_layout(counts: torch.Tensor, alignment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, padded counts)``: each expert's rows (sorted by expert, ``counts`` of them) followed by ``-1`` up to
    a multiple of ``alignment`` (at least one), as a grouped matmul kernel wants them; ``-1`` picks a zero row
    appended after the real ones."""
    padded = ((counts + alignment - 1) // alignment * alignment).clamp(min=alignment)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(int(padded.sum())) - torch.repeat_interleave(torch.cumsum(padded, 0) - padded, padded)
    expert = torch.repeat_interleave(torch.arange(len(counts)), padded)
    index = torch.where(slot < counts[expert], first[expert] + slot, -1)
    return index, padded


class AlignedGroupedMoE(FusedGroupedMoE):
    """Training framework (torchtitan style): rows sorted by expert, each expert's rows padded with zero rows to a
    multiple of 8 for the grouped matmul kernel, the padding dropped after it."""

    alignment = 8

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        scores, indices, counts = self.router(t)
        order = torch.argsort(indices.reshape(-1), stable=True)
        token = order // TOP_K
        rows = torch.vstack((t[token], t.new_zeros(t.shape[-1])))
        index, padded = aligned_layout(counts.long(), self.alignment)
        out = self.experts(rows[index], padded)
        unpadded = out.new_zeros(rows.shape)
        unpadded[index] = out
        out = unpadded[:-1] * scores.reshape(-1)[order, None].to(t.dtype)
        combined = torch.zeros_like(t).scatter_add(0, token[:, None].expand(-1, t.shape[-1]), out)
        return combined.reshape(x.shape)


class DetachedScoreMoE(nn.Module):
    """Research code: every expert runs on every token, its input scaled by a detached routing score."""

    def __init__(self):
        super().__init__()
        self.top_k = TOP_K
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        logits = self.router(t)
        values, indices = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.zeros_like(logits).scatter(1, indices, torch.sigmoid(values))
        out = torch.zeros_like(t)
        for i, expert in enumerate(self.experts):
            out = out + expert(t * scores[:, i:i + 1].detach())
        return out.reshape(x.shape)


class EinsumExperts(nn.Module):
    """Packed experts applied to ``[batch, experts, capacity, dim]`` dispatched inputs."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.w2 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))

    def forward(self, x):
        hidden = F.gelu(torch.einsum("...nd,...dh->...nh", x, self.w1))
        return torch.einsum("...nh,...hd->...nd", hidden, self.w2)


def _slot_one_hot(position: torch.Tensor, capacity: int) -> torch.Tensor:
    """One-hot of each token's slot in its expert; all zeros for a token past capacity."""
    return F.one_hot(position.long().clamp(max=capacity), capacity + 1)[..., :capacity]


class GShardTop2MoE(nn.Module):
    """Research library: GShard top-2 gating with capacity, dispatch and combine tensors, einsum experts."""

    def __init__(self, capacity_factor: float = 1.25, min_capacity: int = 4, eps: float = 1e-9):
        super().__init__()
        self.num_experts, self.eps = EXPERTS, eps
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.w_gating = nn.Parameter(torch.empty(HIDDEN, EXPERTS))
        self.experts = EinsumExperts()

    def forward(self, x):
        b, n, d, e = *x.shape, self.num_experts
        raw_gates = torch.einsum("bnd,de->bne", x, self.w_gating).softmax(dim=-1)
        gate_1, index_1 = raw_gates.max(dim=-1)
        mask_1 = F.one_hot(index_1, e).to(x.dtype)
        gate_2, index_2 = (raw_gates * (1.0 - mask_1)).max(dim=-1)
        mask_2 = F.one_hot(index_2, e).to(x.dtype)
        denom = gate_1 + gate_2 + self.eps
        gate_1, gate_2 = gate_1 / denom, gate_2 / denom
        capacity = max(min(n, int(n * self.capacity_factor / e)), self.min_capacity)
        position_1 = (torch.cumsum(mask_1, dim=-2) - mask_1) * mask_1
        mask_1 = mask_1 * (position_1 < capacity).to(x.dtype)
        count_1 = mask_1.sum(dim=-2, keepdim=True)
        position_2 = (torch.cumsum(mask_2, dim=-2) - mask_2 + count_1) * mask_2
        mask_2 = mask_2 * (position_2 < capacity).to(x.dtype)
        gate_1, gate_2 = gate_1 * mask_1.sum(dim=-1), gate_2 * mask_2.sum(dim=-1)
        combine = (gate_1[..., None, None] * F.one_hot(index_1, e)[..., None]
                   * _slot_one_hot(position_1.sum(dim=-1), capacity)[..., None, :]
                   + gate_2[..., None, None] * F.one_hot(index_2, e)[..., None]
                   * _slot_one_hot(position_2.sum(dim=-1), capacity)[..., None, :])
        dispatch = combine.bool().to(x.dtype)
        expert_inputs = torch.einsum("bnd,bnec->becd", x, dispatch)
        expert_outputs = self.experts(expert_inputs)
        return torch.einsum("becd,bnec->bnd", expert_outputs, combine)


class HierarchicalMoE(nn.Module):
    """Research library: two-level gating, a top-1 group, then top-k experts of that group's own gate."""

    def __init__(self, groups: int = 2, per_group: int = 4):
        super().__init__()
        self.groups, self.per_group, self.k = groups, per_group, TOP_K
        self.outer_gate = nn.Linear(HIDDEN, groups, bias=False)
        self.inner_gates = nn.Parameter(torch.empty(groups, HIDDEN, per_group))
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(groups * per_group))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        group_weight, group = self.outer_gate(t).softmax(dim=-1).max(dim=-1)
        inner = torch.einsum("th,the->te", t, self.inner_gates[group]).softmax(dim=-1)
        inner_weight, inner_index = inner.topk(self.k, dim=-1)
        weights = group_weight[:, None] * inner_weight
        indices = group[:, None] * self.per_group + inner_index
        return _loop_experts(t, weights, indices, self.experts).reshape(x.shape)


class DecodeBranchMoE(nn.Module):
    """Inference code with a one-token (decode) fast path beside the multi-token loop."""

    def __init__(self):
        super().__init__()
        self.top_k = TOP_K
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.view(-1, x.shape[-1])
        weights, indices = _softmax_topk(self.gate(t), self.top_k)
        if t.shape[0] == 1:
            out = torch.zeros_like(t)
            for j in range(self.top_k):
                out = out + weights[:, j:j + 1] * self.experts[int(indices[0, j])](t)
            return out.view_as(x)
        return _loop_experts(t, weights, indices, self.experts).view_as(x)


class DecodeGatherMoE(nn.Module):
    """Inference code with packed experts: many tokens run a where loop; one token (decode) gathers its k
    experts' weights (``w1[indices[0]]``) and contracts them by einsum."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.top_k = EXPERTS, TOP_K
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))
        self.w2 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.w3 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, indices = _softmax_topk(self.router(t), self.top_k)
        if t.shape[0] == 1:
            w1, w2, w3 = self.w1[indices[0]], self.w2[indices[0]], self.w3[indices[0]]
            h = F.silu(torch.einsum("kih,h->ki", w1, t[0])) * torch.einsum("kih,h->ki", w3, t[0])
            return (weights[0] @ torch.einsum("khi,ki->kh", w2, h)).reshape(x.shape)
        out = torch.zeros_like(t)
        for e in range(self.num_experts):
            token, slot = torch.where(indices == e)
            rows = t[token]
            h = F.silu(F.linear(rows, self.w1[e])) * F.linear(rows, self.w3[e])
            out.index_add_(0, token, F.linear(h, self.w2[e]) * weights[token, slot, None])
        return out.reshape(x.shape)


class NormedPackedExperts(nn.Module):
    """Packed experts, each with its own RMS norm after the down projection (before the weighting)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.num_experts, self.eps = EXPERTS, eps
        self.gate_up_proj = nn.Parameter(torch.empty(EXPERTS, 2 * INTER, HIDDEN))
        self.down_proj = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.post_norm_weight = nn.Parameter(torch.empty(EXPERTS, HIDDEN))

    def forward(self, t, indices, weights):
        out = torch.zeros_like(t)
        mask = F.one_hot(indices, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            gate, up = F.linear(t[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = F.linear(F.silu(gate) * up, self.down_proj[e])
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.post_norm_weight[e]
            out.index_add_(0, token, h * weights[token, slot, None])
        return out


class PostNormMoE(nn.Module):
    """Remote code: packed experts with a per-expert norm after the down projection; returns the logits too."""

    def __init__(self):
        super().__init__()
        self.top_k = TOP_K
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = NormedPackedExperts()

    def forward(self, hidden_states):
        t = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_logits = self.gate(t)
        weights, indices = _softmax_topk(router_logits, self.top_k)
        return self.experts(t, indices, weights).reshape(hidden_states.shape), router_logits


class ZeroIdentityMoE(nn.Module):
    """Remote code: real experts mixed with a zero expert and an identity expert in one list."""

    def __init__(self, real: int = 4):
        super().__init__()
        self.top_k = TOP_K
        self.experts = nn.ModuleList([*(SwiGLUExpert() for _ in range(real)), ZeroExpert(), nn.Identity()])
        self.router = nn.Linear(HIDDEN, len(self.experts), bias=False)

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, indices = _softmax_topk(self.router(t), self.top_k, renormalize=False)
        return _loop_experts(t, weights, indices, self.experts).reshape(x.shape)


class TupleExpertsMoE(nn.Module):
    """Research code: experts return ``(output, pre-activation)``; the block keeps the output."""

    def __init__(self):
        super().__init__()
        self.top_k = TOP_K
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(TupleExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, indices = _softmax_topk(self.router(t), self.top_k, renormalize=False)
        out = torch.zeros_like(t)
        for i, expert in enumerate(self.experts):
            token, slot = torch.where(indices == i)
            y, _ = expert(t[token])
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.reshape(x.shape)


class ModalityMoE(nn.Module):
    """Remote code of a multimodal model: text and image tokens (``token_type_ids``) each have their own
    router and experts."""

    def __init__(self, per_modality: int = 4):
        super().__init__()
        self.top_k = TOP_K
        self.text_router = nn.Linear(HIDDEN, per_modality, bias=False)
        self.text_experts = nn.ModuleList(SwiGLUExpert() for _ in range(per_modality))
        self.image_router = nn.Linear(HIDDEN, per_modality, bias=False)
        self.image_experts = nn.ModuleList(SwiGLUExpert() for _ in range(per_modality))

    def forward(self, hidden_states, token_type_ids):
        t = hidden_states.reshape(-1, hidden_states.shape[-1])
        types = token_type_ids.reshape(-1)
        out = torch.zeros_like(t)
        pairs = ((self.text_router, self.text_experts), (self.image_router, self.image_experts))
        for kind, (router, experts) in enumerate(pairs):
            rows = (types == kind).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            weights, indices = _softmax_topk(router(t[rows]), self.top_k)
            out[rows] = _loop_experts(t[rows], weights, indices, experts)
        return out.reshape(hidden_states.shape)


class ExpertIdLinearMoE(nn.Module):
    """Research library: one module per projection holding every expert's weight, called with the expert id."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.top_k = EXPERTS, TOP_K
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.gate_proj = ExpertIdLinear(EXPERTS, HIDDEN, INTER)
        self.up_proj = ExpertIdLinear(EXPERTS, HIDDEN, INTER)
        self.down_proj = ExpertIdLinear(EXPERTS, INTER, HIDDEN)

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, indices = _softmax_topk(self.router(t), self.top_k)
        out = torch.zeros_like(t)
        for e in range(self.num_experts):
            token, slot = torch.where(indices == e)
            rows = t[token]
            y = self.down_proj(F.silu(self.gate_proj(rows, e)) * self.up_proj(rows, e), e)
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.reshape(x.shape)


class TopKRouter(nn.Module):
    """Megatron-style router: top-k of the logits, softmax over the k, returned as a dense probability map
    and a boolean routing map ``[tokens, experts]``."""

    def __init__(self):
        super().__init__()
        self.topk = TOP_K
        self.weight = nn.Parameter(torch.empty(EXPERTS, HIDDEN))

    def forward(self, hidden):
        logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), self.weight)
        values, top_indices = torch.topk(logits, self.topk, dim=1)
        probs = torch.zeros_like(logits).scatter(1, top_indices, torch.softmax(values, dim=-1))
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_indices, True)
        return probs, routing_map


class GroupedMLP(nn.Module):
    """Megatron-style grouped MLP: one packed ``weight1 [H, E * 2I]`` and ``weight2 [E * I, H]``, viewed per expert."""

    def __init__(self):
        super().__init__()
        self.num_local_experts = EXPERTS
        self.weight1 = nn.Parameter(torch.empty(HIDDEN, EXPERTS * 2 * INTER))
        self.weight2 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))

    def forward(self, permuted, tokens_per_expert):
        w1 = self.weight1.view(self.num_local_experts, HIDDEN, -1)
        w2 = self.weight2.view(self.num_local_experts, -1, HIDDEN)
        outs = []
        for e, rows in enumerate(torch.split(permuted, tokens_per_expert.tolist())):
            gate, up = torch.chunk(rows @ w1[e], 2, dim=-1)
            outs.append((F.silu(gate) * up) @ w2[e])
        return torch.cat(outs)


class MegatronMoELayer(nn.Module):
    """Training framework (Megatron style): ``[seq, batch, hidden]`` inputs, tokens permuted by a routing map,
    a grouped MLP, probabilities applied on unpermute; returns ``(output, bias)`` with no bias."""

    def __init__(self):
        super().__init__()
        self.router = TopKRouter()
        self.experts = GroupedMLP()

    def forward(self, hidden_states):
        probs, routing_map = self.router(hidden_states)
        t = hidden_states.reshape(-1, hidden_states.shape[-1])
        map_t = routing_map.T.contiguous()
        token_index = torch.arange(t.shape[0], device=t.device).unsqueeze(0).expand(map_t.shape[0], -1)
        sorted_index = token_index.masked_select(map_t)
        permuted = t.index_select(0, sorted_index)
        out = self.experts(permuted, routing_map.sum(dim=0))
        out = out * probs.T.contiguous().masked_select(map_t).unsqueeze(-1)
        combined = torch.zeros_like(t).scatter_add_(0, sorted_index.unsqueeze(1).expand(-1, t.shape[-1]), out)
        return combined.view(hidden_states.shape), None


def sparsemixer_top2(scores: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparsemixer routing (eval): argmax, then argmax of the rest; each weight a softmax over the scores
    within a relative distance of its winner."""
    weights, chosen = [], []
    masked = scores
    for _ in range(2):
        with torch.no_grad():
            threshold, index = masked.max(dim=-1, keepdim=True)
            factor = scores.abs().clamp(min=threshold.abs())
            far = (threshold - scores) / factor > 2 * eps
        weights.append(masked.masked_fill(far, float("-inf")).softmax(dim=-1).gather(-1, index))
        chosen.append(index)
        masked = masked.scatter(-1, index, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(chosen, dim=-1)


class SparseMixerMoE(nn.Module):
    """Remote code of a hub model: sparsemixer routing (argmax, then masked argmax: k = 2), one-hot loop."""

    def __init__(self, eps: float = 0.3):
        super().__init__()
        self.num_experts, self.eps = EXPERTS, eps
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, hidden_states):
        t = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, selected = sparsemixer_top2(self.gate(t), self.eps)
        out = torch.zeros_like(t)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            out.index_add_(0, token, self.experts[e](t[token]) * weights[token, slot, None])
        return out.reshape(hidden_states.shape)


class PackedLoopMoE(nn.Module):
    """Hand-written packed experts on the block (``gate_up [E, 2I, H]``, ``down [E, H, I]``), a where loop."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.top_k = EXPERTS, TOP_K
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.gate_up = nn.Parameter(torch.empty(EXPERTS, 2 * INTER, HIDDEN))
        self.down = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, indices = _softmax_topk(self.router(t), self.top_k)
        out = torch.zeros_like(t)
        for e in range(self.num_experts):
            token, slot = torch.where(indices == e)
            gate, up = F.linear(t[token], self.gate_up[e]).chunk(2, dim=-1)
            out.index_add_(0, token, F.linear(F.silu(gate) * up, self.down[e]) * weights[token, slot, None])
        return out.reshape(x.shape)


class DecoderLayer(nn.Module):
    """An ordinary pre-norm decoder layer: a token mixer (a Linear standing in for attention), then the MoE."""

    def __init__(self):
        super().__init__()
        self.input_norm = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.mixer = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.post_norm = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.moe = PackedLoopMoE()

    def forward(self, h):
        h = h + self.mixer(self.input_norm(h))
        return h + self.moe(self.post_norm(h))


class LayersModel(nn.Module):
    """Decoder layers in an ``nn.ModuleList``, looped over, then a final norm."""

    def __init__(self, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer() for _ in range(layers))
        self.norm = nn.RMSNorm(HIDDEN, eps=1e-6)

    def forward(self, hidden_states):
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm(hidden_states)



class ParamSoftmaxGate(nn.Module):
    """Remote-code gate: a raw ``weight`` parameter, ``F.linear`` in float32, softmax, unsorted top-k, renormalised."""

    def __init__(self, dim: int = HIDDEN, experts: int = EXPERTS, k: int = TOP_K):
        super().__init__()
        self.top_k = k
        self.weight = nn.Parameter(torch.empty(experts, dim))

    def forward(self, hidden):
        t = hidden.reshape(-1, hidden.shape[-1])
        scores = F.linear(t.float(), self.weight.float()).softmax(dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return indices, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)


class HostCountsMoE(nn.Module):
    """Remote-code inference path: counts per expert read on the host (numpy), rows sorted by expert, each
    expert given its slice, outputs scattered back by the sort order; shared experts added."""

    def __init__(self):
        super().__init__()
        self.gate = ParamSoftmaxGate()
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))
        self.shared_experts = SwiGLUExpert(inter=2 * INTER)

    def forward(self, hidden_states):
        indices, weights = self.gate(hidden_states)
        t = hidden_states.reshape(-1, hidden_states.shape[-1])
        return (self._infer(t, indices, weights) + self.shared_experts(t)).view_as(hidden_states)

    @torch.no_grad()
    def _infer(self, t, indices, weights):
        counts = indices.new_zeros(indices.shape[0], len(self.experts)).scatter_(1, indices, 1).sum(0)
        order = indices.view(-1).argsort()
        rows = t[order // indices.shape[1]]
        outputs, start = [], 0
        for e, count in enumerate(counts.cpu().numpy()):
            if count:
                outputs.append(self.experts[e](rows[start:start + count]))
                start += count
        gathered = torch.empty_like(rows)
        gathered[order] = torch.cat(outputs)
        return (gathered.view(*indices.shape, -1) * weights.unsqueeze(-1)).sum(dim=1).to(t.dtype)


class RepeatedRowsMoE(nn.Module):
    """Remote-code training path: every token repeated k times (``repeat_interleave``), expert ``i`` given the
    copies routed to it (``flat == i``), the copies weighted and summed."""

    def __init__(self):
        super().__init__()
        self.gate = ParamSoftmaxGate()
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, hidden_states):
        indices, weights = self.gate(hidden_states)
        flat = indices.view(-1)
        rows = hidden_states.reshape(-1, hidden_states.shape[-1]).repeat_interleave(TOP_K, dim=0)
        y = torch.empty_like(rows)
        for i, expert in enumerate(self.experts):
            y[flat == i] = expert(rows[flat == i])
        return (y.view(*weights.shape, -1) * weights.unsqueeze(-1)).sum(dim=1).view_as(hidden_states)


class FusedReferenceMoE(nn.Module):
    """An inference engine's torch reference of its fused MoE kernel: ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` on
    the block, tokens repeated k times, a boolean mask per expert, ``x @ w[i].transpose(0, 1)``, experts with no
    rows skipped."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w13 = nn.Parameter(torch.empty(EXPERTS, 2 * INTER, HIDDEN))
        self.w2 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))

    def forward(self, x):
        a = x.reshape(-1, x.shape[-1])
        weights, ids = _softmax_topk(self.router(a), TOP_K)
        tokens = a.shape[0]
        a = a.view(tokens, -1, a.shape[-1]).repeat(1, TOP_K, 1).reshape(-1, a.shape[-1])
        out = torch.zeros(tokens * TOP_K, self.w2.shape[1], dtype=a.dtype)
        ids = ids.view(-1)
        for i in range(self.w13.shape[0]):
            mask = ids == i
            if mask.sum():
                gate, up = (a[mask] @ self.w13[i].transpose(0, 1)).chunk(2, dim=-1)
                out[mask] = (F.silu(gate) * up) @ self.w2[i].transpose(0, 1)
        return (out.view(tokens, -1, out.shape[-1]) * weights.view(tokens, -1, 1)).sum(dim=1).view_as(x)


class SideBySideMoE(nn.Module):
    """Remote code keeping every expert's weights side by side in raw ``[E * I, H]`` tensors on the block, viewed
    ``[E, I, H]`` and sliced per expert in a where loop; the top-k weights L1-normalised."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))
        self.v1 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))
        self.w2 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        probs = self.router(t).softmax(dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, TOP_K, dim=-1)
        weights = weights / torch.norm(weights, p=1, dim=-1, keepdim=True)
        w1, v1, w2 = (w.view(EXPERTS, INTER, -1) for w in (self.w1, self.v1, self.w2))
        out = torch.zeros_like(t)
        mask = F.one_hot(chosen, num_classes=EXPERTS).permute(2, 1, 0)
        for e in range(EXPERTS):
            slot, token = torch.where(mask[e])
            rows = t[token]
            y = (F.silu(rows @ w1[e].t()) * (rows @ v1[e].t())) @ w2[e]
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.view_as(x)


class SwitchMoE(nn.Module):
    """Research-library top-1 (Switch style): experts in an ``nn.ModuleDict``, argmax of the softmax, a one-hot
    mask sliced per expert (``mask[:, :, i]``), rows assigned in place, the output scaled by the top probability."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleDict({f"expert_{i}": SwiGLUExpert() for i in range(EXPERTS)})

    def forward(self, hidden_states):
        probs = torch.softmax(self.classifier(hidden_states), dim=-1)
        chosen = F.one_hot(torch.argmax(probs, dim=-1), num_classes=EXPERTS)
        top = torch.max(probs, dim=-1).values.unsqueeze(-1)
        out = hidden_states.clone()
        for i, expert in enumerate(self.experts.values()):
            rows = chosen[:, :, i].bool()
            out[rows] = expert(hidden_states[rows])
        return top * out


class CapacityTop1MoE(nn.Module):
    """Research-library top-1 gating with an expert capacity (here every token fits), einsum dispatch into
    ``[E, capacity, H]``, experts run on their chunks, einsum combine."""

    def __init__(self):
        super().__init__()
        self.wg = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(GeluExpert() for _ in range(EXPERTS))

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        gates = F.softmax(self.wg(tokens), dim=1)
        capacity = gates.shape[0]
        mask = F.one_hot(torch.argmax(gates, dim=1), num_classes=EXPERTS)
        location = torch.sum((torch.cumsum(mask, dim=0) - 1) * mask, dim=1)
        gate = (gates * mask).sum(dim=1)
        combine = torch.einsum("se,sc->sec", gate.unsqueeze(-1) * mask.float(),
                               F.one_hot(location, num_classes=capacity).float())
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().float(), tokens)
        outputs = torch.cat([expert(chunk) for chunk, expert in zip(dispatched.chunk(EXPERTS, dim=0), self.experts)])
        return torch.einsum("sec,ecm->sm", combine, outputs).reshape(x.shape)


class LegacyMixtralMoE(nn.Module):
    """Remote code copying an older transformers Mixtral: one-hot expert mask, ``where``, ``hidden[None, top_x]``,
    ``index_add_``; a sigmoid-gated shared expert; returns ``(out, router_logits)``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))
        self.shared_expert = SwiGLUExpert()
        self.shared_expert_gate = nn.Linear(HIDDEN, 1, bias=False)

    def forward(self, hidden_states):
        batch, seq, dim = hidden_states.shape
        t = hidden_states.view(-1, dim)
        router_logits = self.gate(t)
        weights, selected = torch.topk(F.softmax(router_logits, dim=1, dtype=torch.float), TOP_K, dim=-1)
        out = torch.zeros((batch * seq, dim), dtype=t.dtype)
        mask = F.one_hot(selected, num_classes=EXPERTS).permute(2, 1, 0)
        for e in range(EXPERTS):
            slot, top_x = torch.where(mask[e])
            if top_x.shape[0] == 0:
                continue
            rows = t[None, top_x].reshape(-1, dim)
            out.index_add_(0, top_x, (self.experts[e](rows) * weights[top_x, slot, None]).to(t.dtype))
        out = out + F.sigmoid(self.shared_expert_gate(t)) * self.shared_expert(t)
        return out.reshape(batch, seq, dim), router_logits


class GroupLimitedGate(nn.Module):
    """Reference-code gate with group-limited routing: sigmoid scores plus a selection bias, groups ranked by the
    sum of their two best scores, the best groups kept, the top-k among them; unbiased scores renormalised."""

    def __init__(self, groups: int = 3, kept_groups: int = 2):
        super().__init__()
        self.groups, self.kept_groups = groups, kept_groups
        self.weight = nn.Parameter(torch.empty(EXPERTS, HIDDEN))
        self.bias = nn.Parameter(torch.empty(EXPERTS))

    def forward(self, t):
        scores = F.linear(t, self.weight).sigmoid()
        biased = (scores + self.bias).view(t.shape[0], self.groups, -1)
        best_groups = biased.topk(2, dim=-1)[0].sum(dim=-1).topk(self.kept_groups, dim=-1)[1]
        dropped = biased.new_ones(t.shape[0], self.groups, dtype=torch.bool).scatter_(1, best_groups, False)
        indices = torch.topk(biased.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1), TOP_K, dim=-1)[1]
        weights = scores.gather(1, indices)
        return (weights / weights.sum(dim=-1, keepdim=True)).type_as(t), indices


class GroupLimitedMoE(nn.Module):
    """Reference inference code with group-limited routing, a bincount skip, a where loop and shared experts."""

    def __init__(self):
        super().__init__()
        self.gate = GroupLimitedGate()
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))
        self.shared_experts = SwiGLUExpert()

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, indices = self.gate(t)
        y = torch.zeros_like(t)
        counts = torch.bincount(indices.flatten(), minlength=EXPERTS).tolist()
        for i in range(EXPERTS):
            if counts[i]:
                token, slot = torch.where(indices == i)
                y[token] += self.experts[i](t[token]) * weights[token, slot, None]
        return (y + self.shared_experts(t)).view_as(x)


class ScoresRouter(nn.Module):
    """A training framework's router module: returns ``(scores, expert_weights, expert_indices)``."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(HIDDEN, EXPERTS, bias=False)

    def forward(self, x):
        scores = self.layer(x.view(-1, x.shape[-1])).softmax(dim=-1)
        weights, indices = torch.topk(scores, TOP_K, dim=-1)
        return scores, weights, indices


class DroplessExperts(nn.Module):
    """A training framework's dropless experts: raw ``[E * I, H]`` weights viewed per expert, rows sorted by
    expert, counted by ``bincount``, each expert run on its slice."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))
        self.v1 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))
        self.w2 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))

    def forward(self, x, scores, weights, indices):
        t = x.view(-1, x.shape[-1])
        flat = indices.flatten()
        _, order = torch.sort(flat)
        rows = t[order // TOP_K]
        w1, v1, w2 = (w.view(EXPERTS, INTER, -1) for w in (self.w1, self.v1, self.w2))
        outputs, start = [], 0
        for e, count in enumerate(torch.bincount(flat, minlength=EXPERTS).tolist()):
            chunk = rows[start:start + count]
            outputs.append((F.silu(chunk @ w1[e].t()) * (chunk @ v1[e].t())) @ w2[e])
            start += count
        out = torch.zeros(flat.shape[0], t.shape[-1], dtype=t.dtype)
        out[order] = torch.cat(outputs) * weights.flatten()[order, None]
        return out.view(-1, TOP_K, t.shape[-1]).sum(1).view_as(x)


class DroplessMoE(nn.Module):
    """The block of a training framework's dropless MoE: its router, then its experts given the routing."""

    def __init__(self):
        super().__init__()
        self.router = ScoresRouter()
        self.experts = DroplessExperts()

    def forward(self, x):
        return self.experts(x, *self.router(x))


class NoisyGateMoE(nn.Module):
    """Research library noisy top-k gating: raw gate and noise weights ``[H, E]`` (``x @ w_gate``), the noise
    added in training only, a softmax over the kept logits (the others ``-inf``), experts of
    ``nn.Sequential(Linear, ReLU, Linear)`` on the rows whose gate is positive."""

    def __init__(self):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(HIDDEN, EXPERTS))
        self.w_noise = nn.Parameter(torch.empty(HIDDEN, EXPERTS))
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, INTER), nn.ReLU(), nn.Linear(INTER, HIDDEN))
                                     for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        logits = t @ self.w_gate
        if self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(t @ self.w_noise)
        top_logits, top = logits.topk(TOP_K, dim=1)
        gates = torch.full_like(logits, float("-inf")).scatter(1, top, top_logits).softmax(dim=1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            rows = gates[:, e] > 0
            out[rows] = out[rows] + gates[rows, e].unsqueeze(1) * expert(t[rows])
        return out.view_as(x)


class TransposedConv1D(nn.Module):
    """A Linear class of a language-model codebase: ``weight [in, out]``, ``addmm(bias, x, weight)``."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.out_features)


class TransposedConvExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = TransposedConv1D(INTER, HIDDEN)
        self.c_proj = TransposedConv1D(HIDDEN, INTER)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class DenseThenGatherMoE(nn.Module):
    """Research code computing every expert on every token (einsums over stacked weights), then gathering the
    chosen experts' outputs by the top-k."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.w2 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, chosen = self.gate(t).softmax(-1).topk(TOP_K, -1)
        outputs = torch.einsum("tei,eih->teh", F.gelu(torch.einsum("th,ehi->tei", t, self.w1)), self.w2)
        picked = outputs.gather(1, chosen.unsqueeze(-1).expand(-1, -1, HIDDEN))
        return (picked * weights.unsqueeze(-1)).sum(1).view_as(x)


class HostListRouter(nn.Module):
    """A router module returning (all weights, the top-k's L1-normalised weights, the chosen experts)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(HIDDEN, EXPERTS, bias=False)

    def forward(self, x):
        weights = self.layer(x.view(-1, x.shape[-1])).softmax(dim=-1, dtype=torch.float32)
        top_weights, top_experts = torch.topk(weights, TOP_K, dim=-1)
        return weights, top_weights / torch.norm(top_weights, p=1, dim=-1, keepdim=True), top_experts


class ExpertGLU(nn.Module):
    """Every expert's GLU weights side by side (``[E * I, H]``), one expert's viewed out by its number."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))
        self.v1 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))
        self.w2 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))

    def forward(self, x, expert):
        w1, v1, w2 = (w.view(EXPERTS, INTER, HIDDEN)[expert] for w in (self.w1, self.v1, self.w2))
        return (F.silu(x.matmul(w1.t())) * x.matmul(v1.t())).matmul(w2)


class HostListExperts(nn.Module):
    """The experts module: a one-hot mask, token lists read on the host (``tolist``), ``x[None, tokens]``."""

    def __init__(self):
        super().__init__()
        self.mlp = ExpertGLU()

    def forward(self, x, weights, top_weights, top_experts):
        t = x.view(-1, x.shape[-1])
        out = torch.zeros_like(t)
        mask = F.one_hot(top_experts, num_classes=EXPERTS).permute(2, 1, 0)
        for e in range(EXPERTS):
            slot, token = torch.where(mask[e])
            if token.shape[0] == 0:
                continue
            tokens, slots = token.tolist(), slot.tolist()
            rows = t[None, tokens].reshape(-1, t.shape[-1])
            out.index_add_(0, token, self.mlp(rows, e) * top_weights[tokens, slots, None])
        return out.view_as(x)


class HostListMoE(nn.Module):
    """Remote code of a hub model: its router module, then its experts module given the routing."""

    def __init__(self):
        super().__init__()
        self.router = HostListRouter()
        self.experts = HostListExperts()

    def forward(self, x):
        weights, top_weights, top_experts = self.router(x)
        return self.experts(x, weights, top_weights, top_experts), weights


class SortSliceMoE(nn.Module):
    """Research code: a descending sort of the logits sliced to the k first, softmax over those, experts in a
    list named ``ffn``, rows found by ``nonzero(as_tuple=True)``."""

    def __init__(self):
        super().__init__()
        self.wg = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.ffn = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        values, order = torch.sort(self.wg(t), dim=-1, descending=True)
        top, weights = order[:, :TOP_K], F.softmax(values[:, :TOP_K], dim=-1)
        y = torch.zeros_like(t)
        for e in range(EXPERTS):
            token, slot = (top == e).nonzero(as_tuple=True)
            if token.numel():
                y[token] += weights[token, slot].unsqueeze(-1) * self.ffn[e](t[token])
        return y.view_as(x)


class PreNormExpert(nn.Module):
    """An expert that normalises its own input (a LayerNorm) before a GELU MLP."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(HIDDEN)
        self.fc_in = nn.Linear(HIDDEN, INTER)
        self.fc_out = nn.Linear(INTER, HIDDEN)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(self.ln(x))))


class PreNormExpertsMoE(nn.Module):
    """Research library: experts with a norm inside, rows found by ``nonzero`` on the chosen mask."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(PreNormExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        probs = self.gate(t).softmax(dim=-1)
        top, chosen = probs.topk(TOP_K, dim=-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            picked = chosen == e
            rows = picked.any(dim=-1).nonzero().squeeze(-1)
            if rows.numel():
                out[rows] += (top * picked)[rows].sum(-1, keepdim=True) * expert(t[rows])
        return out.view_as(x)


class SeqFirstAuxMoE(nn.Module):
    """Training-framework layer over ``[seq, batch, hidden]``: ``s, b, h = x.shape`` and ``x.view(s * b, h)`` (sizes
    a recording bakes in), rows by ``nonzero`` with an early ``continue``, a load-balancing loss returned beside
    the output."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, hidden):
        s, b, h = hidden.shape
        t = hidden.view(s * b, h)
        probs = torch.softmax(self.router(t), dim=-1)
        weights, ids = torch.topk(probs, TOP_K, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        load = F.one_hot(ids, EXPERTS).sum(dim=1).float().mean(dim=0)
        aux_loss = EXPERTS * (load * probs.mean(dim=0)).sum()
        out = torch.zeros_like(t)
        for e in range(EXPERTS):
            rows = (ids == e).any(dim=-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            out[rows] += (weights * (ids == e)).sum(dim=-1)[rows, None] * self.experts[e](t[rows])
        return out.view(s, b, h), aux_loss


class BiasedLinear(nn.Module):
    """An inference engine's Linear layer: returns ``(output, output bias)``, the bias None when skipped."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x):
        return F.linear(x, self.weight), None


class EngineExperts(nn.Module):
    """An inference engine's fused-MoE layer in its torch-native form: given the router logits, it picks the top-k
    itself, gathers each slot's ``w13 [E, 2I, H]`` (gate rows, then up rows) and ``w2 [E, H, I]`` by the chosen
    ids and contracts them by einsum, ``silu_and_mul`` between."""

    def __init__(self):
        super().__init__()
        self.w13_weight = nn.Parameter(torch.empty(EXPERTS, 2 * INTER, HIDDEN))
        self.w2_weight = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))

    def forward(self, hidden_states, router_logits):
        topk_weights, topk_ids = torch.topk(torch.softmax(router_logits, dim=-1, dtype=torch.float32), TOP_K)
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        x = torch.einsum("th,tkoh->tko", hidden_states, self.w13_weight[topk_ids])
        half = x.shape[-1] // 2
        x = F.silu(x[..., :half]) * x[..., half:]
        x = torch.einsum("tki,tkoi->tko", x, self.w2_weight[topk_ids])
        return torch.einsum("tko,tk->to", x, topk_weights.to(x.dtype))


class EngineMoE(nn.Module):
    """The engine's MoE block: a gate Linear returning ``(logits, bias)``, then the fused-MoE layer."""

    def __init__(self):
        super().__init__()
        self.gate = BiasedLinear(HIDDEN, EXPERTS)
        self.experts = EngineExperts()

    def forward(self, hidden_states):
        t = hidden_states.view(-1, hidden_states.shape[-1])
        router_logits, _ = self.gate(t)
        return self.experts(t, router_logits=router_logits).view_as(hidden_states)


class JitterRouter(nn.Module):
    """A router multiplying its input by uniform noise in training only, softmax, top-k, p-norm normalised."""

    def __init__(self, jitter: float = 0.01):
        super().__init__()
        self.jitter = jitter
        self.layer = nn.Linear(HIDDEN, EXPERTS, bias=False)

    def forward(self, x):
        if self.training and self.jitter:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        probs = self.layer(x).softmax(dim=-1, dtype=torch.float32)
        top, chosen = torch.topk(probs, TOP_K, dim=-1)
        return top / top.norm(p=1, dim=-1, keepdim=True), chosen


class SplitWeightsExperts(nn.Module):
    """Every expert's GLU weights side by side in ``[E * I, H]`` tensors, expert ``e``'s taken as piece ``e`` of a
    split (``w.split(I)[e]``), not a view; token lists and slots read on the host."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))
        self.v1 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))
        self.w2 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))

    def forward(self, t, weights, chosen):
        out = torch.zeros_like(t)
        for e in range(EXPERTS):
            token, slot = torch.where(chosen == e)
            if token.shape[0] == 0:
                continue
            w1, v1, w2 = (w.split(INTER, dim=0)[e] for w in (self.w1, self.v1, self.w2))
            rows = t[token.tolist()]
            y = (F.gelu(rows @ w1.t(), approximate="tanh") * (rows @ v1.t())) @ w2
            out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
        return out


class SplitWeightsMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = JitterRouter()
        self.experts = SplitWeightsExperts()

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        return self.experts(t, *self.router(t)).view_as(x)


class ResidualMoE(MixtralReferenceMoE):
    """A norm-free residual layer that is its own MoE block: ``x + moe(x)``."""

    def forward(self, inputs):
        return inputs + super().forward(inputs)


class PlainLayersModel(nn.Module):
    """A research model of norm-free MoE layers (a router and its Linear experts each) in an ``nn.ModuleList``."""

    def __init__(self, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(ResidualMoE() for _ in range(layers))

    def forward(self, hidden_states):
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class BatchedExperts(nn.Module):
    """Packed experts ``w1, w3 [E, H, I]``, ``w2 [E, I, H]`` run by ``bmm`` on ``[E, tokens, H]`` (every expert on
    every token)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.w2 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))
        self.w3 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))

    def forward(self, rows):
        x = rows.view(EXPERTS, -1, HIDDEN)
        return torch.bmm(F.silu(torch.bmm(x, self.w1)) * torch.bmm(x, self.w3), self.w2).view(-1, HIDDEN)


class DetachedScaledInputsMoE(nn.Module):
    """Reference inference code scaling each expert's copy of every token by its sigmoid score (zero where not
    chosen): a raw router ``[H, E]``, copies taken by ``gather`` with ``arange``, handed to the experts detached,
    added into the shared expert's output by ``scatter_add_``."""

    def __init__(self):
        super().__init__()
        self.router_weight = nn.Parameter(torch.empty(HIDDEN, EXPERTS))
        self.experts = BatchedExperts()
        self.shared_expert = SwiGLUExpert()

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        logits = t @ self.router_weight
        top, chosen = torch.topk(logits, TOP_K, dim=-1)
        scores = torch.sigmoid(torch.full_like(logits, float("-inf")).scatter(1, chosen, top)).t()  # [E, T]
        copies = torch.arange(t.shape[0]).repeat(EXPERTS).unsqueeze(-1).expand(-1, HIDDEN)
        routed = torch.gather(t, 0, copies) * scores.reshape(-1, 1)
        out = self.shared_expert(t)
        out.scatter_add_(0, copies, self.experts(routed.detach()))
        return out.view_as(x)


class StackedThenTopKMoE(nn.Module):
    """Research code: every expert run on every token, the outputs stacked ``[T, E, H]``, then combined by a gate
    matrix holding each token's renormalised top-k probabilities (zero elsewhere)."""

    def __init__(self):
        super().__init__()
        self.w_gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(GeluExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        probs = self.w_gate(t).softmax(dim=-1)
        top, chosen = probs.topk(TOP_K, dim=-1)
        combine = torch.zeros_like(probs).scatter(1, chosen, top / top.sum(dim=-1, keepdim=True))
        outputs = torch.stack([expert(t) for expert in self.experts], dim=1)
        return torch.einsum("te,teh->th", combine, outputs).view_as(x)


class KeywordExpert(nn.Module):
    """A user's expert whose forward names its input and takes the routing weight as a second argument."""

    def __init__(self, dim: int = HIDDEN, inter: int = INTER):
        super().__init__()
        self.up = nn.Linear(dim, inter)
        self.down = nn.Linear(inter, dim)

    def forward(self, hidden_states=None, scale=1.0):
        return self.down(F.silu(self.up(hidden_states))) * scale


class KeywordExpertsMoE(nn.Module):
    """A user's block calling its experts by keyword: ``expert(hidden_states=rows, scale=weights)``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(KeywordExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, chosen = torch.topk(self.gate(t).softmax(dim=-1), TOP_K, dim=-1)
        out = torch.zeros_like(t)
        for e in range(EXPERTS):
            token, slot = torch.where(chosen == e)
            out[token] += self.experts[e](hidden_states=t[token], scale=weights[token, slot, None])
        return out.view_as(x)


class RawRouterMoE(nn.Module):
    """Research code keeping every weight on the block: a raw ``[H, E]`` router multiplied in (``x @ router``), the
    experts' ``[E, I, H]`` and ``[E, H, I]`` weights applied one expert at a time in a where loop."""

    def __init__(self):
        super().__init__()
        self.router = nn.Parameter(torch.empty(HIDDEN, EXPERTS))
        self.w_up = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))
        self.w_down = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, chosen = torch.topk((t @ self.router).softmax(dim=-1), TOP_K, dim=-1)
        out = torch.zeros_like(t)
        for e in range(EXPERTS):
            token, slot = torch.where(chosen == e)
            h = F.gelu(F.linear(t[token], self.w_up[e]))
            out[token] += weights[token, slot, None] * F.linear(h, self.w_down[e])
        return out.view_as(x)


class ArgmaxTop2Gate(nn.Module):
    """Training-framework top-2 gate: the first expert by argmax, the second by argmax of the logits with the first
    masked out; slots by cumulative sums, first choices before second ones; past the capacity (eval factor 1:
    ``ceil(2 S / E)``, at least 4) a choice is dropped; the kept gates renormalised. Returns (combine, dispatch)
    ``[S, E, C]``."""

    def __init__(self):
        super().__init__()
        self.wg = nn.Linear(HIDDEN, EXPERTS, bias=False)

    def forward(self, x):
        logits = self.wg(x.float())
        gates = F.softmax(logits, dim=1)
        capacity = max(math.ceil(2 * gates.shape[0] / EXPERTS), 4)
        mask1 = F.one_hot(torch.argmax(gates, dim=1), num_classes=EXPERTS)
        mask2 = F.one_hot(torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1), num_classes=EXPERTS)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        loc2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
        mask1, mask2 = mask1 * torch.lt(loc1, capacity), mask2 * torch.lt(loc2, capacity)
        g1, g2 = (gates * mask1).sum(dim=1), (gates * mask2).sum(dim=1)
        denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
        slot1 = F.one_hot(torch.sum(loc1 * mask1, dim=1), capacity)
        slot2 = F.one_hot(torch.sum(loc2 * mask2, dim=1), capacity)
        combine = (torch.einsum("se,sc->sec", (g1 / denom)[:, None] * mask1, slot1.float())
                   + torch.einsum("se,sc->sec", (g2 / denom)[:, None] * mask2, slot2.float()))
        return combine, combine.bool()


class ChunkedExperts(nn.Module):
    """A list of experts run on chunks of ``[groups, E, C, H]`` along the expert dimension, outputs concatenated."""

    def __init__(self):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(GeluExpert() for _ in range(EXPERTS))

    def forward(self, inputs):
        outputs = []
        for chunk, expert in zip(inputs.chunk(EXPERTS, dim=1), self.deepspeed_experts):
            outputs += [expert(chunk)]
        return torch.cat(outputs, dim=1)


class ArgmaxTop2MoE(nn.Module):
    """Training-framework MoE layer: the gate's dispatch mask contracted with the tokens (``sec,sm->ecm``), the
    experts module run on it, the outputs combined (``sec,ecm->sm``); tokens past capacity get nothing."""

    def __init__(self):
        super().__init__()
        self.gate = ArgmaxTop2Gate()
        self.experts = ChunkedExperts()

    def forward(self, hidden_states):
        d = hidden_states.shape[-1]
        tokens = hidden_states.reshape(-1, d)
        combine, dispatch = self.gate(tokens)
        dispatched = torch.einsum("sec,sm->ecm", dispatch.type_as(tokens), tokens).reshape(1, EXPERTS, -1, d)
        outputs = self.experts(dispatched).reshape(EXPERTS, -1, d)
        return torch.einsum("sec,ecm->sm", combine.type_as(tokens), outputs).reshape(hidden_states.shape)


class SizedExperts(nn.Module):
    """One projection of every expert, ``[E, out, in]``, called with rows sorted by expert and each expert's row
    count: the rows split by the counts, each part through its expert's weight."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(EXPERTS, out_features, in_features))

    def forward(self, inputs, expert_size):
        if isinstance(expert_size, torch.Tensor):
            expert_size = expert_size.long().tolist()
        parts = inputs.split(expert_size, dim=0)
        return torch.cat([F.linear(parts[i], self.weight[i]) for i in range(EXPERTS)], dim=0)


class SizedExpertsMoE(nn.Module):
    """Remote code with expert-size splits: gates scattered to ``[T, E]``, counts per expert on the host, the
    flattened choices sorted, each row's token by integer division by k, two projection modules called with
    (rows, sizes), a GLU between, ``index_add`` back, an output bias."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.input_linear = SizedExperts(HIDDEN, 2 * INTER)
        self.output_linear = SizedExperts(INTER, HIDDEN)
        self.bias = nn.Parameter(torch.empty(HIDDEN))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        top_logits, top_experts = self.router(t).topk(TOP_K, dim=1)
        top_gates = top_logits.softmax(dim=1)
        expert_size = torch.zeros(t.shape[0], EXPERTS).scatter(1, top_experts, 1).long().sum(0).tolist()
        _, order = top_experts.flatten().sort(0)
        batch_index = order.div(TOP_K, rounding_mode="trunc")
        h, g = self.input_linear(t[batch_index], expert_size).chunk(2, dim=-1)
        out = self.output_linear(F.silu(h) * g, expert_size) * top_gates.flatten()[order][:, None]
        y = torch.zeros_like(t).index_add(0, batch_index, out)
        return (y + self.bias).view_as(x)


class ScoredGroupedExperts(nn.Module):
    """Packed ``[E, H, I]`` / ``[E, I, H]`` weights run on rows sorted by expert, split by per-expert counts."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.w2 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))
        self.w3 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))

    def forward(self, x, num_tokens_per_expert):
        outputs = []
        for e, rows in enumerate(torch.split(x, num_tokens_per_expert.long().tolist(), dim=0)):
            outputs.append((F.silu(rows @ self.w1[e]) * (rows @ self.w3[e])) @ self.w2[e])
        return torch.cat(outputs, dim=0)


class HistcRouter(nn.Module):
    """A router returning (top scores, chosen experts, tokens per expert by ``histc``), sigmoid scores."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)

    def forward(self, x):
        top_scores, chosen = torch.topk(torch.sigmoid(self.gate(x).float()), TOP_K, dim=1)
        return top_scores, chosen, torch.histc(chosen.view(-1).float(), bins=EXPERTS, min=0, max=EXPERTS - 1)


class ScoredSortedMoE(nn.Module):
    """Training-library MoE: a stable argsort of the choices, rows gathered by ``torch.gather``, *scaled by their
    scores before the experts*, split by the router's counts, ``scatter_add`` onto the shared expert's output."""

    def __init__(self):
        super().__init__()
        self.router = HistcRouter()
        self.experts = ScoredGroupedExperts()
        self.shared_expert = SwiGLUExpert()

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        top_scores, chosen, counts = self.router(t)
        order = torch.argsort(chosen.view(-1), stable=True)
        token_indices = (order // TOP_K).reshape(-1, 1).expand(-1, HIDDEN)
        routed = torch.gather(t, dim=0, index=token_indices) * top_scores.view(-1)[order].reshape(-1, 1)
        out = self.shared_expert(t).scatter_add(dim=0, index=token_indices, src=self.experts(routed, counts))
        return out.view_as(x)


class SparseDispatcherMoE(nn.Module):
    """Research code's sparse dispatcher: gates scattered to ``[T, E]``, ``nonzero`` sorted by expert, part sizes
    on the host, rows split, expert outputs concatenated, times their gates, ``index_add`` back; the noisy gate
    draws its noise only in training."""

    def __init__(self):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(HIDDEN, EXPERTS))
        self.w_noise = nn.Parameter(torch.empty(HIDDEN, EXPERTS))
        self.experts = nn.ModuleList(GeluExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        logits = t @ self.w_gate
        if self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(t @ self.w_noise)
        top_logits, top_indices = logits.topk(TOP_K, dim=1)
        gates = torch.zeros_like(logits).scatter(1, top_indices, F.softmax(top_logits, dim=1))
        sorted_experts, index_sorted = torch.nonzero(gates).sort(0)
        _, expert_index = sorted_experts.split(1, dim=1)
        batch_index = torch.nonzero(gates)[index_sorted[:, 1], 0]
        part_sizes = (gates > 0).sum(0).tolist()
        nonzero_gates = torch.gather(gates[batch_index], 1, expert_index)
        inputs = torch.split(t[batch_index], part_sizes, dim=0)
        stitched = torch.cat([self.experts[i](inputs[i]) for i in range(EXPERTS)], 0).mul(nonzero_gates)
        return torch.zeros_like(t).index_add(0, batch_index, stitched).view_as(x)


class SparseSoftmaxRouter(nn.Module):
    """A tutorial router: the top-k logits kept, the rest ``-inf``, a softmax over all experts."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(HIDDEN, EXPERTS)

    def forward(self, x):
        logits = self.linear(x)
        top_logits, indices = logits.topk(TOP_K, dim=-1)
        sparse = torch.full_like(logits, float("-inf")).scatter(-1, indices, top_logits)
        return F.softmax(sparse, dim=-1), indices


class AnyMaskMoE(nn.Module):
    """A tutorial block: per expert, the tokens choosing it by ``(indices == i).any(-1)``, its gate read from the
    router's full softmax at column ``i``, ``final[mask] += ...``; Sequential experts with biases."""

    def __init__(self):
        super().__init__()
        self.router = SparseSoftmaxRouter()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, INTER), nn.ReLU(), nn.Linear(INTER, HIDDEN))
                                     for _ in range(EXPERTS))

    def forward(self, x):
        gating, indices = self.router(x)
        final = torch.zeros_like(x)
        flat_x, flat_gating = x.view(-1, HIDDEN), gating.view(-1, EXPERTS)
        for i, expert in enumerate(self.experts):
            mask = (indices == i).any(dim=-1)
            flat_mask = mask.view(-1)
            if flat_mask.any():
                final[mask] += expert(flat_x[flat_mask]) * flat_gating[flat_mask, i].unsqueeze(1)
        return final


class LowRankExpert(nn.Module):
    """A low-rank adapter: ``B(A(x))``."""

    def __init__(self, rank: int = 4):
        super().__init__()
        self.lora_A = nn.Linear(HIDDEN, rank, bias=False)
        self.lora_B = nn.Linear(rank, HIDDEN, bias=False)

    def forward(self, x):
        return self.lora_B(self.lora_A(x))


class LowRankExpertsMoE(nn.Module):
    """A mixture of LoRA experts: a base Linear every token goes through, plus its top-k adapters' outputs
    (``index_add`` out of place)."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(HIDDEN, HIDDEN)
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(LowRankExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, chosen = torch.topk(self.gate(t).softmax(dim=-1), TOP_K, dim=-1)
        out = self.base(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out = out.index_add(0, token, weights[token, slot, None] * expert(t[token]))
        return out.view_as(x)


class InputScaledExpert(nn.Module):
    """An expert handed its rows and their routing weights, which scale its input (no biases)."""

    def __init__(self, dim: int = HIDDEN, inter: int = INTER):
        super().__init__()
        self.up = nn.Linear(dim, inter, bias=False)
        self.down = nn.Linear(inter, dim, bias=False)

    def forward(self, x, weights):
        return self.down(F.silu(self.up(x * weights)))


class WeightsHandedInMoE(nn.Module):
    """A user's block handing each expert its routing weights: ``expert(rows, weights)``, the weights required."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(InputScaledExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, chosen = torch.topk(torch.sigmoid(self.gate(t)), TOP_K, dim=-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(t[token], weights[token, slot, None]))
        return out.view_as(x)


class DenseOwnWeightsMoE(nn.Module):
    """An inference engine's torch-native fallback: the block's own ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` applied
    to every token for every expert in turn, each output weighted by ``(topk_weights * (topk_ids == e)).sum(-1)``
    (zero where the expert was not chosen)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w13 = nn.Parameter(torch.empty(EXPERTS, 2 * INTER, HIDDEN))
        self.w2 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        topk_weights, topk_ids = torch.topk(self.gate(t).softmax(dim=-1), TOP_K, dim=-1)
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(t)
        for e in range(EXPERTS):
            weight = (topk_weights * (topk_ids == e)).sum(dim=-1, keepdim=True)
            gate, up = (t @ self.w13[e].t()).chunk(2, dim=-1)
            out = out + (F.silu(gate) * up) @ self.w2[e].t() * weight
        return out.view_as(x)



class IndexAddCapacityMoE(nn.Module):
    """A research library's torch path: softmax gate, top-2, each choice's place in its expert by a cumulative sum
    (first choices before second ones), token rows ``index_add_``-ed into an ``[E * C, H]`` buffer (a capacity of
    ``ceil(k * T / E)``: choices past it are dropped), contracted with the block's own ``[E, H, I]``/``[E, I, H]``
    weights and ``[E, 1, d]`` biases by ``torch.matmul``, read back by ``expert * C + place`` times the gate."""

    def __init__(self):
        super().__init__()
        self.wg = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.fc1_w = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.fc1_b = nn.Parameter(torch.empty(EXPERTS, 1, INTER))
        self.fc2_w = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))
        self.fc2_b = nn.Parameter(torch.empty(EXPERTS, 1, HIDDEN))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        gates, chosen = torch.topk(F.softmax(self.wg(t), dim=-1), TOP_K, dim=-1)
        capacity = math.ceil(TOP_K * t.shape[0] / EXPERTS)
        places, taken = [], torch.zeros(EXPERTS, dtype=torch.long)
        for j in range(TOP_K):
            hits = F.one_hot(chosen[:, j], EXPERTS)
            places.append(((torch.cumsum(hits, dim=0) - 1 + taken) * hits).sum(-1))
            taken = taken + hits.sum(0)
        buffer = torch.zeros(EXPERTS * capacity, HIDDEN, dtype=t.dtype)
        for j in range(TOP_K):
            kept = places[j] < capacity
            buffer.index_add_(0, (chosen[:, j] * capacity + places[j])[kept], t[kept])
        h = F.relu(torch.matmul(buffer.view(EXPERTS, capacity, HIDDEN), self.fc1_w) + self.fc1_b)
        h = (torch.matmul(h, self.fc2_w) + self.fc2_b).reshape(EXPERTS * capacity, HIDDEN)
        out = torch.zeros_like(t)
        for j in range(TOP_K):
            kept = (places[j] < capacity)[:, None]
            rows = h[chosen[:, j] * capacity + places[j].clamp(max=capacity - 1)]
            out = out + torch.where(kept, rows * gates[:, j:j + 1], 0)
        return out.view_as(x)


class RankedBufferMoE(nn.Module):
    """A small-GPT MoE: softmax over the top-k logits, each token's row written into ``[E, T, H]`` at (its
    expert, its rank among that expert's tokens), ``torch.bmm`` with the block's own ``[E, H, 4H]`` and
    ``[E, 4H, H]`` weights, GELU between, outputs read back at the same pairs."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.c_fc = nn.Parameter(torch.empty(EXPERTS, HIDDEN, 4 * HIDDEN))
        self.c_proj = nn.Parameter(torch.empty(EXPERTS, 4 * HIDDEN, HIDDEN))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        logits = self.router(t)
        top, chosen = logits.topk(TOP_K, dim=-1)
        probs = torch.full_like(logits, float("-inf")).scatter(-1, chosen, top).softmax(-1)
        hits = F.one_hot(chosen, EXPERTS)  # [T, k, E]
        ranks = (torch.cumsum(hits.reshape(-1, EXPERTS), dim=0) - 1).reshape(hits.shape)
        ranks = (ranks * hits).sum(-1)
        batches = torch.zeros(EXPERTS, t.shape[0], HIDDEN, dtype=t.dtype)
        for j in range(TOP_K):
            batches[chosen[:, j], ranks[:, j]] = t
        out = torch.bmm(F.gelu(torch.bmm(batches, self.c_fc)), self.c_proj)
        y = torch.zeros_like(t)
        for j in range(TOP_K):
            y = y + out[chosen[:, j], ranks[:, j]] * probs.gather(1, chosen[:, j:j + 1])
        return y.view_as(x)


class BiasedSigmoidRouter(nn.Module):
    """Megatron-Core-style router in float32: sigmoid scores, experts chosen on the scores plus an
    ``expert_bias`` buffer (aux-loss-free balancing), the unbiased scores of the chosen renormalised; returns
    dense ``[tokens, experts]`` probabilities and a boolean routing map."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(EXPERTS, HIDDEN))
        self.register_buffer("expert_bias", torch.zeros(EXPERTS))

    def forward(self, t):
        scores = torch.sigmoid(F.linear(t.float(), self.weight.float()))
        chosen = torch.topk(scores + self.expert_bias, TOP_K, dim=1).indices
        probs = scores.gather(1, chosen)
        probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        routing_map = torch.zeros_like(scores, dtype=torch.int32).scatter(1, chosen, 1).bool()
        return torch.zeros_like(scores).scatter(1, chosen, probs), routing_map


class SequentialLocalExperts(nn.Module):
    """Megatron-style sequential MLP: a list of expert modules, each run on its piece of the permuted rows
    (split by the host list of tokens per expert); returns ``(output, bias)`` with no bias."""

    def __init__(self):
        super().__init__()
        self.local_experts = nn.ModuleList(GeluExpert() for _ in range(EXPERTS))

    def forward(self, permuted, tokens_per_expert):
        pieces = torch.split(permuted, tokens_per_expert.tolist())
        return torch.cat([expert(rows) for expert, rows in zip(self.local_experts, pieces)]), None


class GatherPermuteMoE(nn.Module):
    """Training framework (Megatron-Core style): ``[seq, batch, hidden]``; tokens permuted by the routing map
    (``masked_select`` of token numbers, rows taken by ``torch.gather`` with the numbers expanded over the
    features: each token once per chosen expert), the sequential experts, ``scatter_add_`` back; returns
    ``(output, None)``."""

    def __init__(self):
        super().__init__()
        self.router = BiasedSigmoidRouter()
        self.experts = SequentialLocalExperts()

    def forward(self, hidden_states):
        t = hidden_states.view(-1, hidden_states.shape[-1])
        probs, routing_map = self.router(t)
        map_t = routing_map.T.contiguous()
        numbers = torch.arange(t.shape[0], device=t.device).unsqueeze(0).expand(EXPERTS, -1).masked_select(map_t)
        spread = numbers.view(-1, 1).expand(-1, t.shape[-1])
        out, _ = self.experts(torch.gather(t, 0, spread), routing_map.sum(dim=0))
        out = out * probs.T.contiguous().masked_select(map_t).unsqueeze(-1).to(out.dtype)
        return torch.zeros_like(t).scatter_add_(0, spread, out).view(hidden_states.shape), None


class CountedProjection(nn.Module):
    """One projection of every expert, ``weight [E, out, in]`` and ``bias [E, out]``, run on rows sorted by
    expert: expert ``e`` takes the next ``int(counts[e])`` rows."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(EXPERTS, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(EXPERTS, out_features))

    def forward(self, rows, counts):
        outputs, start = [], 0
        for e in range(EXPERTS):
            end = start + int(counts[e])
            outputs.append(F.linear(rows[start:end], self.weight[e], self.bias[e]))
            start = end
        return torch.cat(outputs)


class CountedMLP(nn.Module):
    """An experts module holding nothing but two counted projections, GELU between."""

    def __init__(self):
        super().__init__()
        self.htoh4 = CountedProjection(HIDDEN, INTER)
        self.h4toh = CountedProjection(INTER, HIDDEN)

    def forward(self, rows, counts):
        return self.h4toh(F.gelu(self.htoh4(rows, counts)), counts)


class IndexCopyBmmMoE(nn.Module):
    """FastMoE-style pure-torch layer: a biased gate, top-k of the logits (unsorted), softmax over the k; the
    flat choices sorted (stable), counts by bincount on the host; rows taken by ``index_select``, the experts
    module called with (rows, counts), its outputs put back in choice order by ``index_copy_`` and combined by
    ``bmm`` of ``[T, 1, k]`` scores with ``[T, k, H]`` outputs."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS)
        self.experts = CountedMLP()

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        top, chosen = torch.topk(self.gate(t), TOP_K, dim=-1, sorted=False)
        scores = top.softmax(dim=-1)
        order = torch.argsort(chosen.flatten(), stable=True)
        counts = torch.bincount(chosen.flatten(), minlength=EXPERTS).cpu()
        out = self.experts(t.index_select(0, order // TOP_K), counts)
        slots = torch.zeros(t.shape[0] * TOP_K, HIDDEN, dtype=out.dtype).index_copy_(0, order, out)
        return torch.bmm(scores.unsqueeze(1), slots.view(-1, TOP_K, HIDDEN)).view_as(x)


class ChunkedRoutingMoE(nn.Module):
    """An inference engine bounding the memory of one pass: the tokens routed and run three at a time, each chunk
    with a top-k of its own (softmax, renormalised), experts on the rows ``where`` picks, ``index_add_`` back."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, x):
        parts = []
        for chunk in torch.split(x.reshape(-1, HIDDEN), 3):
            weights, indices = _softmax_topk(self.gate(chunk), TOP_K)
            out = torch.zeros_like(chunk)
            for e, expert in enumerate(self.experts):
                token, slot = torch.where(indices == e)
                out.index_add_(0, token, expert(chunk[token]) * weights[token, slot, None])
            parts.append(out)
        return torch.cat(parts).view_as(x)


class GroupedCapacityMoE(nn.Module):
    """Mesh-TensorFlow/GShard-style groups: each sequence a group of tokens with a capacity of its own per expert
    (``ceil(k * S / E)``, choices past it dropped); first choices take their expert's slots in token order, second
    choices the slots after every first one; dispatch ``[G, S, E, C]``, ``einsum("gsec,gsm->egcm")``, experts on
    ``[G, C, M]``, combine by ``einsum("gsec,egcm->gsm")``. The router runs in float32."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(GeluExpert() for _ in range(EXPERTS))

    def forward(self, x):
        probs = self.router(x.float()).softmax(dim=-1)
        top, chosen = probs.topk(TOP_K, dim=-1)
        capacity = math.ceil(TOP_K * x.shape[1] / EXPERTS)
        dispatch = combine = 0
        taken = torch.zeros(x.shape[0], 1, EXPERTS, dtype=torch.long)
        for j in range(TOP_K):
            mask = F.one_hot(chosen[..., j], EXPERTS)
            position = (torch.cumsum(mask, dim=1) - 1 + taken) * mask
            kept = mask * (position < capacity)
            taken = taken + mask.sum(dim=1, keepdim=True)
            slot = F.one_hot(position.clamp(max=capacity - 1), capacity) * kept.unsqueeze(-1)
            dispatch = dispatch + slot
            combine = combine + slot * top[..., j, None, None]
        inputs = torch.einsum("gsec,gsm->egcm", dispatch.to(x.dtype), x)
        outputs = torch.stack([expert(inputs[e]) for e, expert in enumerate(self.experts)])
        return torch.einsum("gsec,egcm->gsm", combine.to(x.dtype), outputs)


class HistcRouter3(nn.Module):
    """A training framework's router module: softmax, top-k, and each expert's row count by ``histc``; returns
    ``(weights, indices, counts)``."""

    def __init__(self):
        super().__init__()
        self.w_score = nn.Linear(HIDDEN, EXPERTS, bias=False)

    def forward(self, t):
        weights, indices = self.w_score(t).softmax(dim=-1).topk(TOP_K, dim=-1)
        counts = torch.histc(indices.flatten().float(), bins=EXPERTS, min=0, max=EXPERTS - 1)
        return weights, indices, counts.long()


class BinnedExperts(nn.Module):
    """Packed ``[E, H, I]`` w1/w3 and ``[E, I, H]`` w2 run on rows sorted by expert, expert ``e`` on the slice
    between the running counts ``bins[e - 1]`` and ``bins[e]`` (0-d tensors), written into a preallocated output."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.w3 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.w2 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))

    def forward(self, rows, bins):
        out = torch.empty_like(rows)
        for e in range(EXPERTS):
            start, end = (bins[e - 1] if e else 0), bins[e]
            if start == end:
                continue
            h = rows[start:end]
            out[start:end] = (F.silu(h @ self.w1[e]) * (h @ self.w3[e])) @ self.w2[e]
        return out


class BinnedDroplessMoE(nn.Module):
    """Training framework (OLMo-core style) dropless MoE: the router's counts turned into bins by ``cumsum``,
    the flat choices sorted (stable), each row's token by integer division, weighted rows ``index_add_``-ed back."""

    def __init__(self):
        super().__init__()
        self.router = HistcRouter3()
        self.experts = BinnedExperts()

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, indices, counts = self.router(t)
        order = indices.flatten().argsort(stable=True)
        token = order // TOP_K
        out = self.experts(t[token], torch.cumsum(counts, dim=0)) * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(t).index_add_(0, token, out).view_as(x)


class DenseBufferMoE(nn.Module):
    """A user's block: the routing as a dense ``[T, E]`` weight matrix (``scatter``), each expert's outputs
    written into a zero ``[E, T, H]`` buffer at its rows, the buffer combined by ``einsum("te,eth->th")``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, indices = self.gate(t).softmax(-1).topk(TOP_K, dim=-1)
        dense = torch.zeros(t.shape[0], EXPERTS, dtype=t.dtype).scatter(1, indices, weights)
        buffer = t.new_zeros(EXPERTS, t.shape[0], HIDDEN)
        for e, expert in enumerate(self.experts):
            rows = (dense[:, e] > 0).nonzero().squeeze(-1)
            buffer[e, rows] = expert(t[rows])
        return torch.einsum("te,eth->th", dense, buffer).view_as(x)


class PresentExpertsMoE(nn.Module):
    """A user's block: the flat choices sorted (``torch.sort``, stable), rows split by ``unique_consecutive``
    counts (only the experts some row chose), each part run by ``experts[int(e)]`` for its expert number."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, indices = self.gate(t).softmax(-1).topk(TOP_K, dim=-1)
        chosen, order = torch.sort(indices.flatten(), stable=True)
        present, counts = torch.unique_consecutive(chosen, return_counts=True)
        parts = t[order // TOP_K].split(counts.tolist())
        out = torch.cat([self.experts[int(e)](part) for e, part in zip(present, parts)])
        out = out * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(t).index_add_(0, order // TOP_K, out).view_as(x)


class HiddenScaledExperts(nn.Module):
    """Packed ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` called with ``(rows, ids, weights)``: the
    routing weight scales the hidden activation, before the down projection; a loop over ``ids.unique()``."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(EXPERTS, 2 * INTER, HIDDEN))
        self.down_proj = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))

    def forward(self, t, ids, weights):
        out = torch.zeros_like(t)
        for e in ids.unique():
            token, slot = torch.where(ids == e)
            gate, up = F.linear(t[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            out.index_add_(0, token, F.linear(F.silu(gate) * up * weights[token, slot, None], self.down_proj[e]))
        return out


class HiddenScaledMoE(nn.Module):
    """A block handing its packed experts the routing weights, which they apply before the down projection."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = HiddenScaledExperts()

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, indices = self.gate(t).softmax(-1).topk(TOP_K, dim=-1)
        return self.experts(t, indices, weights).view_as(x)


class _IdentityAllToAll(torch.autograd.Function):
    """Expert parallelism's all-to-all on one rank: the rows as they are (an autograd Function all the same)."""

    @staticmethod
    def forward(ctx, rows):
        return rows

    @staticmethod
    def backward(ctx, grad):
        return grad


class OneRankMoE(nn.Module):
    """Training framework code with expert parallelism left in on one rank: tokens and outputs pass through an
    identity all-to-all ``autograd.Function``, the local experts numbered from ``rank * local`` (0 here)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))
        self.ep_rank, self.ep_size = 0, 1

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, indices = self.gate(t).softmax(-1).topk(TOP_K, dim=-1)
        local = EXPERTS // self.ep_size
        t = _IdentityAllToAll.apply(t)
        out = torch.zeros_like(t)
        for i in range(local):
            token, slot = torch.where(indices == self.ep_rank * local + i)
            out[token] += weights[token, slot, None] * self.experts[i](t[token])
        return _IdentityAllToAll.apply(out).view_as(x)


class LookupTableMoE(nn.Module):
    """Each token's experts' weights looked up by ``F.embedding`` in the packed ``[E, I, H]`` / ``[E, H, I]``
    weights flattened to ``[E, I * H]`` rows, put back in shape, contracted per slot by einsum, GELU between."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w_in = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))
        self.w_out = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, indices = self.gate(t).softmax(-1).topk(TOP_K, dim=-1)
        w_in = F.embedding(indices, self.w_in.view(EXPERTS, -1)).view(*indices.shape, INTER, HIDDEN)
        w_out = F.embedding(indices, self.w_out.view(EXPERTS, -1)).view(*indices.shape, HIDDEN, INTER)
        h = F.gelu(torch.einsum("tkih,th->tki", w_in, t))
        y = torch.einsum("tkhi,tki->tkh", w_out, h)
        return (y * weights.unsqueeze(-1)).sum(1).view_as(x)


class CentroidRoutedMoE(nn.Module):
    """No learned router: each token goes to the experts whose fixed centroid (a buffer, one per expert) is
    nearest, ``torch.cdist`` to the centroids, top-k of the negative distances, softmax over the k."""

    def __init__(self):
        super().__init__()
        self.register_buffer("centroids", torch.empty(EXPERTS, HIDDEN))
        self.experts = nn.ModuleList(GeluExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        closeness, indices = (-torch.cdist(t, self.centroids)).topk(TOP_K, dim=-1)
        return _loop_experts(t, closeness.softmax(dim=-1), indices, self.experts).view_as(x)


class ChunkedGLU(ExpertGLU):
    """``ExpertGLU``'s weights, viewed ``[E, I, H]``, cut into one ``[1, I, H]`` piece per expert by ``chunk`` and
    each piece squeezed, the piece of the expert asked for applied."""

    def forward(self, x, expert):
        w1, v1, w2 = ([piece.squeeze(0) for piece in w.view(EXPERTS, INTER, HIDDEN).chunk(EXPERTS, dim=0)][expert]
                      for w in (self.w1, self.v1, self.w2))
        return (F.silu(x.matmul(w1.t())) * x.matmul(v1.t())).matmul(w2)


class ChunkedExpertsMoE(HostListMoE):
    """The host-token-lists block (its router module, a one-hot mask, ``tolist``, ``index_add_``) over the chunked
    GLU."""

    def __init__(self):
        super().__init__()
        self.experts.mlp = ChunkedGLU()


class EmbeddingTablesMoE(nn.Module):
    """Each expert's matrices flattened into a row of an ``nn.Embedding`` (``[E, I * H]``, ``[E, H * I]``), each
    token's experts' rows looked up by the module and put back in shape, contracted per slot by einsum, GELU
    between."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w_in = nn.Embedding(EXPERTS, INTER * HIDDEN)
        self.w_out = nn.Embedding(EXPERTS, HIDDEN * INTER)

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, indices = self.gate(t).softmax(-1).topk(TOP_K, dim=-1)
        h = F.gelu(torch.einsum("th,tkih->tki", t, self.w_in(indices).view(*indices.shape, INTER, HIDDEN)))
        y = torch.einsum("tki,tkhi->tkh", h, self.w_out(indices).view(*indices.shape, HIDDEN, INTER))
        return torch.einsum("tkh,tk->th", y, weights).view_as(x)


class QuantizableExperts(nn.Module):
    """Packed SwiGLU experts given ``(rows, ids)``: one token gathers its experts' weights and runs ``F.linear`` per
    slot; more tokens are sorted by expert (stable argsort of the flat ids, token = position // k), counted by
    ``histc`` over ``E + 1`` bins from -1, cut at the cumulative counts, and put back in choice order by the
    inverse permutation (``argsort`` of the order)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))
        self.w2 = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.w3 = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))

    def _mlp(self, rows, e):
        return F.linear(F.silu(F.linear(rows, self.w1[e])) * F.linear(rows, self.w3[e]), self.w2[e])

    def forward(self, x, ids):
        if x.shape[0] == 1:
            return torch.stack([self._mlp(x, e) for e in ids[0]], dim=1)
        order = ids.view(-1).argsort(stable=True)
        tokens = order.div(ids.shape[-1]).floor().long()
        bounds = torch.histc(ids.float(), bins=EXPERTS + 1, min=-1, max=EXPERTS).cumsum(0).long().tolist()
        out = torch.cat([self._mlp(x[tokens[bounds[e]:bounds[e + 1]]], e) for e in range(EXPERTS)])
        return out[order.argsort()].view(x.shape[0], ids.shape[-1], -1)


class QuantizableMoE(nn.Module):
    """A quantization library's MoE: softmax, top-k renormalised, the experts module given (rows, ids), the slots'
    outputs combined by ``einsum("tai,ta->ti")``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.cond_ffn = QuantizableExperts()

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, ids = self.gate(t).softmax(dim=-1).topk(TOP_K, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return torch.einsum("tai,ta->ti", self.cond_ffn(t, ids), weights).view_as(x)


class CapacityBmmExperts(nn.Module):
    """Packed SwiGLU experts computing on ``[E, C, H]`` capacity buffers with ``torch.bmm`` (``[E, H, I]``
    weights, applied as ``x @ W``)."""

    def __init__(self):
        super().__init__()
        self.wi_gate = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.wi_up = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.wo = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))

    def forward(self, x):
        return torch.bmm(F.silu(torch.bmm(x, self.wi_gate)) * torch.bmm(x, self.wi_up), self.wo)


class MatmulDispatchMoE(nn.Module):
    """Top-2 into capacity slots (no token dropped: twice the tokens per expert), the ``[T, E, C]`` combine
    weights' 0/1 mask permuted to ``[E, C, T]`` and multiplied with the tokens (``matmul``) to dispatch, the packed
    experts run on the buffers, the output a ``matmul`` of the combine weights flattened to ``[T, E * C]`` with the
    outputs flattened to ``[E * C, H]``."""

    def __init__(self):
        super().__init__()
        self.gate_weight = nn.Parameter(torch.empty(EXPERTS, HIDDEN))
        self.experts = CapacityBmmExperts()

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        tokens, capacity = t.shape[0], 2 * t.shape[0]
        weights, ids = F.linear(t, self.gate_weight).softmax(dim=-1).topk(TOP_K, dim=-1)
        combine, filled = t.new_zeros(tokens, EXPERTS, capacity), torch.zeros(EXPERTS, dtype=torch.long)
        for slot in range(TOP_K):
            mask = F.one_hot(ids[:, slot], EXPERTS)
            position = ((filled + mask.cumsum(0) - 1) * mask).sum(-1)
            filled = filled + mask.sum(0)
            combine = combine + weights[:, slot, None, None] * mask[..., None] * F.one_hot(position, capacity)[:, None]
        dispatched = torch.matmul(combine.bool().to(t.dtype).permute(1, 2, 0), t)
        outputs = self.experts(dispatched)
        return torch.matmul(combine.view(tokens, -1), outputs.view(EXPERTS * capacity, HIDDEN)).view_as(x)


def balanced(logits: torch.Tensor, tolerance: float = 1e-4) -> torch.Tensor:
    """Sinkhorn's balancing of ``exp(logits)``: rows and columns rescaled in turn until the column scales move by
    less than ``tolerance`` on average (a loop whose length depends on the values)."""
    cost = logits.exp()
    rows, cols = cost.new_ones(cost.shape[0]), cost.new_ones(cost.shape[1])
    change = math.inf
    while change > tolerance:
        rows = 1 / (rows.numel() * ((cols * cost).sum(1) + 1e-8))
        updated = 1 / (cols.numel() * ((rows[:, None] * cost).sum(0) + 1e-8))
        change, cols = float((updated - cols).abs().mean()), updated
    return cols * cost * rows[:, None]


class SinkhornRoutedMoE(nn.Module):
    """Sinkhorn routing at inference: the top-k of the balanced logits (without gradients), the weights the
    sigmoid of the raw logits at those experts, a where loop."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        logits = self.router(t)
        with torch.no_grad():
            indices = balanced(logits.float()).topk(TOP_K, dim=-1).indices
        return _loop_experts(t, logits.sigmoid().gather(1, indices), indices, self.experts).view_as(x)


class GateUpExpert(nn.Module):
    """An expert's gate and up projections only: its down projection is the block's, shared by every expert."""

    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)

    def forward(self, x):
        return F.silu(self.gate_proj(x)) * self.up_proj(x)


class SharedDownMoE(nn.Module):
    """Experts with their own gate and up projections; the routing-weighted sum of their activations goes through
    one down projection every expert shares."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(GateUpExpert() for _ in range(EXPERTS))
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, indices = self.gate(t).softmax(-1).topk(TOP_K, dim=-1)
        inner = t.new_zeros(t.shape[0], INTER)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(indices == e)
            inner[token] += weights[token, slot, None] * expert(t[token])
        return self.down_proj(inner).view_as(x)


# ---------------------------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------------------------


def _token_types(batch: int, seq: int, generator: torch.Generator) -> dict:
    return {"token_type_ids": torch.randint(0, 2, (batch, seq), generator=generator)}


def _tokens_of_its_modality(path: str, kwargs: dict) -> int | None:
    """``ModalityMoE``: the tokens of the modality whose experts hold the Linear at ``path`` (text 0, image 1;
    None: not one of its experts)."""
    kind = next((kind for kind, name in enumerate(("text_experts.", "image_experts.")) if name in path), None)
    return None if kind is None else int((kwargs["token_type_ids"] == kind).sum())


class CapacityTop1Gate(nn.Module):
    """A training framework's top-1 gate: float32 logits, softmax, argmax; each expert keeps at most ``capacity``
    of its tokens, picked by a top-k over the tokens of a randomly scaled one-hot mask (random token selection),
    where the capacity is the largest count, so no token is dropped (with a ``capacity_factor``: that many times
    the even share, the tokens past it dropped at random). Returns (aux loss, combine [S, E, C], dispatch mask,
    counts)."""

    def __init__(self, capacity_factor: float | None = None):
        super().__init__()
        self.wg = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.capacity_factor = capacity_factor

    def forward(self, tokens, used_token=None):
        gates = F.softmax(self.wg(tokens.float()), dim=1)
        mask = F.one_hot(gates.argmax(dim=1), EXPERTS)
        if used_token is not None:
            mask = mask * used_token[:, None]
        counts = mask.sum(dim=0)
        capacity = int(counts.max()) if self.capacity_factor is None else \
            math.ceil(self.capacity_factor * tokens.shape[0] / EXPERTS)
        picked = torch.topk(mask * torch.rand(mask.shape), k=capacity, dim=0).indices
        mask = mask * torch.zeros_like(mask).scatter_(0, picked, 1)
        slot = ((mask.cumsum(dim=0) - 1) * mask).sum(dim=1)
        combine = torch.einsum("se,sc->sec", gates * mask, F.one_hot(slot, capacity).float())
        aux = EXPERTS * (gates.mean(dim=0) * mask.float().mean(dim=0)).sum()
        return aux, combine, combine.bool(), counts


class ChunkRunExperts(nn.Module):
    """Experts in a list, each run on its chunk of the dispatched ``[ranks, E, C, H]`` tensor."""

    def __init__(self):
        super().__init__()
        self.local_experts = nn.ModuleList(GeluExpert() for _ in range(EXPERTS))

    def forward(self, dispatched):
        chunks = dispatched.chunk(len(self.local_experts), dim=1)
        return torch.cat([expert(chunk) for chunk, expert in zip(chunks, self.local_experts)], dim=1)


class VariadicMoELayer(nn.Module):
    """A training framework's MoE layer whose forward takes ``*inputs`` (the hidden states, then an optional
    token mask), dispatching by einsum ``sec,sm->ecm`` and combining by ``sec,ecm->sm``; the aux loss and counts
    kept on the module."""

    def __init__(self):
        super().__init__()
        self.gate = CapacityTop1Gate()
        self.experts = ChunkRunExperts()
        self.aux, self.counts = None, None

    def forward(self, *inputs):
        hidden = inputs[0]
        tokens = hidden.reshape(-1, hidden.shape[-1])
        self.aux, combine, dispatch, self.counts = self.gate(tokens, inputs[1] if len(inputs) > 1 else None)
        dispatched = torch.einsum("sec,sm->ecm", dispatch.type_as(hidden), tokens)
        out = self.experts(dispatched.reshape(1, EXPERTS, -1, tokens.shape[-1]))
        out = torch.einsum("sec,ecm->sm", combine.type_as(hidden), out.reshape(EXPERTS, -1, tokens.shape[-1]))
        return out.reshape(hidden.shape)


class VariadicWrapperMoE(nn.Module):
    """The user-facing wrapper around ``VariadicMoELayer``: named inputs, returns (output, aux loss, counts)."""

    def __init__(self):
        super().__init__()
        self.moe_layer = VariadicMoELayer()

    def forward(self, hidden_states, used_token=None):
        out = self.moe_layer(hidden_states, used_token)
        return out, self.moe_layer.aux, self.moe_layer.counts


class TensorParallelLinear(nn.Module):
    """A tensor-parallel Linear on one rank: ``(x Wᵀ, bias)`` with ``skip_bias_add`` (the caller adds the bias,
    fused with what follows), else ``(x Wᵀ + bias, None)``."""

    def __init__(self, fan_in: int, fan_out: int, skip_bias_add: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in))
        self.bias = nn.Parameter(torch.empty(fan_out))
        self.skip_bias_add = skip_bias_add

    def forward(self, x):
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None


class TensorParallelMLP(nn.Module):
    """An expert of ``TensorParallelLinear`` s: the first's bias added inside the GELU, the pair of the second
    returned as it comes."""

    def __init__(self):
        super().__init__()
        self.linear_fc1 = TensorParallelLinear(HIDDEN, INTER, skip_bias_add=True)
        self.linear_fc2 = TensorParallelLinear(INTER, HIDDEN, skip_bias_add=False)

    def forward(self, x):
        hidden, bias = self.linear_fc1(x)
        return self.linear_fc2(F.gelu(hidden + bias))


class SequentialTensorParallelMoE(nn.Module):
    """Training framework (Megatron-Core style, one rank): softmax top-k, renormalised; rows sorted by expert,
    split by host counts, each expert returning ``(output, bias or None)``, the bias added, the rows weighted and
    put back with ``index_add_``."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.local_experts = nn.ModuleList(TensorParallelMLP() for _ in range(EXPERTS))

    def forward(self, hidden_states):
        t = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, ids = self.router(t).softmax(dim=-1).topk(TOP_K, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        order = ids.reshape(-1).argsort(stable=True)
        token_of = order // TOP_K
        counts = torch.bincount(ids.reshape(-1), minlength=EXPERTS).tolist()
        outputs = []
        for rows, expert in zip(t[token_of].split(counts), self.local_experts):
            out, bias = expert(rows)
            outputs.append(out if bias is None else out + bias)
        weighted = torch.cat(outputs) * weights.reshape(-1)[order, None]
        return torch.zeros_like(t).index_add_(0, token_of, weighted).view_as(hidden_states)


class FlatMaskMoE(nn.Module):
    """A research library's MoE layer (fairseq style): ``forward(*inputs, padding_mask=None)`` over
    ``[seq, batch, hidden]``; top-2 of the softmax, renormalised, each choice a slot by a running count (capacity:
    every token fits); the ``[S, E, C]`` dispatch mask permuted to ``[E, C, S]``, viewed ``[E * C, S]`` and
    ``torch.mm`` -ed with the tokens; experts in a list on chunks; combined by ``mm`` of the combine weights viewed
    ``[S, E * C]`` with the outputs; returns ``(out, aux)``."""

    def __init__(self):
        super().__init__()
        self.wg = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(GeluExpert() for _ in range(EXPERTS))

    def forward(self, *inputs, padding_mask=None):
        x = inputs[0]
        tokens = x.reshape(-1, x.shape[-1])
        probs = self.wg(tokens).softmax(dim=-1)
        weights, ids = probs.topk(TOP_K, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        capacity = tokens.shape[0]
        combine, filled = tokens.new_zeros(capacity, EXPERTS, capacity), torch.zeros(EXPERTS, dtype=torch.long)
        for slot in range(TOP_K):
            chosen = F.one_hot(ids[:, slot], EXPERTS)
            place = ((filled + chosen.cumsum(dim=0) - 1) * chosen).sum(dim=-1)
            filled = filled + chosen.sum(dim=0)
            combine = combine + weights[:, slot, None, None] * chosen[..., None] * _slot_one_hot(place, capacity)[:, None]
        mask = combine.bool().to(tokens.dtype).permute(1, 2, 0)
        e, c, s = mask.size()
        dispatched = torch.mm(mask.view(e * c, s), tokens).reshape(1, e, c, -1)
        out = torch.cat([expert(chunk) for chunk, expert in zip(dispatched.chunk(e, dim=1), self.experts)], dim=1)
        combined = combine.view(s, e * c).mm(out.view(e * c, -1))
        aux = EXPERTS * (probs.mean(dim=0) * F.one_hot(ids[:, 0], EXPERTS).float().mean(dim=0)).sum()
        return combined.reshape(x.shape), aux


class PerTokenLoopMoE(nn.Module):
    """A tutorial's block: top-k of the logits, softmax over the k, then a loop over tokens and slots calling
    ``experts[int(ids[t, j])]`` on one token at a time (which expert runs is read on the host)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(GeluExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        top, ids = self.gate(t).topk(TOP_K, dim=-1)
        weights = top.softmax(dim=-1)
        out = torch.zeros_like(t)
        for token in range(t.shape[0]):
            for slot in range(TOP_K):
                out[token] += weights[token, slot] * self.experts[int(ids[token, slot])](t[token])
        return out.view_as(x)


class InPlaceScaledMoE(nn.Module):
    """Remote code of a hub model: the token rows (a view of the block's input) scaled in place by k before the
    experts (``x *= k``), each expert's output divided by k again; softmax top-k, renormalised, a where loop."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, hidden_states):
        rows = hidden_states.view(-1, hidden_states.shape[-1])
        weights, ids = self.gate(rows).softmax(dim=-1).topk(TOP_K, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        rows *= TOP_K
        out = torch.zeros_like(rows)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out[token] += weights[token, slot, None] * expert(rows[token]) / TOP_K
        return out.view_as(hidden_states)


class SlotCapacityMoE(nn.Module):
    """Research library MoE layer, flaxformer style: top-k slots numbered per expert by a cumulative sum over the
    k-major choices, each choice's slot read back by ``position.max(dim=-1).values``, the one-hot width taken from
    ``int(position.max()) + 1`` (neither max chooses experts), dispatch and combine einsums over ``[T, E, C]``, packed
    GELU experts. The capacity is the token count: no choice is dropped."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.wi = nn.Parameter(torch.empty(EXPERTS, HIDDEN, INTER))
        self.wo = nn.Parameter(torch.empty(EXPERTS, INTER, HIDDEN))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        probs = self.router(t).softmax(-1)
        gates, ids = probs.topk(TOP_K, dim=-1)
        mask = F.one_hot(ids, EXPERTS).transpose(0, 1).reshape(-1, EXPERTS)  # [k * T, E], the first choices first
        position = ((mask.cumsum(0) - 1) * mask).reshape(TOP_K, -1, EXPERTS).transpose(0, 1)  # [T, k, E]
        slot = position.max(dim=-1).values  # [T, k]
        slots = F.one_hot(slot, int(position.max()) + 1).to(t.dtype)  # [T, k, C]
        chosen = F.one_hot(ids, EXPERTS).to(t.dtype)  # [T, k, E]
        dispatch = torch.einsum("tke,tkc->tec", chosen, slots)
        combine = torch.einsum("tk,tke,tkc->tec", gates, chosen, slots)
        buffers = torch.einsum("tec,th->ech", dispatch, t)
        outputs = torch.einsum("eci,eih->ech", F.gelu(torch.einsum("ech,ehi->eci", buffers, self.wi)), self.wo)
        return torch.einsum("ech,tec->th", outputs, combine).view_as(x)


class BinnedScatterMoE(nn.Module):
    """Training framework grouped experts, MegaBlocks style in plain torch: choices sorted by expert, bins by the
    cumulative histc counts, each expert's rows gathered into an ``[E, C, H]`` buffer, one bmm pair over packed
    ``[E * I, H]`` weights, and each row written back in place into a ``[T * k, H]`` buffer (``out[rows] = ...``)
    summed over the k."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))
        self.w2 = nn.Parameter(torch.empty(EXPERTS * INTER, HIDDEN))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, experts = self.router(t).softmax(-1).topk(TOP_K, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).flatten()
        experts = experts.flatten()
        _, order = torch.sort(experts, stable=True)
        counts = torch.histc(experts.float(), bins=EXPERTS, min=0, max=EXPERTS - 1).long()
        ends, starts = counts.cumsum(0), counts.cumsum(0) - counts
        buffer = t.new_zeros(EXPERTS, int(counts.max()), HIDDEN)
        for e in range(EXPERTS):
            if counts[e]:
                buffer[e, :counts[e]] = t[order[starts[e]:ends[e]] // TOP_K]
        w1, w2 = self.w1.view(EXPERTS, INTER, HIDDEN), self.w2.view(EXPERTS, INTER, HIDDEN)
        outputs = torch.bmm(F.gelu(torch.bmm(buffer, w1.transpose(1, 2)), approximate="tanh"), w2)
        out = t.new_zeros(t.shape[0] * TOP_K, HIDDEN)
        for e in range(EXPERTS):
            if counts[e]:
                rows = order[starts[e]:ends[e]]
                out[rows] = outputs[e, :counts[e]] * weights[rows, None]
        return out.view(-1, TOP_K, HIDDEN).sum(1).view_as(x)


class SortedCopiesMoE(nn.Module):
    """A user's block: the choices sorted by expert, each choice's token copied (``t[order // k]``), the expert of
    each sorted row found by ``torch.bucketize`` over the cumulative counts, a mask loop over the copies, the
    weighted copies summed onto their tokens by ``scatter_reduce``."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, ids = self.gate(t).softmax(-1).topk(TOP_K, dim=-1)
        order = ids.reshape(-1).argsort(stable=True)
        token = order // TOP_K
        ends = torch.bincount(ids.reshape(-1), minlength=EXPERTS).cumsum(0)
        expert_of = torch.bucketize(torch.arange(order.numel()), ends, right=True)
        copies = t[token]
        y = torch.zeros_like(copies)
        for e, expert in enumerate(self.experts):
            rows = expert_of == e
            y[rows] = expert(copies[rows])
        y = y * weights.reshape(-1)[order, None]
        out = torch.zeros_like(t).scatter_reduce(0, token[:, None].expand(-1, HIDDEN), y, reduce="sum")
        return out.view_as(x)


class FlattenedOneHotMoE(nn.Module):
    """A user's block: ``x.flatten(0, 1)``, a gate matrix summed from ``F.one_hot`` of the top-k indices times their
    softmaxed logits, every expert on every token (``torch.stack``), combined by ``einsum('te,eth->th')``,
    ``unflatten`` back."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.flatten(0, 1)
        logits, ids = self.gate(t).topk(TOP_K, dim=-1)
        gates = (F.one_hot(ids, EXPERTS).to(t.dtype) * logits.softmax(-1).unsqueeze(-1)).sum(1)
        every = torch.stack([expert(t) for expert in self.experts])
        return torch.einsum("te,eth->th", gates, every).unflatten(0, x.shape[:2])


class HostListRowsMoE(nn.Module):
    """Remote code of a hub model copying an older transformers Mixtral: each expert's rows and slots read to
    Python lists (``top_x.tolist()``) and picked by them (``x[None, top_x_list]``), a dense residual MLP beside
    the experts (Arctic style), softmax then top-k, renormalised."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))
        self.residual_mlp = SwiGLUExpert()

    def forward(self, hidden_states):
        t = hidden_states.view(-1, HIDDEN)
        weights, selected = F.softmax(self.gate(t), dim=1, dtype=torch.float).topk(TOP_K, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(t.dtype)
        out = torch.zeros_like(t)
        mask = F.one_hot(selected, num_classes=EXPERTS).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, top_x = torch.where(mask[e])
            if top_x.shape[0] == 0:
                continue
            top_x_list, slot_list = top_x.tolist(), slot.tolist()
            rows = t[None, top_x_list].reshape(-1, HIDDEN)
            out.index_add_(0, top_x, expert(rows) * weights[top_x_list, slot_list, None])
        return (out + self.residual_mlp(t)).view_as(hidden_states)


class HistcCountsMoE(SizedExpertsMoE):
    """``expert_size_split`` with the counts made by ``torch.histc`` (floats, as grouped-GEMM code makes them) and
    handed to the projections as a tensor, which they turn into ints themselves."""

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        top_logits, top_experts = self.router(t).topk(TOP_K, dim=1)
        top_gates = top_logits.softmax(dim=1)
        counts = torch.histc(top_experts.flatten().float(), bins=EXPERTS, min=0, max=EXPERTS - 1)
        _, order = top_experts.flatten().sort(stable=True)
        token = order // TOP_K
        h, g = self.input_linear(t[token], counts).chunk(2, dim=-1)
        out = self.output_linear(F.silu(h) * g, counts) * top_gates.flatten()[order][:, None]
        return (torch.zeros_like(t).index_add(0, token, out) + self.bias).view_as(x)


class RowsBank(nn.Module):
    """One projection of every expert, ``[E, in, out]``, applied to rows sorted by expert and a tensor of counts."""

    def __init__(self, features_in: int, features_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(EXPERTS, features_in, features_out))

    def forward(self, rows, counts):
        parts = rows.split(counts.long().tolist())
        return torch.cat([part @ w for part, w in zip(parts, self.weight)])


class BankedMLP(nn.Module):
    """The experts of a layer: two banks (a fused gate/up, then down) around a GLU, given sorted rows and counts."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = RowsBank(HIDDEN, 2 * INTER), RowsBank(INTER, HIDDEN)

    def forward(self, rows, counts):
        up, gate = self.fc1(rows, counts).chunk(2, dim=-1)
        return self.fc2(up * F.silu(gate), counts)


class Permuter:
    """Not a module: a helper object keeping the sort order between ``permute`` and ``unpermute``."""

    def __init__(self, k: int):
        self.k = k

    def permute(self, t, indices):
        self.order = indices.flatten().argsort(stable=True)
        counts = torch.histc(indices.float(), bins=EXPERTS, min=0, max=EXPERTS - 1)
        return t.index_select(0, self.order // self.k), counts

    def unpermute(self, rows, scores):
        slots = torch.zeros(scores.numel(), rows.shape[-1], dtype=rows.dtype).index_copy(0, self.order, rows)
        return (slots.view(-1, self.k, rows.shape[-1]) * scores.unsqueeze(-1)).sum(dim=1)


class BanksBelowRouterMoE(nn.Module):
    """Remote code of a hub model (an older Aria): the layer holds the router, a permuting helper object and a shared
    MLP; its experts module holds the weight banks and is called with the sorted rows and their counts."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.permuter = Permuter(TOP_K)
        self.experts = BankedMLP()
        self.shared_experts = SwiGLUExpert()

    def forward(self, hidden_states):
        t = hidden_states.view(-1, HIDDEN)
        top_logits, indices = self.router(t).topk(TOP_K, dim=1)
        rows, counts = self.permuter.permute(t, indices)
        out = self.permuter.unpermute(self.experts(rows, counts), top_logits.softmax(dim=-1))
        return (out + self.shared_experts(t)).view_as(hidden_states)


class InPlaceBiasMoE(PackedEinsumMoE):
    """``PackedEinsumMoE`` with the second bias added in place (``t += b[idx]``, as the reference code writes it)
    and the first projection's output scaled in place before the activation."""

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        top = torch.topk(self.gate(t), k=self.experts_per_token, dim=-1, sorted=True)
        expert_weights, expert_indices = F.softmax(top.values, dim=1), top.indices
        h = torch.einsum("beck,bk->bec", self.mlp1_weight[expert_indices, ...], t)
        h += self.mlp1_bias[expert_indices, ...]
        h = _swiglu_clamped(h, self.alpha, self.limit)
        h = torch.einsum("beck,bek->bec", self.mlp2_weight[expert_indices, ...], h)
        h += self.mlp2_bias[expert_indices, ...]
        return torch.einsum("bec,be->bc", h, expert_weights).reshape(x.shape)


class DeepExpert(nn.Module):
    """An expert one Linear deeper than ``SwiGLUExpert``, twice as wide."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Linear(HIDDEN, 2 * INTER, bias=False)
        self.w_mid = nn.Linear(2 * INTER, 2 * INTER, bias=False)
        self.w_out = nn.Linear(2 * INTER, HIDDEN, bias=False)

    def forward(self, x):
        return self.w_out(F.gelu(self.w_mid(F.gelu(self.w_in(x)))))


class MixedExpertsMoE(nn.Module):
    """Users' own code: experts of two kinds in one list (the last one deeper and wider), a where loop."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList([*(SwiGLUExpert() for _ in range(EXPERTS - 1)), DeepExpert()])

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, chosen = self.gate(t).softmax(dim=-1).topk(TOP_K, dim=-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(t[token]) * weights[token, slot, None])
        return out.view_as(x)


class ListedGLUExperts(nn.Module):
    """Research code's experts kept as lists, one weight per expert each (gate, up and down ``nn.ParameterList`` s
    of ``[out, in]`` matrices), and applied to one expert's rows by ``F.linear`` with its entries."""

    def __init__(self):
        super().__init__()
        self.gate_weights = nn.ParameterList(nn.Parameter(torch.empty(INTER, HIDDEN)) for _ in range(EXPERTS))
        self.up_weights = nn.ParameterList(nn.Parameter(torch.empty(INTER, HIDDEN)) for _ in range(EXPERTS))
        self.down_weights = nn.ParameterList(nn.Parameter(torch.empty(HIDDEN, INTER)) for _ in range(EXPERTS))

    def forward(self, rows, expert):
        hidden = F.silu(F.linear(rows, self.gate_weights[expert])) * F.linear(rows, self.up_weights[expert])
        return F.linear(hidden, self.down_weights[expert])


class ListedDispatcher(nn.Module):
    """Each token's slots sorted by expert, split by counts read on the host, each group given to its expert with
    the expert's number, scaled by its scores and added back."""

    def __init__(self):
        super().__init__()
        self.experts = ListedGLUExperts()

    def forward(self, t, expert_ids, expert_scores):
        flat = expert_ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=EXPERTS).tolist()
        tokens = (order // expert_ids.shape[1]).split(counts)
        scores = expert_scores.reshape(-1)[order].split(counts)
        out = torch.zeros_like(t)
        for expert, (token, score) in enumerate(zip(tokens, scores)):
            if token.numel():
                out.index_add_(0, token, self.experts(t[token], expert) * score[:, None])
        return out


class ListedGate(nn.Module):
    """A gate module returning its choice as a dict: the top-k of the logits, softmax over those."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, EXPERTS, bias=False)

    def forward(self, t):
        logits, ids = self.proj(t).topk(TOP_K, dim=-1)
        return {"expert_ids": ids, "expert_scores": logits.softmax(dim=-1)}


class ListedExpertsMoE(nn.Module):
    """Research code in the style of LLaMA-MoE: a gate module, then a dispatcher holding experts whose weights are
    ``nn.ParameterList`` s (one weight per expert), called with the gate's dict."""

    def __init__(self):
        super().__init__()
        self.gate = ListedGate()
        self.dispatcher = ListedDispatcher()

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        return self.dispatcher(t, **self.gate(t)).view_as(x)


class SlicedBankExperts(GroupedExperts):
    """``GroupedExperts`` run as a loop over the experts' row segments, each expert's matrix taken as a slice of
    length one (``w[e:e + 1]``, ``w.narrow(0, e, 1)``) and applied by ``bmm`` on ``rows[None]``."""

    def forward(self, rows, counts):
        outs = []
        for e, part in enumerate(torch.split(rows, counts.tolist())):
            part = part.unsqueeze(0)
            h = F.silu(torch.bmm(part, self.w1[e:e + 1])) * torch.bmm(part, self.w3.narrow(0, e, 1))
            outs.append(torch.bmm(h, self.w2[e:e + 1]).squeeze(0))
        return torch.cat(outs)


class SlicedBankMoE(GroupedMatmulMoE):
    """``GroupedMatmulMoE`` with ``SlicedBankExperts``."""

    def __init__(self):
        super().__init__()
        self.experts = SlicedBankExperts()


class PaddingMaskedMoE(nn.Module):
    """Users' own code: ``forward(hidden_states, attention_mask=None)``, the routing weights of padded positions
    zeroed by the mask (their rows still reach the experts), a where loop over a ModuleList."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, hidden_states, attention_mask=None):
        t = hidden_states.reshape(-1, HIDDEN)
        weights, chosen = self.gate(t).softmax(dim=-1).topk(TOP_K, dim=-1)
        if attention_mask is not None:
            weights = weights * attention_mask.reshape(-1, 1).to(weights.dtype)
        return _loop_experts(t, weights, chosen, self.experts).view_as(hidden_states)


def _right_padding(batch: int, seq: int, generator: torch.Generator) -> dict:
    """An attention mask whose first sequence ends in two padded positions (where it has more than two)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    if seq > 2:
        mask[0, -2:] = 0
    return {"attention_mask": mask}


@dataclass(frozen=True)
class CorpusEntry:
    """One block of the corpus.

    Attributes:
        name: identifier.
        style: the kind of public code it imitates, in words.
        patterns: numbers of issue 19's code patterns (1-8) it exercises; empty for the cases listed
            outside that list (non-Linear experts, blocks inside decoder layers) and the baselines.
        make: builds the module (uninitialised); :meth:`build` initialises it.
        num_experts: routing choices (identity and zero experts included).
        top_k: experts each token is routed to.
        blocks: paths of the MoE blocks inside the module (``""``: the module is the block).
        seq_first: inputs are ``[seq, batch, hidden]`` (else ``[batch, seq, hidden]``).
        extra_inputs: keyword inputs beyond the hidden states, from ``(batch, seq, generator)``.
        reach: for a block with several expert sets, the tokens that reach the set of the expert Linear at a path,
            from the block's keyword inputs (what that Linear must see with calibration on); None (the function,
            or what it returns for a path): every token.
    """

    name: str
    style: str
    patterns: tuple[int, ...]
    make: Callable[[], nn.Module]
    num_experts: int = EXPERTS
    top_k: int = TOP_K
    blocks: tuple[str, ...] = ("",)
    seq_first: bool = False
    extra_inputs: Callable[[int, int, torch.Generator], dict] | None = None
    reach: Callable[[str, dict], int] | None = None

    def build(self, seed: int = 0) -> nn.Module:
        """The module with seeded normal weights, in eval mode."""
        torch.manual_seed(seed)  # nothing should draw from it; kept fixed in case a constructor does
        return init_normal(self.make(), seed)

    def inputs(self, batch: int = 2, seq: int = 5, seed: int = 0) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for the module's forward: standard-normal hidden states and the extra inputs."""
        generator = torch.Generator().manual_seed(seed)
        shape = (seq, batch, HIDDEN) if self.seq_first else (batch, seq, HIDDEN)
        hidden = torch.randn(shape, generator=generator)
        return (hidden,), (self.extra_inputs(batch, seq, generator) if self.extra_inputs else {})


def _entries(*entries: CorpusEntry) -> dict[str, CorpusEntry]:
    return {entry.name: entry for entry in entries}


_REFERENCE = "reference inference code of an open-weight MoE model"
_TRAINING = "training framework grouped experts"
_RESEARCH = "research library MoE layer"
_REMOTE = "remote code of a hub model"
_FUTURE = "a future transformers refactor"

ENTRIES: dict[str, CorpusEntry] = _entries(
    CorpusEntry("deepseek_reference", f"{_REFERENCE}: custom Linear class (F.linear), a Gate module, "
                "bincount skip, torch.where loop, shared experts", (1,), ReferenceMoE),
    CorpusEntry("mixtral_reference", f"{_REFERENCE}: topk of the logits, softmax over the k, "
                "torch.where(selected == i) loop", (), MixtralReferenceMoE),
    CorpusEntry("per_projection_lists", f"{_REFERENCE}: one ModuleList per projection (w1[e], w3[e], w2[e]), a "
                "nonzero loop, index_add_", (), PerProjectionListsMoE),
    CorpusEntry("gating_multiplier", f"{_REMOTE}: experts with a gating-multiplier parameter beside their Linears",
                (1,), MultipliedExpertsMoE),
    CorpusEntry("nested_experts", f"{_RESEARCH}: experts one level deeper (self.experts.experts[i]), "
                "boolean row masks", (1,), NestedExpertsMoE),
    CorpusEntry("packed_einsum_swiglu", f"{_REFERENCE}: packed weights on the block gathered by W[idx, ...], "
                "einsum, biases, interleaved gate/up, clamped SwiGLU", (2,), PackedEinsumMoE),
    CorpusEntry("sorted_split", f"{_TRAINING}: argsort by expert, experts called with (rows, counts), "
                "torch.split loop", (3,), SortedSplitMoE),
    CorpusEntry("sorted_grouped_mm", f"{_TRAINING}: argsort by expert, grouped matmul over packed weights and "
                "offsets, sigmoid router with a selection bias", (3,), GroupedMatmulMoE),
    CorpusEntry("fused_grouped_mm", f"{_TRAINING}: argsort by expert, F.grouped_mm over transposed packed "
                "[E, out, in] weights, counts by histc in a router module, scatter_add combine", (3,), FusedGroupedMoE),
    CorpusEntry("detached_score_dense", f"{_RESEARCH}: every expert on every token, input scaled by a "
                "detached routing score", (4,), DetachedScoreMoE),
    CorpusEntry("gshard_top2", f"{_RESEARCH}: GShard top-2 with capacity, dispatch/combine einsums, "
                "b, n, d, e = *x.shape, e", (5,), GShardTop2MoE),
    CorpusEntry("hierarchical", f"{_RESEARCH}: two-level gating (top-1 group, then top-k in the group)", (5,),
                HierarchicalMoE, num_experts=8),
    CorpusEntry("decode_branch", f"{_REFERENCE}: a separate single-token (decode) branch", (6,), DecodeBranchMoE),
    CorpusEntry("decode_gather", f"{_REFERENCE}: packed experts; one token gathers its k experts' weights "
                "(w1[indices[0]]) and contracts them by einsum, many tokens run a where loop", (2, 6), DecodeGatherMoE),
    CorpusEntry("expert_post_norm", f"{_REMOTE}: packed experts with a per-expert norm after the down "
                "projection; returns (out, router_logits)", (7,), PostNormMoE),
    CorpusEntry("zero_identity_experts", f"{_REMOTE}: zero and identity experts in the expert list", (8,),
                ZeroIdentityMoE),
    CorpusEntry("tuple_experts", f"{_RESEARCH}: experts returning (output, pre-activation)", (8,), TupleExpertsMoE),
    CorpusEntry("modality_experts", f"{_REMOTE}: text and image expert sets chosen by token_type_ids", (8,),
                ModalityMoE, num_experts=8, extra_inputs=_token_types, reach=_tokens_of_its_modality),
    CorpusEntry("expert_id_linears", f"{_RESEARCH}: per-projection modules called with the expert id", (8,),
                ExpertIdLinearMoE),
    CorpusEntry("megatron_grouped", "training framework (Megatron style): [seq, batch, hidden], routing map "
                "permute/unpermute, grouped-MLP views of one packed weight, returns (out, None)", (3, 8),
                MegatronMoELayer, seq_first=True),
    CorpusEntry("sparsemixer", f"{_REMOTE}: sparsemixer routing (argmax, then masked argmax)", (8,),
                SparseMixerMoE),
    CorpusEntry("param_matmul_experts", f"{_RESEARCH}: experts of raw nn.Parameter matmuls (x @ W)", (),
                lambda: MixtralReferenceMoE(ParamExpert)),
    CorpusEntry("conv1d_experts", f"{_RESEARCH}: experts of kernel-1 Conv1d", (),
                lambda: MixtralReferenceMoE(ConvExpert)),
    CorpusEntry("packed_loop", "hand-written packed experts on the block, where loop (the block the decoder "
                "layers below hold)", (), PackedLoopMoE),
    CorpusEntry("decoder_layer", "a pre-norm decoder layer holding the packed block (h + self.moe(self.norm(h)))",
                (), DecoderLayer, blocks=("moe",)),
    CorpusEntry("sequential_layers", "three such decoder layers in an nn.Sequential", (),
                lambda: nn.Sequential(*(DecoderLayer() for _ in range(3))), blocks=("0.moe", "1.moe", "2.moe")),
    CorpusEntry("modulelist_model", "three such decoder layers in an nn.ModuleList model with a final norm", (),
                LayersModel, blocks=("layers.0.moe", "layers.1.moe", "layers.2.moe")),
    CorpusEntry("host_counts", f"{_REMOTE}: counts per expert read on the host (numpy), rows sorted by expert, "
                "slices, scattered back by the sort order, shared experts", (3,), HostCountsMoE),
    CorpusEntry("repeated_rows", f"{_REMOTE}: tokens repeated k times (repeat_interleave), y[flat == i] = "
                "expert(rows[flat == i])", (), RepeatedRowsMoE),
    CorpusEntry("fused_reference", "an inference engine's torch reference of its fused MoE: w13/w2 on the block, "
                "tokens repeated k times, a mask per expert, x @ w[i].transpose(0, 1)", (2,), FusedReferenceMoE),
    CorpusEntry("side_by_side", f"{_REMOTE}: raw [E * I, H] weights on the block, viewed [E, I, H] per expert",
                (2,), SideBySideMoE),
    CorpusEntry("switch_top1", f"{_RESEARCH}: Switch top-1, a ModuleDict of experts, mask[:, :, i], rows "
                "assigned in place", (), SwitchMoE, top_k=1),
    CorpusEntry("capacity_top1", f"{_RESEARCH}: top-1 with a capacity, einsum dispatch into [E, C, H], experts "
                "on chunks", (5,), CapacityTop1MoE, top_k=1),
    CorpusEntry("legacy_mixtral", f"{_REMOTE}: an older transformers Mixtral copied, sigmoid-gated shared "
                "expert, returns (out, router_logits)", (), LegacyMixtralMoE),
    CorpusEntry("group_limited", f"{_REFERENCE}: group-limited routing (best groups, then top-k), selection "
                "bias, bincount skip, shared experts", (), GroupLimitedMoE),
    CorpusEntry("dropless_experts", f"{_TRAINING}: a router module returning (scores, weights, indices), "
                "dropless experts of raw [E * I, H] weights sorted by expert", (3,), DroplessMoE),
    CorpusEntry("noisy_gate", f"{_RESEARCH}: noisy top-k gating with raw [H, E] gate weights (x @ w_gate), "
                "Sequential experts", (), NoisyGateMoE),
    CorpusEntry("conv1d_transposed", f"{_RESEARCH}: experts of a Linear class storing weight [in, out] (addmm)",
                (1,), lambda: MixtralReferenceMoE(TransposedConvExpert)),
    CorpusEntry("dense_then_gather", f"{_RESEARCH}: every expert on every token by einsum, the chosen outputs "
                "gathered", (2,), DenseThenGatherMoE),
    CorpusEntry("host_token_lists", f"{_REMOTE}: a router module, an experts module whose GLU keeps every "
                "expert's weights side by side ([E * I, H]) and is called with (rows, expert), token lists read "
                "on the host (tolist)", (1, 3), HostListMoE),
    CorpusEntry("sort_slice", f"{_RESEARCH}: descending sort sliced to k, experts in a list named ffn, "
                "nonzero(as_tuple=True)", (), SortSliceMoE),
    CorpusEntry("prenorm_experts", f"{_RESEARCH}: experts holding a LayerNorm before their MLP", (),
                PreNormExpertsMoE),
    CorpusEntry("seq_first_aux", f"{_TRAINING}: [seq, batch, hidden], s, b, h = x.shape, x.view(s * b, h), "
                "returns (out, aux_loss)", (8,), SeqFirstAuxMoE, seq_first=True),
    CorpusEntry("split_per_expert", f"{_REMOTE}: a router with training-only jitter, [E * I, H] weights split per "
                "expert (w.split(I)[e]), token lists on the host", (1, 2), SplitWeightsMoE),
    CorpusEntry("plain_layers", f"{_RESEARCH}: norm-free residual MoE layers (x + moe(x)) in an nn.ModuleList, "
                "each a router and its Linear experts", (), PlainLayersModel, blocks=("layers.0", "layers.1")),
    CorpusEntry("detached_scaled_inputs", f"{_REFERENCE}: every expert on every token, copies gathered by arange "
                "and scaled by sigmoid scores, handed to bmm experts detached, scatter_add_ into a shared expert",
                (4,), DetachedScaledInputsMoE),
    CorpusEntry("stacked_then_topk", f"{_RESEARCH}: every expert on every token, outputs stacked, combined by a "
                "top-k gate matrix", (), StackedThenTopKMoE),
    CorpusEntry("aligned_grouped_mm", f"{_TRAINING}: each expert's sorted rows padded with zero rows to a multiple "
                "of 8 for F.grouped_mm (permute indices with -1 for a zero row), unpadded after", (3,),
                AlignedGroupedMoE),
    CorpusEntry("optional_mask_ones", f"{_TRAINING}: no padding mask given, one made by torch.ones(t.shape[0]), "
                "rows sorted by expert, a split loop", (3,), OptionalMaskMoE),
    CorpusEntry("refactor_router_reordered", f"{_FUTURE}: a router module returning (indices, weights, logits)", (),
                refactors.RouterReorderedBlock),
    CorpusEntry("refactor_experts_normalise", f"{_FUTURE}: the weights renormalised in the experts, before the "
                "decorated experts run", (), refactors.ExpertsNormaliseBlock),
    CorpusEntry("refactor_routing_map", f"{_FUTURE}: experts given a dense [tokens, experts] routing map", (),
                refactors.RoutingMapBlock),
    CorpusEntry("refactor_gathered_routes", f"{_FUTURE}: compile-friendly experts, W[ids] per route (ids clamped), "
                "bmm(W, x[..., None]), index_add", (2,), refactors.GatheredRouteBlock),
    CorpusEntry("refactor_masked_dense", f"{_FUTURE}: compile-friendly experts, a static loop running every expert "
                "on every token, weighted by a mask of the routing", (4,), refactors.MaskedDenseBlock),
    CorpusEntry("refactor_route_rows", f"{_FUTURE}: each route's copy of its token a row of its own "
                "(repeat_interleave), scaled by its routing weight before the experts", (), refactors.RouteRowsBlock),
    CorpusEntry("refactor_sorted_route_rows", f"{_FUTURE}: each route a row of its own, the routes sorted by expert "
                "(argsort) and their tokens gathered by index_select", (3,), refactors.SortedRouteRowsBlock),
    CorpusEntry("refactor_masked_inputs", f"{_FUTURE}: compile-friendly experts, every expert's batch holding every "
                "token, the unrouted rows zeroed by a 0/1 mask, bmm over [E, T, H]", (), refactors.MaskedInputsBlock),
    CorpusEntry("refactor_padded_loop", f"{_FUTURE}: rows sorted by expert, each expert's segment padded with zero "
                "rows to a multiple of 4, a plain matmul loop over the segments", (3,), refactors.PaddedLoopBlock),
    CorpusEntry("refactor_transposed_cast", f"{_FUTURE}: experts computing in float32, their weights transposed and "
                "that view cast (.float()) before the loop", (), refactors.TransposedCastBlock),
    CorpusEntry("engine_fused_layer", "an inference engine's torch-native fused MoE: a gate returning (logits, "
                "bias), the experts layer given the logits picks the top-k itself, w13[topk_ids] contracted by "
                "einsum, silu_and_mul", (2,), EngineMoE),
    CorpusEntry("keyword_experts", "a user's block: experts called by keyword, the routing weight handed in "
                "(expert(hidden_states=rows, scale=weights))", (), KeywordExpertsMoE),
    CorpusEntry("raw_router_own_weights", f"{_RESEARCH}: a raw [H, E] router (x @ router) beside the block's own "
                "[E, I, H] expert weights, a where loop", (2,), RawRouterMoE),
    CorpusEntry("argmax_top2_capacity", "training framework MoE layer: top-2 by argmax then masked argmax, eval "
                "capacity dropping tokens, (combine, dispatch) [S, E, C], experts in a list run on chunks of the "
                "dispatched tensor", (5,), ArgmaxTop2MoE),
    CorpusEntry("expert_size_split", f"{_REMOTE}: projection modules of [E, out, in] called with (rows, expert "
                "sizes), split per size, rows sorted by expert, index_add back, an output bias", (1, 3),
                SizedExpertsMoE),
    CorpusEntry("scored_sorted_rows", f"{_TRAINING}: stable argsort, rows gathered and scaled by their scores "
                "before the experts, split by histc counts, scatter_add onto the shared expert", (3, 4),
                ScoredSortedMoE),
    CorpusEntry("sparse_dispatcher", f"{_RESEARCH}: sparse dispatcher (nonzero of scattered gates sorted, part "
                "sizes on the host, split, cat, times the gates, index_add), noise in training only", (3,),
                SparseDispatcherMoE),
    CorpusEntry("any_mask_tutorial", "a tutorial's block: top-k logits kept, -inf elsewhere, softmax; per expert "
                "(indices == i).any(-1), final[mask] +=", (), AnyMaskMoE),
    CorpusEntry("weights_handed_in", "a user's block: each expert handed its rows and their routing weights, "
                "which scale its input (expert(rows, weights))", (), WeightsHandedInMoE),
    CorpusEntry("dense_own_weights", "an inference engine's torch-native fallback: the block's own w13/w2 applied "
                "to every token for every expert, weighted by (topk_weights * (topk_ids == e)).sum(-1)", (2, 4),
                DenseOwnWeightsMoE),
    CorpusEntry("index_add_capacity", f"{_RESEARCH}: token rows index_add_-ed into an [E * C, H] buffer (capacity "
                "ceil(k * T / E), choices past it dropped), matmul with the block's own weights and biases, read "
                "back by expert * C + place", (5,), IndexAddCapacityMoE),
    CorpusEntry("ranked_buffer", "a small-GPT MoE: rows written into [E, T, H] at (expert, rank) pairs, bmm with "
                "the block's own weights, read back at the same pairs", (), RankedBufferMoE),
    CorpusEntry("lora_experts", f"{_RESEARCH}: a mixture of LoRA experts over a base Linear every token takes",
                (1,), LowRankExpertsMoE),
    CorpusEntry("gather_permute", "training framework (Megatron-Core style): [seq, batch, hidden], an fp32 sigmoid "
                "router choosing with an expert bias, tokens permuted by torch.gather of token numbers expanded over "
                "the features, sequential experts split by host counts, scatter_add_ back, returns (out, None)", (3,),
                GatherPermuteMoE, seq_first=True),
    CorpusEntry("index_copy_bmm", f"{_RESEARCH}: FastMoE-style, an experts module holding two projections of "
                "[E, out, in] weights and [E, out] biases called with (rows, host counts), rows sorted by expert, "
                "index_copy_ back in choice order, bmm of the scores with [T, k, H]", (3,), IndexCopyBmmMoE),
    CorpusEntry("chunked_routing", "an inference engine's chunked MoE: tokens routed and run three at a time, a "
                "top-k per chunk (softmax, renormalised), where-loop, index_add_, cat", (), ChunkedRoutingMoE),
    CorpusEntry("grouped_capacity", f"{_RESEARCH}: GShard-style groups (each sequence a group, capacity per group, "
                "choices past it dropped), top-2 slots by cumsum, dispatch mask [G, S, E, C], einsum(gsec,gsm->egcm) "
                "and back", (5,), GroupedCapacityMoE),
    CorpusEntry("binned_dropless", f"{_TRAINING}: OLMo-core style, a router module returning (weights, indices, "
                "histc counts), bins by cumsum, packed [E, H, I] experts on slices bounded by 0-d tensors written "
                "into a preallocated output, index_add_ back", (3,), BinnedDroplessMoE),
    CorpusEntry("dense_buffer", "a user's block: a dense [T, E] weight matrix by scatter, each expert's outputs "
                "written into a zero [E, T, H] buffer at its rows, einsum('te,eth->th')", (), DenseBufferMoE),
    CorpusEntry("present_experts", "a user's block: choices sorted (torch.sort, stable), split by "
                "unique_consecutive counts of the experts some row chose, experts[int(e)]", (3,), PresentExpertsMoE),
    CorpusEntry("hidden_scaled", "a user's block: packed experts handed (rows, ids, weights) applying the routing "
                "weight to the hidden activation before the down projection, a loop over ids.unique()", (2,),
                HiddenScaledMoE),
    CorpusEntry("one_rank_parallel", f"{_TRAINING}: expert parallelism left in on one rank, an identity "
                "all-to-all autograd.Function around the dispatch, local experts numbered from rank * local", (),
                OneRankMoE),
    CorpusEntry("lookup_table_weights", f"{_RESEARCH}: each token's experts' weights looked up by F.embedding in "
                "the packed weights flattened to [E, I * H], viewed back to [T, k, I, H], einsum per slot", (2,),
                LookupTableMoE),
    CorpusEntry("centroid_router", f"{_RESEARCH}: time-series MoE routing by distance to fixed cluster centroids "
                "(a buffer, no router weights), top-k of -cdist, softmax over the k, a where loop", (),
                CentroidRoutedMoE),
    CorpusEntry("chunked_experts", f"{_REMOTE}: an older DBRX's experts, [E * I, H] weights viewed [E, I, H] and "
                "chunked into one squeezed piece per expert, the expert's piece picked from the list; p-norm "
                "normalised top weights, a one-hot mask, token lists on the host", (1, 2), ChunkedExpertsMoE),
    CorpusEntry("embedding_tables", f"{_RESEARCH}: each expert's matrices flattened into the rows of nn.Embedding "
                "modules ([E, I * H]), looked up by the chosen ids and viewed back to [T, k, I, H], einsum per slot",
                (2,), EmbeddingTablesMoE),
    CorpusEntry("quantizable_sorted", "a quantization library's MoE: packed experts given (rows, ids), sorted by a "
                "stable argsort, histc counts over E + 1 bins from -1, cut at cumulative counts, put back by the "
                "inverse permutation; one token gathers its experts' weights; einsum('tai,ta->ti')", (2, 3, 6),
                QuantizableMoE),
    CorpusEntry("matmul_capacity", f"{_TRAINING}: top-2 into capacity slots, dispatch by matmul of the permuted "
                "[E, C, T] mask with the tokens, packed bmm experts ([E, H, I]) on the buffers, combine by matmul of "
                "[T, E * C] weights with [E * C, H] outputs", (5,), MatmulDispatchMoE),
    CorpusEntry("sinkhorn_router", f"{_TRAINING}: Sinkhorn routing at inference, the logits balanced in a loop "
                "until they converge, top-k of the balanced scores, the sigmoid of the raw logits as weights", (),
                SinkhornRoutedMoE),
    CorpusEntry("shared_down", f"{_RESEARCH}: experts holding only their gate and up projections, the "
                "routing-weighted sum of their activations through one down projection they share", (),
                SharedDownMoE),
    CorpusEntry("variadic_forward", f"{_TRAINING}: a layer whose forward takes *inputs (hidden states, an "
                "optional token mask) inside a wrapper naming them; fp32 top-1 gate, random token selection within a "
                "capacity of the largest count, einsum sec,sm->ecm dispatch, experts on chunks, (out, aux, counts)",
                (5,), VariadicWrapperMoE, top_k=1, blocks=("moe_layer",)),
    CorpusEntry("tensor_parallel_linears", f"{_TRAINING}: Megatron-Core style sequential experts of "
                "tensor-parallel Linears returning (x @ W.T, bias) with skip_bias_add or (x @ W.T + b, None), the "
                "bias added inside the GELU; rows sorted by expert, split by host counts, index_add_", (1, 3),
                SequentialTensorParallelMoE),
    CorpusEntry("flat_mask_mm", f"{_RESEARCH}: fairseq style, forward(*inputs, padding_mask=None) over [seq, "
                "batch, hidden], top-2 into capacity slots, the [S, E, C] mask permuted and viewed [E * C, S], "
                "torch.mm dispatch and combine, experts on chunks, (out, aux)", (5,), FlatMaskMoE, seq_first=True),
    CorpusEntry("per_token_loop", "a tutorial's block: top-k logits, softmax over the k, a loop over tokens and "
                "slots calling experts[int(ids[t, j])] on one token (the expert picked on the host)", (),
                PerTokenLoopMoE),
    CorpusEntry("in_place_scaled_input", f"{_REMOTE}: the block's input rows (a view) scaled in place by k "
                "before the experts (x *= k), each expert's output divided by k; a where loop", (), InPlaceScaledMoE),
    CorpusEntry("slot_capacity", f"{_RESEARCH}: flaxformer-style top-k slots by a cumulative sum, each slot read back "
                "by position.max(dim=-1).values, the one-hot width by int(position.max()) + 1, [T, E, C] dispatch "
                "and combine einsums, packed GELU experts", (5,), SlotCapacityMoE),
    CorpusEntry("binned_scatter", f"{_TRAINING}: MegaBlocks-style bins by cumulative histc counts, rows gathered into "
                "[E, C, H], bmm over packed [E * I, H] weights, written back in place (out[rows] = ...) into "
                "[T * k, H] and summed over the k", (3,), BinnedScatterMoE),
    CorpusEntry("sorted_copies", "a user's block: choices sorted by expert, each choice's token copied "
                "(t[order // k]), experts of the sorted rows by torch.bucketize, a mask loop over the copies, "
                "scatter_reduce back", (3,), SortedCopiesMoE),
    CorpusEntry("flattened_one_hot", "a user's block: x.flatten(0, 1), a gate matrix summed from F.one_hot of the "
                "top-k indices, every expert on every token (torch.stack), einsum('te,eth->th'), unflatten", (4,),
                FlattenedOneHotMoE),
    CorpusEntry("host_list_rows", f"{_REMOTE}: an older transformers Mixtral copied, rows and slots read to Python "
                "lists (top_x.tolist()) and picked by them (x[None, top_x_list]), a dense residual MLP beside the "
                "experts", (), HostListRowsMoE),
    CorpusEntry("histc_counts", f"{_REMOTE}: projection modules of [E, out, in] called with (rows, counts), the "
                "counts made by torch.histc (floats) and turned into ints by the projections", (1, 3),
                HistcCountsMoE),
    CorpusEntry("banks_below_router", f"{_REMOTE}: an experts module of weight banks called with sorted rows and "
                "counts, the router and a permuting helper object in the layer around it", (3,), BanksBelowRouterMoE),
    CorpusEntry("in_place_bias", f"{_REFERENCE}: gathered W[idx] contracted by einsum, the biases added in place "
                "(t += b[idx])", (2,), InPlaceBiasMoE),
    CorpusEntry("sliced_banks", f"{_TRAINING}: packed weights, one expert's matrix taken as a slice of length one "
                "(w[e:e + 1], w.narrow(0, e, 1)) and applied by bmm", (3,), SlicedBankMoE),
    CorpusEntry("padding_mask", "users' own code: an attention_mask keyword zeroing the routing weights of padded "
                "positions", (), PaddingMaskedMoE, extra_inputs=_right_padding),
    CorpusEntry("mixed_experts", "users' own code: one list holding experts of two depths and widths, a where loop",
                (), MixedExpertsMoE),
    CorpusEntry("parameter_list_experts", f"{_RESEARCH}: gate, up and down weights in nn.ParameterLists (one weight "
                "per expert) applied by F.linear(x, w[e]) in an experts module called with (rows, e), slots sorted "
                "by expert, counts on the host", (3,), ListedExpertsMoE),
)


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


class Silent(AssertionError):
    """autocal returned, but left a block unconverted (or unreported) without a word."""


class Mismatch(AssertionError):
    """autocal returned a result that is wrong: an output, a coverage or a reported k."""


class Holder(nn.Module):
    """A user's model around the entry's module, with an explicit signature (no ``**kwargs``)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden_states):
        return self.block(hidden_states)


class TypedHolder(Holder):
    """A user's model around a module that also takes keyword inputs (``token_type_ids``, ``attention_mask``),
    its signature naming them (``_with_inputs``)."""

    def forward(self, hidden_states, **extra):
        return self.block(hidden_states, **extra)


class Mixed(nn.Module):
    """A model holding a block autocal converts (a toy Qwen3-MoE block) before the entry's module."""

    def __init__(self, block: nn.Module, seed: int):
        super().__init__()
        self.toy = make_toy_block(ToyMoEConfig(hidden_size=HIDDEN), seed=seed)
        self.block = block

    def forward(self, hidden_states):
        return self.block(hidden_states + self.toy(hidden_states))


class TypedMixed(Mixed):
    def forward(self, hidden_states, **extra):
        return self.block(hidden_states + self.toy(hidden_states), **extra)


def _with_inputs(model_class: type, entry: CorpusEntry) -> type:
    """``model_class`` with a forward whose signature names the entry's keyword inputs (no ``**kwargs`` in it:
    autocal reads a model's inputs by name)."""
    names = list(entry.inputs(1, 2)[1])
    forward = functools.wraps(model_class.forward)(lambda self, hidden_states, **extra: model_class.forward(
        self, hidden_states, **extra))
    parameter = inspect.Parameter
    forward.__signature__ = inspect.Signature([parameter(n, parameter.POSITIONAL_OR_KEYWORD)
                                               for n in ("self", "hidden_states", *names)])
    return type(model_class.__name__, (model_class,), {"forward": forward})


def _holder(entry: CorpusEntry, seed: int) -> nn.Module:
    return (_with_inputs(TypedHolder, entry) if entry.extra_inputs else Holder)(entry.build(seed))


def _mixed(entry: CorpusEntry, seed: int) -> nn.Module:
    return (_with_inputs(TypedMixed, entry) if entry.extra_inputs else Mixed)(entry.build(seed), seed)


def _cases(entry: CorpusEntry) -> list[tuple[tuple, dict]]:
    """Inputs the checks run: one token, and two sequences of several."""
    return [entry.inputs(batch, seq, seed=7 + seq) for batch, seq in ((1, 1), (2, 5), (1, 9))]


def _set_calibration(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, MoECalibrationModule):
            module.calibrate_all_experts = on


def equivalent(original: nn.Module, converted: nn.Module, args: tuple, kwargs: dict,
               reach: Callable[[str, dict], int] | None = None) -> None:
    """Calibration off: bitwise the original's output. On: within ``autocal.verify`` tolerances, and every
    expert Linear of every calibration module sees every token once (with ``reach``, the entry's: every token
    reaching its expert set). Raises :class:`Mismatch` otherwise."""
    tokens = args[0].numel() // args[0].shape[-1]
    given = args, kwargs
    with torch.no_grad():  # each run on a copy of the inputs, as a model passes a block a fresh tensor
        expected = original(*fresh_inputs(given)[0], **fresh_inputs(given)[1])
        _set_calibration(converted, False)
        args, kwargs = fresh_inputs(given)
        off = converted(*args, **kwargs)
        diff, bitwise, _ = compare_outputs(expected, off)
        if not bitwise:
            raise Mismatch(f"calibration off differs from the original ({tokens} tokens): max |diff| {diff:.3g}")
        _set_calibration(converted, True)
        linears = expert_linears(converted)
        args, kwargs = fresh_inputs(given)
        with count_rows(linears) as rows:
            on = converted(*args, **kwargs)
    diff, _, close = compare_outputs(expected, on)
    if not close:
        raise Mismatch(f"calibration on differs from the original ({tokens} tokens): max |diff| {diff:.3g}")
    if not linears:
        raise Mismatch("no expert Linear to calibrate in the calibration module")
    due = {name: tokens if reach is None or reach(name, kwargs) is None else reach(name, kwargs) for name in rows}
    short = {name: n for name, n in rows.items() if n != due[name]}
    if short:
        name = next(iter(short))
        raise Mismatch(f"{len(short)} of {len(linears)} expert Linears did not see each of the {due[name]} tokens "
                       f"{'reaching its expert set ' if reach else ''}once, e.g. {name}: {short[name]}")


def check_synthesize(entry: CorpusEntry, cases: list[tuple[tuple, dict]] | None = None, seed: int = 0) -> None:
    """``synthesize`` of the (first) MoE block in the entry's module, checked on ``cases`` (default: 1, 10 and
    9 tokens)."""
    path = entry.blocks[0]
    original = entry.build(seed).get_submodule(path)
    module = synthesize(entry.build(seed).get_submodule(path), example_inputs=synthesize_example(entry))
    for args, kwargs in cases or _cases(entry):
        equivalent(original, module, args, kwargs, entry.reach)


def synthesize_example(entry: CorpusEntry) -> dict | None:
    """The example inputs ``synthesize`` is given: only where the block's forward needs more than hidden states."""
    return _example(*entry.inputs(seed=3)) if entry.extra_inputs is not None else None


def _converted(model: nn.Module, paths: list[str]) -> None:
    left = [path for path in paths if not isinstance(model.get_submodule(path), MoECalibrationModule)]
    if left:
        raise Silent(f"convert returned without converting {', '.join(left)}")


def _example(args: tuple, kwargs: dict) -> dict:
    return {"hidden_states": args[0], **kwargs}


def check_convert(entry: CorpusEntry, with_example: bool = False, seed: int = 0) -> None:
    """``convert`` of a model holding the entry's module (with its example inputs, or without where it can)."""
    model = _holder(entry, seed)
    with_example = with_example or entry.extra_inputs is not None
    convert(model, example_inputs=_example(*entry.inputs(seed=3)) if with_example else None)
    _converted(model, [f"block.{p}".rstrip(".") for p in entry.blocks])
    for args, kwargs in _cases(entry):
        equivalent(_holder(entry, seed), model, args, kwargs, entry.reach)


def check_mixed(entry: CorpusEntry, seed: int = 0) -> None:
    """``convert`` of a model that also holds a block autocal converts; example inputs only where the entry
    needs more than hidden states."""
    model = _mixed(entry, seed)
    example = _example(*entry.inputs(seed=3)) if entry.extra_inputs is not None else None
    convert(model, example_inputs=example)
    _converted(model, ["toy", *(f"block.{p}".rstrip(".") for p in entry.blocks)])
    for args, kwargs in _cases(entry):
        equivalent(_mixed(entry, seed), model, args, kwargs, entry.reach)


def check_explain_k(entry: CorpusEntry, seed: int = 0) -> None:
    """``explain`` (without verification) lists every MoE block of the entry with its true k."""
    example = _example(*entry.inputs(seed=3)) if entry.extra_inputs is not None else None
    report = explain(_holder(entry, seed), verify=False, example_inputs=example)
    for path in (f"block.{p}".rstrip(".") for p in entry.blocks):
        block = next((b for b in report.blocks if path in b.paths), None)
        if block is None:
            raise Silent(f"explain lists no block at {path} (it lists {[b.paths for b in report.blocks]})")
        if block.failure:
            raise errors.AutocalError(block.failure["kind"], block.failure["explanation"], block.block_class,
                                      path, block.failure.get("source"))
        if block.top_k != entry.top_k:
            raise Mismatch(f"explain reports k = {block.top_k} at {path}; the block routes each token to "
                           f"{entry.top_k} experts")


CHECKS: dict[str, Callable[[CorpusEntry], None]] = {
    "synthesize": check_synthesize,
    "convert": check_convert,
    "convert(example)": lambda entry: check_convert(entry, with_example=True),
    "mixed model": check_mixed,
    "explain k": check_explain_k,
}


def outcome(check: Callable[[CorpusEntry], None], entry: CorpusEntry) -> str:
    """``pass``, ``<AutocalError kind>: ...``, ``silent: ...``, ``wrong: ...`` or ``raw <exception type>: ...``."""
    try:
        check(entry)
    except errors.AutocalError as error:
        return f"{error.kind}: {error.explanation}" + (f" ({error.source})" if error.source else "")
    except Silent as error:
        return f"silent: {error}"
    except Mismatch as error:
        return f"wrong: {error}"
    except Exception as error:  # the measurement: a raw exception is a finding, named by its type
        return f"raw {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return "pass"
