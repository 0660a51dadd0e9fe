"""Toy Mixture-of-Experts blocks written the way HuggingFace transformers v5 writes its MoE blocks.

These are plain ``torch.nn.Module`` s (torch only, no transformers import, no ``use_experts_implementation``
decorator) that reproduce the *code patterns* of the real eager implementations in transformers 5.23, so they
can serve as the ORIGINAL modules in property tests of ``autocal``.  Each kind mirrors one family:

==========================  ====================================================================================
kind                        modelled on
==========================  ====================================================================================
``"concat"``                Qwen3-MoE (``Qwen3MoeSparseMoeBlock``): fused ``gate_up_proj [E, 2I, H]``
``"transposed"``            Aria experts (``gate_up_proj [E, H, 2I]``, ``x @ W``) with a Qwen3 router
``"interleaved"``           GPT-OSS (``GptOssMLP``): interleaved gate/up, biases, clamped swiglu
``"no_gate"``               NemotronH (``NemotronHMoE``): ``up_proj`` only, relu^2, grouped sigmoid router
``"shared_sigmoid_gate"``   Qwen2-MoE (``Qwen2MoeSparseMoeBlock``): shared expert scaled by a sigmoid gate
``"grouped_sigmoid_bias"``  DeepSeek-V3 (``DeepseekV3MoE``): grouped sigmoid router + correction bias
``"tuple_return"``          Qwen3-MoE block that also returns the router logits
``"modulelist_loop"``       transformers-v4 Mixtral: ``nn.ModuleList`` of w1/w2/w3 experts, loop in the block
``"scores_on_inputs"``      Llama4 (``Llama4TextMoe``): router scores multiply the *inputs*, dense bmm experts
``"masked_loop"``           hand-written code: boolean row masks, ``if rows.any()``, ``out[rows] +=`` (no fx)
``"sorted_banks"``          Megablocks / Aria on transformers 5.17: rows sorted by expert, weight banks
``"gathered"``              gpt-fast ``MOEFeedForward``: ``w1[expert_indices]`` contracted per slot by einsum
``"sliced_loop"``           hand-written code: ``w1 [E, I, H]`` on the block, ``F.linear(x[rows], self.w1[e])`` per expert
``"attention_heads"``       JetMoE ``JetMoeMoA``: query/output projections per expert around causal attention,
                            used through ``map()`` and ``reduce()``, never through the experts' forward
``"post_norm"``             Ergo (transformers 5.25): one row per route in token order, each expert's output
                            RMS-normed with the expert's own scale, then weighted and summed per token
==========================  ====================================================================================

State-dict keys match the real transformers blocks where one exists (concat, interleaved, no_gate,
shared_sigmoid_gate, grouped_sigmoid_bias, scores_on_inputs), so weights can be copied across with
``load_state_dict(strict=True)``.

Public API: :class:`ToyMoEConfig`, :func:`make_toy_block`, :func:`example_hidden_states`, :data:`KINDS`,
:data:`TUPLE_RETURN_KINDS`, :func:`main_output`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KINDS",
    "TUPLE_RETURN_KINDS",
    "ToyMoEConfig",
    "example_hidden_states",
    "main_output",
    "make_toy_block",
]

KINDS: tuple[str, ...] = (
    "concat",
    "transposed",
    "interleaved",
    "no_gate",
    "shared_sigmoid_gate",
    "grouped_sigmoid_bias",
    "tuple_return",
    "modulelist_loop",
    "scores_on_inputs",
    "masked_loop",
    "sorted_banks",
    "gathered",
    "sliced_loop",
    "attention_heads",
    "post_norm",
)

# Kinds whose block forward returns a tuple ``(hidden_states, router_something)``; all others return a tensor.
TUPLE_RETURN_KINDS: frozenset[str] = frozenset({"interleaved", "tuple_return", "modulelist_loop", "scores_on_inputs"})

# Kinds that use the DeepSeek-V3 / NemotronH grouped sigmoid router.
_GROUPED_ROUTER_KINDS = frozenset({"no_gate", "grouped_sigmoid_bias"})

_BIAS_STD = 0.1  # std of every bias (expert biases, router bias, e_score_correction_bias)


@dataclasses.dataclass(frozen=True)
class ToyMoEConfig:
    """Configuration of one toy MoE block.

    ``shared_intermediate_size`` is the intermediate size of the shared expert(s) of the kinds that have one
    (no_gate, shared_sigmoid_gate, grouped_sigmoid_bias, scores_on_inputs); ``None`` means ``intermediate_size``.

    ``hf_sentinel`` reproduces transformers 5.23's expert-parallel sentinel handling verbatim in the one-hot
    expert loops: ``one_hot(num_classes=E + 1)`` followed by ``if expert_idx == self.num_experts: continue``
    (Qwen3/DeepSeek/Aria; NemotronH uses ``E + 1`` classes without the check; GPT-OSS uses ``E`` classes with
    the check).  With ``hf_sentinel=False`` every such loop uses ``one_hot(num_classes=E)`` and has no skip
    check.  Numerically both are identical (the sentinel class is never produced).
    """

    hidden_size: int = 16
    intermediate_size: int = 24
    num_experts: int = 4
    top_k: int = 2
    kind: str = "concat"
    dtype: torch.dtype = torch.float32
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_intermediate_size: int | None = None
    swiglu_alpha: float = 1.702  # interleaved (GPT-OSS)
    swiglu_limit: float = 7.0  # interleaved (GPT-OSS)
    hf_sentinel: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {KINDS}")
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "n_group", "topk_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.shared_intermediate_size is not None and (
            isinstance(self.shared_intermediate_size, bool)
            or not isinstance(self.shared_intermediate_size, int)
            or self.shared_intermediate_size < 1
        ):
            raise ValueError(f"shared_intermediate_size must be None or a positive int, got {self.shared_intermediate_size!r}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point or self.dtype.is_complex:
            raise ValueError(f"dtype must be a real floating torch.dtype, got {self.dtype!r}")
        for name in ("norm_topk_prob", "hf_sentinel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("routed_scaling_factor", "swiglu_alpha", "swiglu_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.num_experts % self.n_group != 0:
            raise ValueError(f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.kind in _GROUPED_ROUTER_KINDS:
            experts_per_group = self.num_experts // self.n_group
            if experts_per_group < 2:
                # the group score is the sum of the top-2 scores inside each group
                raise ValueError(f"kind {self.kind!r} needs num_experts // n_group >= 2, got {experts_per_group}")
            if self.top_k > self.topk_group * experts_per_group:
                raise ValueError(
                    f"kind {self.kind!r}: top_k ({self.top_k}) exceeds the experts left after group selection "
                    f"(topk_group * num_experts // n_group = {self.topk_group * experts_per_group})"
                )

    @property
    def shared_size(self) -> int:
        return self.intermediate_size if self.shared_intermediate_size is None else self.shared_intermediate_size


def _normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std)


# ---------------------------------------------------------------------------------------------------------------
# Activations / dense MLPs
# ---------------------------------------------------------------------------------------------------------------


class ReLUSquaredActivation(nn.Module):
    """relu(x) ** 2, as transformers' ``ACT2FN["relu2"]``."""

    def forward(self, input):
        relu_applied = torch.relu(input)
        squared = relu_applied**2
        return squared


