"""Hypothesis strategies for MoE equivalence tests.

Example:
    >>> from hypothesis import given
    >>> @given(toy_configs(kinds=["concat"]))        # doctest: +SKIP
    ... def test(config): ...
"""

from __future__ import annotations

from typing import Sequence

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from .toy_moe import KINDS, ToyMoEConfig

__all__ = ["toy_configs", "token_counts"]

_GROUPED = {"no_gate", "grouped_sigmoid_bias"}


@st.composite
def toy_configs(
    draw,
    *,
    kinds: Sequence[str] = KINDS,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    max_experts: int = 8,
) -> ToyMoEConfig:
    """Toy block configs: kind, sizes, number of experts and k (up to k == experts) are drawn."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise InvalidArgument(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    if max_experts < 2:
        raise InvalidArgument(f"max_experts must be >= 2, got {max_experts}")
    kind = draw(st.sampled_from(list(kinds)), label="kind")
    num_experts = draw(st.integers(2, max_experts), label="num_experts")
    n_group, topk_group = 1, 1
    if kind in _GROUPED:
        divisors = [g for g in range(1, num_experts + 1) if num_experts % g == 0 and num_experts // g >= 2]
        n_group = draw(st.sampled_from(divisors), label="n_group")
        topk_group = draw(st.integers(1, n_group), label="topk_group")
    max_k = min(num_experts, topk_group * (num_experts // n_group))
    return ToyMoEConfig(
        kind=kind,
        hidden_size=draw(st.sampled_from([8, 16, 32]), label="hidden_size"),
        intermediate_size=draw(st.sampled_from([8, 12, 24, 32]), label="intermediate_size"),
        num_experts=num_experts,
        top_k=draw(st.integers(1, max_k), label="top_k"),
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=draw(st.booleans(), label="norm_topk_prob"),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5]), label="routed_scaling_factor"),
        dtype=draw(st.sampled_from(list(dtypes)), label="dtype"),
    )


def token_counts(*, max_tokens: int = 40) -> st.SearchStrategy[int]:
    """Numbers of tokens, one token included."""
    if max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be >= 1, got {max_tokens}")
    return st.one_of(st.just(1), st.integers(1, max_tokens))
