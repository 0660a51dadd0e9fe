"""Forcing a block's routing choices to every group of experts: which forced runs give every expert every token.

The rule of last resort (``detect/last_resort.py``) finds the choice calls; this module probes them
(``cover``: steps 2-3 of that module's docstring) and checks the result (``check_rows``: step 4): each
expert's rows in the real forward are among its rows when forced, bit for bit.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import fx, nn

from .. import errors
from ..trace.forcing import ChoiceCall, forcing, fresh_inputs
from ..trace.inputs import call_by_name
from .graph_utils import value

__all__ = ["ForcedRun", "groups", "cover", "full_experts", "check_rows", "rows_given", "among"]

_MAX_PROBES = 64  # forced runs tried at detection (the product of every choice call's groups), or 4 per expert


@dataclass(frozen=True)
class ForcedRun:
    """One forced run of calibration: each choice call's forced experts, and the experts it observes."""

    choices: tuple[tuple[ChoiceCall, tuple[int, ...]], ...]
    observed: frozenset[int]

    def forcing(self) -> dict[ChoiceCall, torch.Tensor]:
        return {choice: torch.tensor(experts) for choice, experts in self.choices}


def groups(choice: ChoiceCall, size: int) -> list[tuple[int, ...]]:
    """``choice``'s options in groups of ``k`` (the last group ends at the last option)."""
    return [tuple(range(min(start, size - choice.k), min(start, size - choice.k) + choice.k))
            for start in range(0, size, choice.k)]


def cover(block: nn.Module, bound: dict, entries: list[nn.Module], choices: list[ChoiceCall], sizes: list[int],
          tokens: int, where: str | None, loop: str = "",
          parts: list[list[nn.Module]] | None = None) -> tuple[list[ForcedRun], dict[int, torch.Tensor], int]:
    """The forced runs that give every expert every token (module docstring, 2-3), each expert's rows there, and k
    (``loop``: words on choices made in a loop, for the refusal; ``parts``: each expert's entries of lists parallel
    to ``entries``, ``full_experts``)."""
    combinations = list(itertools.product(*(groups(c, s) for c, s in zip(choices, sizes))))
    if len(combinations) > max(_MAX_PROBES, 4 * len(entries)):
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"forcing its {len(choices)} routing choices{loop} "
                                  f"would take {len(combinations)} runs to probe", source=where)
    runs, taken, k, failure = [], {}, 0, None
    for combination in combinations:
        run = ForcedRun(tuple(zip(choices, combination)), frozenset())
        full, raised = full_experts(block, bound, entries, run, tokens, parts)
        failure = failure or raised
        k = max(k, len(full))
        new = {e: rows for e, rows in full.items() if e not in taken}
        if new:
            runs.append(ForcedRun(run.choices, frozenset(new)))
            taken.update(new)
    missing = [e for e in range(len(entries)) if e not in taken]
    if missing:
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"forcing the routing choice to every group of experts "
                                  f"never gives expert(s) {missing} all {tokens} tokens (a capacity that drops "
                                  "tokens, a threshold that drops a chosen expert by its score, or experts chosen by "
                                  "something besides the scores)", source=where) from failure
    return runs, taken, k


def full_experts(block: nn.Module, bound: dict, entries: list[nn.Module], run: ForcedRun, tokens: int,
                 parts: list[list[nn.Module]] | None = None) -> tuple[dict[int, torch.Tensor], Exception | None]:
    """The experts given one non-zero row per token under ``run``'s forcing, and those rows (or what it raised).
    An expert split over parallel lists (``parts[e]``: its entries of the others) is full only where each of its
    parts is given one row per token too: the rows of its first part may be its only ones to reach a Linear."""
    parts = parts or [[] for _ in entries]
    try:
        with torch.no_grad(), forcing(run.forcing()), rows_given(entries) as seen, \
                rows_given([m for part in parts for m in part]) as more:
            call_by_name(block, fresh_inputs(bound))
    except Exception as error:  # a combination the block's code cannot take (one expert chosen twice) covers nothing
        return {}, error
    full, counts = {}, iter([sum(r.shape[0] for r in given) for given in more])
    for expert, given in enumerate(seen):
        rows = torch.cat(given) if given else None
        whole = [next(counts) == tokens for _ in parts[expert]]
        if rows is not None and rows.shape[0] == tokens and bool((rows != 0).any(-1).all()) and all(whole):
            full[expert] = rows
    return full, None


def check_rows(block: nn.Module, entries: list[nn.Module], calls: list[fx.Node], taken: dict[int, torch.Tensor],
               where: str | None) -> None:
    """Each expert's non-zero rows in the real forward are among its rows when forced (bit for bit)."""
    number = {id(m): i for i, m in enumerate(entries)}
    given: dict[int, list[torch.Tensor]] = {}
    for call in calls:
        rows = next(value(a) for a in (*call.args, *call.kwargs.values()) if isinstance(value(a), torch.Tensor))
        rows = rows.reshape(-1, rows.shape[-1])
        given.setdefault(number[id(block.get_submodule(call.target))], []).append(rows[(rows != 0).any(-1)])
    for expert, parts in given.items():
        rows, forced = torch.cat(parts), taken[expert]
        if not among(rows, forced):
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"forced to take every token, expert {expert} is "
                                      "not given the rows the real forward gives it (its input depends on the "
                                      "experts chosen beside it, or on more than the routing choice)", source=where)


@contextmanager
def rows_given(modules: list[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """Within, the rows of the first tensor input of every call of each module, per module."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]

    def keeper(rows: list[torch.Tensor]):
        def keep(module, args, kwargs):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is not None:
                rows.append(first.reshape(-1, first.shape[-1]))
        return keep

    handles = [m.register_forward_pre_hook(keeper(rows), with_kwargs=True) for m, rows in zip(modules, seen)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def among(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    """Is each row of ``rows`` a row of ``pool``, bit for bit, counted with multiplicity?"""
    keys, have = torch.unique(pool, dim=0, return_counts=True)
    wanted, need = torch.unique(rows, dim=0, return_counts=True)
    equal = (wanted[:, None, :] == keys[None, :, :]).all(-1)
    return bool(((equal * have[None, :]).sum(-1) >= need).all())