class ToyMLP(nn.Module):
    """Gated dense MLP (Qwen2MoeMLP / DeepseekV3MLP / Llama4TextMLP)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class ToyNoGateMLP(nn.Module):
    """Non-gated dense MLP (NemotronHMLP)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ReLUSquaredActivation()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class ToyMixtralBlockSparseTop2MLP(nn.Module):
    """One expert of transformers-v4 Mixtral."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.ffn_dim = intermediate_size
        self.hidden_dim = hidden_size
        self.w1 = nn.Linear(self.hidden_dim, self.ffn_dim, bias=False)
        self.w2 = nn.Linear(self.ffn_dim, self.hidden_dim, bias=False)
        self.w3 = nn.Linear(self.hidden_dim, self.ffn_dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states):
        current_hidden_states = self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states)
        current_hidden_states = self.w2(current_hidden_states)
        return current_hidden_states


# ---------------------------------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------------------------------


class ToyTopKRouter(nn.Module):
    """Qwen3-MoE / Qwen2-MoE router: softmax (fp32) -> top-k -> optional renorm -> cast back."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.top_k = config.top_k
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))

    def _toy_reset(self, generator):
        _normal_(self.weight, 1 / math.sqrt(self.hidden_dim), generator)

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)  # (seq_len, num_experts)
        router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
        router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)  # (seq_len, top_k)
        if self.norm_topk_prob:
            router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
        router_top_value = router_top_value.to(router_logits.dtype)
        router_scores = router_top_value
        return router_logits, router_scores, router_indices


