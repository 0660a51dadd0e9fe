"""Example inputs for one block, made from the block's own parameters.

No data set is needed: the hidden size is one of the dimensions of the block's
parameters, so each candidate size is tried (most frequent first) until the
forward runs and calls the experts container.
"""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Callable

import torch
from torch import nn

__all__ = ["hidden_size_candidates", "synthesize_inputs", "required_inputs"]


def hidden_size_candidates(block: nn.Module, container: nn.Module) -> list[int]:
    """Sizes that could be the hidden size, most plausible first."""
    container_dims = {d for p in container.parameters(recurse=False) for d in p.shape[1:]}
    counts = Counter(d for p in block.parameters() for d in p.shape if d > 1)
    ranked = sorted(container_dims, key=lambda d: (-counts[d], d))
    return ranked + [d for d, _ in counts.most_common() if d not in container_dims]


def required_inputs(block: nn.Module) -> list[str]:
    """Names of forward parameters with no default (beyond the first)."""
    params = list(inspect.signature(block.forward).parameters.values())
    return [
        p.name
        for p in params[1:]
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def synthesize_inputs(
    block: nn.Module,
    container: nn.Module,
    accepts: Callable[[tuple], bool],
    *,
    num_tokens: int,
    seed: int = 0,
) -> tuple | None:
    """The first ``(hidden_states,)`` that ``accepts`` takes, or None.

    Tries ``[1, tokens, H]`` then ``[tokens, H]`` for each candidate ``H``.
    """
    reference = next(container.parameters())
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for hidden in hidden_size_candidates(block, container):
        for shape in ((1, num_tokens, hidden), (num_tokens, hidden)):
            x = torch.randn(shape, generator=generator).to(dtype=reference.dtype, device=reference.device)
            if accepts((x,)):
                return (x,)
    return None
