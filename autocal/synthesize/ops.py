"""Functions that generated block code calls (fx prints them by qualified name): an expert on its other rows.

The projection numerics that expert templates call are in ``autocal/numerics.py``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..trace.rows import row_keys

__all__ = ["RowComplement", "Seen", "inputs_seen", "run_on_the_rest", "run_unrouted", "unrouted_input",
           "unrouted_rows"]

def unrouted_rows(source: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """The rows of ``source`` whose index is not in ``routed``."""
    unrouted = torch.ones(source.shape[0], dtype=torch.bool, device=source.device)
    unrouted[routed] = False
    return source[unrouted]


def run_unrouted(expert: nn.Module, source: torch.Tensor, routed: torch.Tensor, enabled: bool, *others,
                 **named) -> None:
    """With ``enabled``, run ``expert`` on the rows of ``source`` not in ``routed``; the result is discarded.
    ``others`` and ``named``: the expert call's other inputs (see :func:`unrouted_input`)."""
    if not enabled:
        return
    rows = unrouted_rows(source, routed)
    if rows.shape[0]:
        count = routed.shape[0] if routed.dim() == 1 else None
        expert(rows, *(unrouted_input(a, count, rows.shape[0]) for a in others),
               **{k: unrouted_input(v, count, rows.shape[0]) for k, v in named.items()})


def unrouted_input(given: object, count: int | None, rows: int) -> object:
    """An expert's input beside its rows, for a call on ``rows`` rows it was not routed: one with a row per routed
    row (``count`` of them: a routing weight handed in, ``expert(rows, weights)``) becomes ones, as for a token
    routed with weight one (the expert's own computation, unscaled); any other stays as given."""
    if isinstance(given, torch.Tensor) and given.dim() and given.is_floating_point() and given.shape[0] == count:
        return given.new_ones(rows, *given.shape[1:])
    return given


class RowComplement:
    """The rows of ``source`` that an expert was not given, from the rows it was given (compared by value).

    Each given row claims one equal row of ``source`` (a multiset difference):
    equal rows are interchangeable for calibration, so which of two equal rows
    is left does not matter. Rows are compared by their bits, through an exact
    integer hash computed once for ``source``.
    """

    def __init__(self, source: torch.Tensor) -> None:
        self.source = source
        keys = row_keys(source)
        self.order = torch.argsort(keys, stable=True)
        self.keys = keys[self.order]
        self.rank = torch.arange(self.keys.numel(), device=source.device) - torch.searchsorted(self.keys, self.keys)

    def rest(self, given: list[torch.Tensor]) -> torch.Tensor:
        given = [rows for rows in given if rows.shape[0]]
        if not given or not self.keys.numel():
            return self.source
        keys, counts = torch.unique(row_keys(torch.cat(given).to(self.source.dtype)), return_counts=True)
        slot = torch.searchsorted(keys, self.keys).clamp(max=keys.numel() - 1)
        claimed = torch.where(keys[slot] == self.keys, counts[slot], 0)
        left = torch.empty_like(self.rank, dtype=torch.bool)
        left[self.order] = self.rank >= claimed
        return self.source[left]


class Seen(list):
    """The rows a module was given, call by call; ``call``: the arguments of its first call (the rows among them)."""

    call: tuple[tuple, dict] | None = None


@contextmanager
def inputs_seen(modules: list[nn.Module]) -> Iterator[list[Seen]]:
    """Within, the first tensor input of every call of each module, per module."""
    seen = [Seen() for _ in modules]

    def keep(index: int):
        def hook(module, args, kwargs):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is not None:
                seen[index].append(first.reshape(-1, first.shape[-1]))
                seen[index].call = seen[index].call or (args, kwargs)
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
        args, kwargs = _with_rows(getattr(seen, "call", None), rest)
        expert(*args, **kwargs)


def _with_rows(call: tuple[tuple, dict] | None, rest: torch.Tensor) -> tuple[tuple, dict]:
    """The arguments of an expert's recorded ``call`` with ``rest`` for its rows (its first tensor). Its other
    inputs stay; those with a row per row (a routing weight handed in, ``expert(rows, weights)``) become ones, as
    for a token routed with weight one: the expert's own computation, unscaled."""
    if call is None:
        return (rest,), {}
    args, kwargs = call
    rows = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    count = rows.shape[0] if rows.dim() == 2 else None  # rows laid out otherwise: no input is taken as per row

    def swap(a):
        return rest if a is rows else unrouted_input(a, count, rest.shape[0])
    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}