class ToyGptOssTopKRouter(nn.Module):
    """GPT-OSS router: linear with bias -> top-k on logits -> softmax over the k (in the logits dtype)."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.top_k = config.top_k
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        self.bias = nn.Parameter(torch.zeros(self.num_experts))

    def _toy_reset(self, generator):
        _normal_(self.weight, 1 / math.sqrt(self.hidden_dim), generator)
        _normal_(self.bias, _BIAS_STD, generator)

    def forward(self, hidden_states):
        router_logits = F.linear(hidden_states, self.weight, self.bias)  # (num_tokens, num_experts)
        router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=-1)  # (num_tokens, top_k)
        router_scores = torch.nn.functional.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
        return router_logits, router_scores, router_indices


class ToyGroupedSigmoidRouter(nn.Module):
    """DeepSeek-V3 / NemotronH router: fp32 sigmoid scores, correction bias, group-limited top-k selection."""

    _keep_in_fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.top_k = config.top_k
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        self.routed_scaling_factor = config.routed_scaling_factor
        self.num_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def _toy_reset(self, generator):
        _normal_(self.weight, 1 / math.sqrt(self.hidden_dim), generator)
        _normal_(self.e_score_correction_bias, _BIAS_STD, generator)

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = router_logits.sigmoid()
        scores_for_choice = scores + self.e_score_correction_bias
        group_scores = (
            scores_for_choice.view(-1, self.num_group, self.num_experts // self.num_group)
            .topk(2, dim=-1)[0]
            .sum(dim=-1)
        )
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(-1, self.num_group, self.num_experts // self.num_group)
            .reshape(-1, self.num_experts)
        )
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * self.routed_scaling_factor
        return router_logits, topk_weights, topk_indices


class ToyLlama4Router(nn.Linear):
    """Llama4 router: an ``nn.Linear`` returning ``(router_scores [T, E], router_logits [T, E])``."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__(config.hidden_size, config.num_experts, bias=False)
        self.num_experts = config.num_experts
        self.top_k = config.top_k

    def _toy_reset(self, generator):
        _normal_(self.weight, 1 / math.sqrt(self.in_features), generator)

    def forward(self, hidden_states):
        router_logits = super().forward(hidden_states)
        router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=1)
        router_scores = torch.full_like(router_logits, float("-inf")).scatter_(1, router_indices, router_top_value)
        router_scores = torch.nn.functional.sigmoid(router_scores.float()).to(router_scores.dtype)
        return router_scores, router_logits


# ---------------------------------------------------------------------------------------------------------------
# Expert containers
# ---------------------------------------------------------------------------------------------------------------


class _OneHotLoopExperts(nn.Module):
    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.hf_sentinel = config.hf_sentinel
        # transformers 5.23 one-hot encodes over E + 1 classes (the extra class is the expert-parallel sentinel)
        self.num_mask_classes = self.num_experts + 1 if config.hf_sentinel else self.num_experts


class ToyConcatExperts(_OneHotLoopExperts):
    """Qwen3-MoE experts: ``gate_up_proj [E, 2I, H]`` (gate then up), ``down_proj [E, H, I]``, ``F.linear``."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__(config)
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = nn.SiLU()

    def _toy_reset(self, generator):
        _normal_(self.gate_up_proj, 1 / math.sqrt(self.hidden_dim), generator)
        _normal_(self.down_proj, 1 / math.sqrt(self.intermediate_dim), generator)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_mask_classes)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()

        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if self.hf_sentinel and expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = nn.functional.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current_hidden_states = self.act_fn(gate) * up
            current_hidden_states = nn.functional.linear(current_hidden_states, self.down_proj[expert_idx])
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))

        return final_hidden_states


class ToyTransposedExperts(_OneHotLoopExperts):
    """Aria experts: ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, ``x @ W``."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__(config)
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, 2 * self.intermediate_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_dim, self.hidden_dim))
        self.act_fn = nn.SiLU()

    def _toy_reset(self, generator):
        _normal_(self.gate_up_proj, 1 / math.sqrt(self.hidden_dim), generator)
        _normal_(self.down_proj, 1 / math.sqrt(self.intermediate_dim), generator)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_mask_classes)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()

        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if self.hf_sentinel and expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = (current_state @ self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current_hidden_states = self.act_fn(gate) * up
            current_hidden_states = current_hidden_states @ self.down_proj[expert_idx]
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))

        return final_hidden_states


