"""Functions that generated block code calls (fx prints them by qualified name): an expert on its other rows.

The projection numerics that expert templates call are in ``autocal/numerics.py``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["RowComplement", "inputs_seen", "run_on_the_rest", "run_unrouted", "unrouted_rows"]

def unrouted_rows(source: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """The rows of ``source`` whose index is not in ``routed``."""
    unrouted = torch.ones(source.shape[0], dtype=torch.bool, device=source.device)
    unrouted[routed] = False
    return source[unrouted]


def run_unrouted(expert: nn.Module, source: torch.Tensor, routed: torch.Tensor, enabled: bool) -> None:
    """With ``enabled``, run ``expert`` on the rows of ``source`` not in ``routed``; the result is discarded."""
    if not enabled:
        return
    rows = unrouted_rows(source, routed)
    if rows.shape[0]:
        expert(rows)


class RowComplement:
    """The rows of ``source`` that an expert was not given, from the rows it was given (compared by value).

    Each given row claims one equal row of ``source`` (a multiset difference):
    equal rows are interchangeable for calibration, so which of two equal rows
    is left does not matter. Rows are compared by their bits, through an exact
    integer hash computed once for ``source``.
    """

    def __init__(self, source: torch.Tensor) -> None:
        self.source = source
        keys = _row_keys(source)
        self.order = torch.argsort(keys, stable=True)
        self.keys = keys[self.order]
        self.rank = torch.arange(self.keys.numel(), device=source.device) - torch.searchsorted(self.keys, self.keys)

    def rest(self, given: list[torch.Tensor]) -> torch.Tensor:
        given = [rows for rows in given if rows.shape[0]]
        if not given or not self.keys.numel():
            return self.source
        keys, counts = torch.unique(_row_keys(torch.cat(given).to(self.source.dtype)), return_counts=True)
        slot = torch.searchsorted(keys, self.keys).clamp(max=keys.numel() - 1)
        claimed = torch.where(keys[slot] == self.keys, counts[slot], 0)
        left = torch.empty_like(self.rank, dtype=torch.bool)
        left[self.order] = self.rank >= claimed
        return self.source[left]


def _row_keys(rows: torch.Tensor) -> torch.Tensor:
    """One int64 per row from its bits (wrapping sums are exact, so equal rows get equal keys)."""
    bits = rows.reshape(rows.shape[0], math.prod(rows.shape[1:])).contiguous()
    integers = bits.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[bits.element_size()])
    generator = torch.Generator().manual_seed(0)
    multipliers = torch.randint(1, 2 ** 62, (bits.shape[1],), generator=generator).to(rows.device) | 1
    return (integers.to(torch.int64) * multipliers).sum(-1)


@contextmanager
def inputs_seen(modules: list[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """Within, the first tensor input of every call of each module, per module."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]

    def keep(index: int):
        def hook(module, args, kwargs):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is not None:
                seen[index].append(first.reshape(-1, first.shape[-1]))
        return hook

    handles = [m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def run_on_the_rest(expert: nn.Module, rows: RowComplement, seen: list[torch.Tensor]) -> None:
    """Run ``expert`` on the rows it was not given in the block's own forward (``seen``), output discarded.

    By value rather than by a recorded recipe of which rows go where: a recipe
    replays constants recorded at one number of tokens (a capacity, the counts
    behind slices of rows sorted by expert), the rows an expert was really given
    are what they are.
    """
    rest = rows.rest(seen)
    if rest.shape[0]:
        expert(rest)
