"""Token rows the block itself writes into its experts' rows, and contracts inline with its own expert weights.

Code that keeps its experts as ``[E, a, b]`` parameters on the block (Tutel's
torch path, nanoMoE) fills a buffer of rows per expert with copies of token
rows by index ops (``buf[ids, rank] = x``, ``buf.index_add_(0, ids * C + pos,
x)``), contracts it with its weights in its own forward
(``bmm(buf.view(E, C, H), w1)``, an activation, ``bmm(h, w2)``) and reads the
outputs back by the same indices. No module boundary marks the experts: the
rows enter at the first contraction (``entry``) and leave at the last
(``exit``), each the ``ordinal``-th call of its function in the forward.

Every row between holds one token or zeros, and the experts compute each row
on its own, so a row's output depends on nothing but the token it holds.
Within :func:`every_token_in_every_row`, the entry runs on every token in
every expert's rows instead, and the exit's output gives each row of the
block's own buffer its token's output (a row of zeros: zeros; the block reads
it back nowhere). Which token a row holds is read from the values, a row being
an exact copy: rows that hold the same values have the same outputs whichever
token they are taken for.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .. import errors
from .dispatch import every_token, slot_outputs
from .record import flat_args

__all__ = ["RowDispatch", "row_keys", "row_tokens", "token_rows", "every_token_in_every_row"]


@dataclass(frozen=True)
class RowDispatch:
    """Where the block's own expert contractions start and end (module docstring).

    ``entry``/``exit``: ``(function, ordinal)`` of the first and last contraction of whole expert weights;
    ``operand``: which tensor operand of the entry holds the rows; ``expert_axis``: the dimension of those rows
    (and of the exit's output) that indexes the ``num_experts`` experts.
    """

    entry: tuple[Callable, int]
    exit: tuple[Callable, int]
    operand: int
    expert_axis: int
    num_experts: int


def token_rows(args: tuple, kwargs: dict, width: int) -> torch.Tensor | None:
    """The block's token rows: its first floating-point tensor input of last size ``width``, flattened."""
    found = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()
             and a.dim() and a.shape[-1] == width]
    return found[0].reshape(-1, width) if found else None


def row_keys(rows: torch.Tensor) -> torch.Tensor:
    """One int64 per row (the first dimension) from its bits (wrapping sums are exact, so equal rows get equal
    keys)."""
    bits = rows.reshape(rows.shape[0], math.prod(rows.shape[1:])).contiguous()
    integers = bits.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[bits.element_size()])
    generator = torch.Generator().manual_seed(0)
    multipliers = torch.randint(1, 2 ** 62, (bits.shape[1],), generator=generator).to(rows.device) | 1
    return (integers.to(torch.int64) * multipliers).sum(-1)


def row_tokens(given: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
    """Per row of ``given`` (all dimensions but the last), 1 + the number of a token row it is an exact copy of,
    0 for a row of zeros; None where some row is neither."""
    rows, tokens = given.reshape(-1, given.shape[-1]), tokens.to(given.dtype)
    if not tokens.shape[0] or rows.element_size() not in (2, 4, 8) or not rows.is_floating_point():
        return None
    keys, order = row_keys(tokens).sort()
    candidates = order[torch.searchsorted(keys, row_keys(rows)).clamp(max=len(keys) - 1)]
    copies = (tokens[candidates] == rows).all(-1)
    empty = (rows == 0).all(-1) & ~copies
    if not (copies | empty).all():
        return None
    return torch.where(copies, candidates + 1, 0).reshape(given.shape[:-1])


class _EveryRow(TorchFunctionMode):
    """Swaps the entry's rows for every token in every expert's rows, and maps the exit's output back."""

    def __init__(self, dispatch: RowDispatch, inputs: tuple[tuple, dict]) -> None:
        super().__init__()
        self.dispatch, self.inputs, self.calls = dispatch, inputs, {}
        self.swapped: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, every, row tokens)
        self.done = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.done or func not in (self.dispatch.entry[0], self.dispatch.exit[0]):
            return func(*args, **kwargs)
        ordinal = self.calls.get(func, 0)
        self.calls[func] = ordinal + 1
        if self.swapped is None and (func, ordinal) == self.dispatch.entry:
            self.swapped = self._every(args)
        if self.swapped is not None:  # the same rows contracted again (w1 and w3 of one expert): swapped alike
            rows, every, _ = self.swapped
            args, kwargs = tree_map(lambda a: every if a is rows else a, (args, kwargs))
        out = func(*args, **kwargs)
        if self.swapped is not None and (func, ordinal) == self.dispatch.exit:
            self.done = True
            return slot_outputs(out, self.swapped[2], self.dispatch.expert_axis, self.dispatch.num_experts)
        return out

    def _every(self, args: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [a for a in flat_args(args) if isinstance(a, torch.Tensor)][self.dispatch.operand]
        tokens = token_rows(*self.inputs, rows.shape[-1])
        found = None if tokens is None else row_tokens(rows, tokens)
        if found is None:
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "a row the block contracts its expert weights "
                                      "with is neither a copy of one of its input's rows nor zeros in this batch")
        every = every_token(tokens.to(rows.dtype), rows, self.dispatch.expert_axis, self.dispatch.num_experts)
        return rows, every, found


@contextmanager
def every_token_in_every_row(dispatch: RowDispatch, args: tuple, kwargs: dict) -> Iterator[None]:
    """Within, the block called with ``args``/``kwargs`` runs its experts on every token (module docstring)."""
    with _EveryRow(dispatch, (args, kwargs)):
        yield