class ToyInterleavedExperts(_OneHotLoopExperts):
    """GPT-OSS experts: interleaved ``gate_up_proj [E, H, 2I]`` + bias, ``down_proj [E, I, H]`` + bias."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__(config)
        self.intermediate_size = config.intermediate_size
        self.hidden_size = config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, 2 * self.intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_size))
        self.down_proj = nn.Parameter(torch.empty((self.num_experts, self.intermediate_size, self.hidden_size)))
        self.down_proj_bias = nn.Parameter(torch.empty(self.num_experts, self.hidden_size))
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def _toy_reset(self, generator):
        _normal_(self.gate_up_proj, 1 / math.sqrt(self.hidden_size), generator)
        _normal_(self.gate_up_proj_bias, _BIAS_STD, generator)
        _normal_(self.down_proj, 1 / math.sqrt(self.intermediate_size), generator)
        _normal_(self.down_proj_bias, _BIAS_STD, generator)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        gated_output = (up + 1) * glu
        return gated_output

    def forward(self, hidden_states: torch.Tensor, router_indices=None, routing_weights=None) -> torch.Tensor:
        next_states = torch.zeros_like(hidden_states, dtype=hidden_states.dtype, device=hidden_states.device)
        with torch.no_grad():
            # GPT-OSS one-hot encodes over E classes (no sentinel class) but still carries the skip check
            expert_mask = torch.nn.functional.one_hot(router_indices, num_classes=self.num_experts)
            expert_mask = expert_mask.permute(2, 1, 0)
            # we sum on the top_k and on the sequence length to get which experts
            # are hit this time around
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            # expert_idx only have 1 element, so we can use scale for fast indexing
            expert_idx = expert_idx[0]
            # skip masking index
            if self.hf_sentinel and expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate_up = current_state @ self.gate_up_proj[expert_idx] + self.gate_up_proj_bias[expert_idx]
            gated_output = self._apply_gate(gate_up)
            out = gated_output @ self.down_proj[expert_idx] + self.down_proj_bias[expert_idx]
            weighted_output = out * routing_weights[token_idx, top_k_pos, None]
            next_states.index_add_(0, token_idx, weighted_output.to(hidden_states.dtype))

        return next_states


class ToyNoGateExperts(_OneHotLoopExperts):
    """NemotronH experts: ``up_proj [E, I, H]``, ``down_proj [E, H, I]``, relu^2, accumulation in weights dtype."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__(config)
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ReLUSquaredActivation()

    def _toy_reset(self, generator):
        _normal_(self.up_proj, 1 / math.sqrt(self.hidden_dim), generator)
        # relu^2 halves the active units and squares them: scale down_proj so outputs stay O(1)
        _normal_(self.down_proj, 1 / math.sqrt(2 * self.intermediate_dim), generator)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final_hidden_states = torch.zeros_like(hidden_states, dtype=top_k_weights.dtype)

        # Create expert mask to identify which tokens go to which experts
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_mask_classes)
            expert_mask = expert_mask.permute(2, 1, 0)  # (num_experts, num_experts_per_tok, num_tokens)
            # Only iterate over experts that have at least one token assigned
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().squeeze(-1)

        for expert_idx in expert_hit:
            expert_idx = expert_idx.item()
            # Find which tokens are routed to this expert
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])

            if token_idx.numel() == 0:
                continue

            current_state = hidden_states[token_idx]
            current_hidden_states = torch.nn.functional.linear(current_state, self.up_proj[expert_idx])
            current_hidden_states = self.act_fn(current_hidden_states)
            current_hidden_states = torch.nn.functional.linear(current_hidden_states, self.down_proj[expert_idx])

            # Apply routing weights
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]

            # Accumulate into final output
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))

        return final_hidden_states.to(hidden_states.dtype)


