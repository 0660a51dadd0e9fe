"""Rows each expert's gathered weight is contracted with, counted at run time (``detect/gathered.py``): the
check that forcing the routing decides which expert gets which token, and whether every expert already sees
every token in the block's own forward."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..trace.decompose import not_padding
from ..trace.forcing import fresh_inputs
from ..trace.gathers import GatherTracker
from ..trace.inputs import BlockCall, one_token
from .gathered_plan import GatheredWeight
from .listed import tracked

__all__ = ["every_row_everywhere", "rows_per_expert"]


def every_row_everywhere(block: nn.Module, call: BlockCall, weights: list[GatheredWeight], num_experts: int) -> bool:
    """Does every expert's slice of the first gathered weight take every token's row in the block's own forward
    (``x @ w[e]`` on all tokens in a loop over the experts, the routing only in the weights that combine them),
    also for one token (where a loop over the experts chosen would skip the others)?"""
    runs = [(call.args, call.kwargs), one_token(call.args, call.kwargs)]
    for args, kwargs in [(a, k) for a, k in runs if a is not None]:
        hidden = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
        with torch.no_grad(), rows_per_expert(block, weights, num_experts) as counts:
            block(*fresh_inputs(args), **fresh_inputs(kwargs))
        if counts[0] != [hidden.numel() // hidden.shape[-1]] * num_experts:
            return False
    return True


@contextmanager
def rows_per_expert(block: nn.Module, weights: list[GatheredWeight], num_experts: int) -> Iterator[list]:
    """Within, the rows per expert that the first gathered weight is contracted with, summed over the forward
    (without a bias, the rows that are not all zeros: ``synthesize/gathered.py`` calibrates no padding)."""
    counts = [0] * num_experts

    def count(key, index, features, func, args, kwargs):
        if index is None:  # the parameter itself, not gathered
            return None
        if isinstance(index, int):  # all-zero rows left out as calibration leaves them out (a loop's padding)
            rows = features.reshape(-1, features.shape[-1])
            counts[index] += rows.shape[0] if first.bias else not_padding(rows).numel()
        else:
            for expert, rows in enumerate(torch.bincount(index.flatten(), minlength=num_experts).tolist()):
                counts[expert] += rows
        return None

    first = weights[0]
    params, entries = tracked(block, first.param, None, first.bias)
    with GatherTracker(params, count, entries):
        yield [counts]