class ToyPostNormExperts(nn.Module):
    """Ergo-style experts: ``up_proj [E, H, I]`` (``x @ W``), SiLU, ``down_proj [E, I, H]``, then a per-expert
    RMS norm (``norm_weight [E, H]``, gathered by each route's expert) before the routes are weighted and summed."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, config.intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.intermediate_size, self.hidden_dim))
        self.norm_weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))

    def _toy_reset(self, generator):
        _normal_(self.up_proj, 1 / math.sqrt(self.hidden_dim), generator)
        _normal_(self.down_proj, 1 / math.sqrt(self.up_proj.shape[-1]), generator)
        _normal_(self.norm_weight, 0.5, generator)
        with torch.no_grad():
            self.norm_weight.add_(1.0)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        slots = top_k_index.shape[1]
        routes = hidden_states.repeat_interleave(slots, dim=0)  # row t * k + s: token t's slot s
        route_expert = top_k_index.reshape(-1)
        outputs = torch.zeros_like(routes)
        for expert in route_expert.unique():
            rows = route_expert == expert
            outputs[rows] = F.silu(routes[rows] @ self.up_proj[expert]) @ self.down_proj[expert]
        normed = F.rms_norm(outputs.float(), (self.hidden_dim,), eps=1e-6) * self.norm_weight[route_expert].float()
        weighted = normed.to(hidden_states.dtype).view(-1, slots, self.hidden_dim) * top_k_weights.unsqueeze(-1)
        return weighted.sum(dim=1)


class ToyLlama4Experts(nn.Module):
    """Llama4 experts: dense ``bmm`` over ``[E, T, H]`` inputs (already scaled by the router scores)."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.intermediate_size = config.intermediate_size
        self.hidden_size = config.hidden_size
        self.expert_dim = self.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(self.num_experts, self.hidden_size, 2 * self.expert_dim))
        self.down_proj = nn.Parameter(torch.empty((self.num_experts, self.expert_dim, self.hidden_size)))
        self.act_fn = nn.SiLU()

    def _toy_reset(self, generator):
        _normal_(self.gate_up_proj, 1 / math.sqrt(self.hidden_size), generator)
        _normal_(self.down_proj, 1 / math.sqrt(self.expert_dim), generator)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.view(self.gate_up_proj.shape[0], -1, self.hidden_size)
        gate_up = torch.bmm(hidden_states, self.gate_up_proj)
        gate, up = gate_up.chunk(2, dim=-1)
        next_states = torch.bmm((up * self.act_fn(gate)), self.down_proj)
        next_states = next_states.view(-1, self.hidden_size)
        return next_states


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------


class ToyConcatMoeBlock(nn.Module):
    """kind "concat": Qwen3MoeSparseMoeBlock."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.experts = ToyConcatExperts(config)
        self.gate = ToyTopKRouter(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states_reshaped = hidden_states.view(-1, hidden_dim)
        _, routing_weights, selected_experts = self.gate(hidden_states_reshaped)
        final_hidden_states = self.experts(hidden_states_reshaped, selected_experts, routing_weights)
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)


class ToyTransposedMoeBlock(nn.Module):
    """kind "transposed": Aria-layout experts behind a Qwen3 router."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.experts = ToyTransposedExperts(config)
        self.gate = ToyTopKRouter(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        original_shape = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_states.size(-1))
        _, top_k_weights, top_k_index = self.gate(hidden_states)
        expert_output = self.experts(hidden_states, top_k_index, top_k_weights).view(original_shape)
        return expert_output


class ToyGptOssMLP(nn.Module):
    """kind "interleaved": GptOssMLP; returns ``(hidden_states, router_scores)``."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.router = ToyGptOssTopKRouter(config)
        self.experts = ToyInterleavedExperts(config)

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        _, router_scores, router_indices = self.router(hidden_states)
        hidden_states = self.experts(hidden_states, router_indices, router_scores)
        hidden_states = hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return hidden_states, router_scores


class ToyNemotronHMoE(nn.Module):
    """kind "no_gate": NemotronHMoE (without the optional latent projections)."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.experts = ToyNoGateExperts(config)
        self.gate = ToyGroupedSigmoidRouter(config)
        self.shared_experts = ToyNoGateMLP(config.hidden_size, config.shared_size)

    def forward(self, hidden_states) -> torch.Tensor:
        residuals = hidden_states
        orig_shape = hidden_states.shape
        _, topk_weights, topk_indices = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        hidden_states = self.experts(hidden_states, topk_indices, topk_weights)
        hidden_states = hidden_states.view(*orig_shape)
        hidden_states = hidden_states + self.shared_experts(residuals)
        return hidden_states


class ToySharedSigmoidGateMoeBlock(nn.Module):
    """kind "shared_sigmoid_gate": Qwen2MoeSparseMoeBlock."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.gate = ToyTopKRouter(config)
        self.experts = ToyConcatExperts(config)
        self.shared_expert = ToyMLP(config.hidden_size, config.shared_size)
        self.shared_expert_gate = torch.nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states_reshaped = hidden_states.view(-1, hidden_dim)
        shared_expert_output = self.shared_expert(hidden_states_reshaped)
        _, routing_weights, selected_experts = self.gate(hidden_states_reshaped)
        expert_output = self.experts(hidden_states_reshaped, selected_experts, routing_weights)

        shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states_reshaped)) * shared_expert_output

        expert_output = expert_output + shared_expert_output
        expert_output = expert_output.reshape(batch_size, sequence_length, hidden_dim)
        return expert_output


class ToyDeepseekV3MoE(nn.Module):
    """kind "grouped_sigmoid_bias": DeepseekV3MoE."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.experts = ToyConcatExperts(config)
        self.gate = ToyGroupedSigmoidRouter(config)
        self.shared_experts = ToyMLP(config.hidden_size, config.shared_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residuals = hidden_states
        orig_shape = hidden_states.shape
        _, topk_weights, topk_indices = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        hidden_states = self.experts(hidden_states, topk_indices, topk_weights).view(*orig_shape)
        hidden_states = hidden_states + self.shared_experts(residuals)
        return hidden_states


class ToyTupleReturnMoeBlock(nn.Module):
    """kind "tuple_return": Qwen3-MoE block returning ``(hidden_states, router_logits)``."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.experts = ToyConcatExperts(config)
        self.gate = ToyTopKRouter(config)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states_reshaped = hidden_states.view(-1, hidden_dim)
        router_logits, routing_weights, selected_experts = self.gate(hidden_states_reshaped)
        final_hidden_states = self.experts(hidden_states_reshaped, selected_experts, routing_weights)
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits


class ToyMixtralSparseMoeBlock(nn.Module):
    """kind "modulelist_loop": transformers-v4 MixtralSparseMoeBlock; returns ``(hidden_states, router_logits)``."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.hidden_dim = config.hidden_size
        self.ffn_dim = config.intermediate_size
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(self.hidden_dim, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [ToyMixtralBlockSparseTop2MLP(self.hidden_dim, self.ffn_dim) for _ in range(self.num_experts)]
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        # router_logits: (batch * sequence_length, n_experts)
        router_logits = self.gate(hidden_states)

        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        # we cast back to the input dtype
        routing_weights = routing_weights.to(hidden_states.dtype)

        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device
        )

        # One hot encode the selected experts to create an expert mask
        # this will be used to easily index which expert is going to be sollicitated
        expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)

        # Loop over all available experts in the model and perform the computation on each expert
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])

            # Index the correct hidden states and compute the expert hidden state for
            # the current expert. We need to make sure to multiply the output hidden
            # states by `routing_weights` on the corresponding tokens (top-1 and top-2)
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]

            # However `index_add_` only support torch tensors for indexing so we'll use
            # the `top_x` tensor here.
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


class ToyMaskedLoopMoeBlock(nn.Module):
    """kind "masked_loop": hand-written style fx cannot trace: boolean row masks, ``if rows.any()``, ``out[rows] +=``."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.top_k, config.norm_topk_prob
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [ToyMixtralBlockSparseTop2MLP(config.hidden_size, config.intermediate_size) for _ in range(config.num_experts)]
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, index = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for expert_idx, expert in enumerate(self.experts):
            chosen = index == expert_idx
            rows = chosen.any(-1)
            if rows.any():
                out[rows] += expert(flat[rows]) * (weights * chosen).sum(-1, keepdim=True)[rows]
        return out.view_as(hidden_states)


class ToyWeightBank(nn.Module):
    """One projection of every expert, ``weight [E, in, out]``, applied to rows sorted by expert (grouped GEMM)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))

    def _toy_reset(self, generator: torch.Generator) -> None:
        _normal_(self.weight, 1 / math.sqrt(self.weight.shape[1]), generator)

    def forward(self, rows: torch.Tensor, rows_per_expert: torch.Tensor) -> torch.Tensor:
        parts = rows.split(rows_per_expert.tolist())
        return torch.cat([part @ weight for part, weight in zip(parts, self.weight)])


class ToySortedBanksMoeBlock(nn.Module):
    """kind "sorted_banks": Megablocks/Aria-style: rows sorted by expert through two weight banks, SwiGLU between."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.top_k, self.num_experts = config.top_k, config.num_experts
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.fc1 = ToyWeightBank(config.num_experts, config.hidden_size, 2 * config.intermediate_size)
        self.fc2 = ToyWeightBank(config.num_experts, config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits, index = self.router(flat).topk(self.top_k, dim=-1)
        weights = logits.softmax(-1)
        order = index.flatten().argsort(stable=True)
        rows_per_expert = torch.bincount(index.flatten(), minlength=self.num_experts)
        gate, up = self.fc1(flat[order // self.top_k], rows_per_expert).chunk(2, dim=-1)
        out = self.fc2(F.silu(gate) * up, rows_per_expert) * weights.flatten()[order, None]
        return torch.zeros_like(flat).index_add(0, order // self.top_k, out).view_as(hidden_states)


class _PackedSwiGLU(nn.Module):
    """Every expert's SwiGLU projections as three ``[E, out, in]`` parameters of this module: w1, w3, w2."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        experts, hidden, width = config.num_experts, config.hidden_size, config.intermediate_size
        self.w1 = nn.Parameter(torch.empty(experts, width, hidden))
        self.w3 = nn.Parameter(torch.empty(experts, width, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, width))

    def _toy_reset(self, generator: torch.Generator) -> None:
        for weight in (self.w1, self.w3, self.w2):
            _normal_(weight, 1 / math.sqrt(weight.shape[2]), generator)


class ToyGatheredExperts(_PackedSwiGLU):
    """Each projection of every expert as one ``[E, out, in]`` parameter, gathered per token and slot."""

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:  # -> [T, k, hidden]
        x1 = F.silu(torch.einsum("ti,taoi->tao", x, self.w1[expert_indices]))
        x3 = torch.einsum("ti,taoi->tao", x, self.w3[expert_indices])
        return torch.einsum("tao,taio->tai", x1 * x3, self.w2[expert_indices])


class ToyGatheredMoeBlock(nn.Module):
    """kind "gathered": gpt-fast's ``MOEFeedForward``: the block weights the per-slot expert outputs."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.hidden_size, self.top_k = config.hidden_size, config.top_k
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.cond_ffn = ToyGatheredExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)
        weights, indices = torch.topk(F.softmax(self.gate(x), dim=-1), self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return torch.einsum("tai,ta->ti", self.cond_ffn(x, indices), weights).view_as(hidden_states)


class ToySlicedLoopMoeBlock(_PackedSwiGLU):
    """kind "sliced_loop": expert weights on the block itself, one expert's slice at a time in a Python loop."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__(config)
        self.top_k, self.norm_topk_prob = config.top_k, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, chosen = F.softmax(self.gate(flat), dim=-1, dtype=torch.float32).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for expert in range(self.w1.shape[0]):
            token, slot = torch.where(chosen == expert)
            if token.numel() == 0:
                continue
            rows = flat[token]
            h = F.linear(F.silu(F.linear(rows, self.w1[expert])) * F.linear(rows, self.w3[expert]), self.w2[expert])
            out.index_add_(0, token, (h * weights[token, slot, None]).to(flat.dtype))
        return out.view_as(hidden_states)


class ToyHeadExperts(nn.Module):
    """JetMoE's ``JetMoeMoA``: a query and an output projection per expert, used through two methods."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.top_k, self.num_experts, self.head_size = config.top_k, config.num_experts, config.intermediate_size
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.query = ToyWeightBank(config.num_experts, config.hidden_size, config.intermediate_size)
        self.output = ToyWeightBank(config.num_experts, config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("used through map() and reduce()")

    def map(self, flat: torch.Tensor):
        """Each token's query from each of its experts: ``[T, k, head]``, and how to put rows back."""
        logits, index = self.router(flat).topk(self.top_k, dim=-1)
        order = index.flatten().argsort(stable=True)
        rows_per_expert = torch.bincount(index.flatten(), minlength=self.num_experts)
        queries = self.query(flat[order // self.top_k], rows_per_expert)
        slots = torch.zeros(order.shape[0], self.head_size, dtype=queries.dtype, device=queries.device)
        slots = slots.index_copy(0, order, queries)
        return slots.view(flat.shape[0], self.top_k, -1), (order, rows_per_expert, logits.softmax(-1))

    def reduce(self, attended: torch.Tensor, topology) -> torch.Tensor:
        order, rows_per_expert, weights = topology
        rows = self.output(attended.reshape(-1, self.head_size)[order], rows_per_expert)
        rows = rows * weights.flatten()[order, None].to(rows.dtype)
        out = torch.zeros(attended.shape[0], rows.shape[-1], dtype=rows.dtype, device=rows.device)
        return out.index_add(0, order // self.top_k, rows)


class ToyMixtureOfHeadsAttention(nn.Module):
    """kind "attention_heads": causal attention whose per-slot queries and output projections are experts."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.experts = ToyHeadExperts(config)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        queries, topology = self.experts.map(hidden_states.reshape(-1, hidden))
        keys, values = self.kv_proj(hidden_states)[:, None].chunk(2, dim=-1)  # one head shared by every slot
        queries = queries.view(batch, seq, self.experts.top_k, -1).transpose(1, 2)
        attended = F.scaled_dot_product_attention(queries, keys, values, is_causal=True)
        attended = attended.transpose(1, 2).reshape(batch * seq, self.experts.top_k, -1)
        return self.experts.reduce(attended, topology).view_as(hidden_states)


class ToyLlama4TextMoe(nn.Module):
    """kind "scores_on_inputs": Llama4TextMoe; returns ``(hidden_states, router_logits)``.

    Unlike the real block (which returns ``[T, H]``), the output is reshaped back to the input shape.
    """

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.top_k = config.top_k
        self.hidden_dim = config.hidden_size
        self.num_experts = config.num_experts
        self.experts = ToyLlama4Experts(config)
        self.router = ToyLlama4Router(config)
        self.shared_expert = ToyMLP(config.hidden_size, config.shared_size)

    def forward(self, hidden_states):
        orig_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_scores, router_logits = self.router(hidden_states)
        routed_in = hidden_states.repeat(router_scores.shape[1], 1)
        routed_in = routed_in * router_scores.transpose(0, 1).reshape(-1, 1)
        routed_out = self.experts(routed_in)
        out = self.shared_expert(hidden_states)
        out.add_(routed_out.reshape(router_scores.shape[1], -1, routed_out.shape[-1]).sum(dim=0))
        return out.reshape(orig_shape), router_logits


class ToyPostNormMoeBlock(nn.Module):
    """kind "post_norm": a Qwen3 router in front of experts that norm each expert's output before the combine."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.experts = ToyPostNormExperts(config)
        self.gate = ToyTopKRouter(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, top_k_weights, top_k_index = self.gate(flat)
        return self.experts(flat, top_k_index, top_k_weights).reshape(hidden_states.shape)


_BLOCK_CLASSES: dict[str, type[nn.Module]] = {
    "concat": ToyConcatMoeBlock,
    "transposed": ToyTransposedMoeBlock,
    "interleaved": ToyGptOssMLP,
    "no_gate": ToyNemotronHMoE,
    "shared_sigmoid_gate": ToySharedSigmoidGateMoeBlock,
    "grouped_sigmoid_bias": ToyDeepseekV3MoE,
    "tuple_return": ToyTupleReturnMoeBlock,
    "modulelist_loop": ToyMixtralSparseMoeBlock,
    "scores_on_inputs": ToyLlama4TextMoe,
    "masked_loop": ToyMaskedLoopMoeBlock,
    "sorted_banks": ToySortedBanksMoeBlock,
    "gathered": ToyGatheredMoeBlock,
    "sliced_loop": ToySlicedLoopMoeBlock,
    "attention_heads": ToyMixtureOfHeadsAttention,
    "post_norm": ToyPostNormMoeBlock,
}
assert tuple(_BLOCK_CLASSES) == KINDS


# ---------------------------------------------------------------------------------------------------------------
# Public factory functions
# ---------------------------------------------------------------------------------------------------------------


def _reset_parameters(block: nn.Module, generator: torch.Generator) -> None:
    for module in block.modules():  # deterministic (registration) order
        if hasattr(module, "_toy_reset"):
            module._toy_reset(generator)
        elif isinstance(module, nn.Linear):
            _normal_(module.weight, 1 / math.sqrt(module.in_features), generator)
            if module.bias is not None:
                _normal_(module.bias, _BIAS_STD, generator)


def make_toy_block(config: ToyMoEConfig, *, seed: int = 0) -> nn.Module:
    """Build the toy MoE block of ``config.kind`` with seeded random-normal weights, in ``config.dtype``, eval mode.

    Weights are drawn in float32 (std ``1/sqrt(fan_in)``; biases and ``e_score_correction_bias`` std 0.1) and then
    cast, so the same seed gives the same (rounded) weights in every dtype.  As in transformers
    (``_keep_in_fp32_modules_strict``), ``e_score_correction_bias`` stays float32 whatever ``config.dtype`` is.
    """
    if not isinstance(config, ToyMoEConfig):
        raise TypeError(f"config must be a ToyMoEConfig, got {type(config).__name__}")
    generator = torch.Generator().manual_seed(seed)
    block = _BLOCK_CLASSES[config.kind](config)
    _reset_parameters(block, generator)
    keep_fp32 = {}
    for name, module in block.named_modules():
        for buffer_name in getattr(module, "_keep_in_fp32_buffers", ()):
            keep_fp32[(name, buffer_name)] = getattr(module, buffer_name).detach().clone()
    block = block.to(config.dtype)
    for (name, buffer_name), value in keep_fp32.items():
        setattr(block.get_submodule(name), buffer_name, value.to(torch.float32))
    block.eval()
    return block


def example_hidden_states(config: ToyMoEConfig, *, batch: int = 1, seq: int = 5, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal hidden states of shape ``[batch, seq, hidden_size]`` in ``config.dtype``."""
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, config.hidden_size, generator=generator, dtype=torch.float32)
    return x.to(config.dtype)


def main_output(output) -> torch.Tensor:
    """The hidden-states output of any toy block (first element for the tuple-returning kinds)."""
    return output[0] if isinstance(output, tuple) else output
