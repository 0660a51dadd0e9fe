"""Experts split over parallel lists: expert ``e`` is the ``e``-th entry of each (one list per projection).

Reference inference code and research MoEs keep one ``ModuleList`` per projection (``w1[e]``, ``w3[e]``,
``w2[e]``), LoRA-style experts one per factor (``A[e]``, ``B[e]``). Each list looks like an expert set of its own
beside the router; they are one set when the recording shows their entries indexed together. The rule of last
resort (``detect/last_resort.py``) finds one list whose entries receive the token rows (its *primary* list); this
module finds the lists parallel to it, by structure and the recording alone (never by their names):

1. a *candidate* is another list of the block with as many entries, each made of Linears;
2. it is *parallel* when the recording shows each call of its entry ``e`` tied to a call of the primary's entry
   ``e`` (both given the same rows, bit for bit, or one computed from the other: ``w2[e]`` consumes ``w1[e]``'s product), and
   to none of another entry (a list run after every expert, on their sum, is no part of one).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import fx, nn

from .block import _lists_in, identical_entries
from .graph_utils import Ancestry, value
from .linear_like import made_of_linears

__all__ = ["several_sets", "parallel_candidates", "parallel_lists"]


def several_sets(lists: Iterable[str]) -> str:
    """Why a block with several lists of experts, each beside a router, is no one set of experts."""
    names = list(lists)
    return (f"{len(names)} lists of experts ({', '.join(names)}), each beside a router: several expert sets (the "
            "recorded-block rule's kind)")


def parallel_candidates(block: nn.Module, name: str, count: int) -> dict[str, list[nn.Module]]:
    """The block's lists other than ``name`` with ``count`` identical entries made of Linears (step 1), by path."""
    found = {}
    for path, container, _ in _lists_in(block):
        entries = identical_entries(container)
        if path != name and len(entries) == count == len(container) and made_of_linears(entries[0]):
            found[path] = entries
    return found


def parallel_lists(graph: fx.Graph, paths: dict[str, tuple[str, int]], primary: str) -> list[str]:
    """The lists (of those ``paths`` maps each recorded entry to: ``(list, entry number)``) whose every call is tied
    to the ``primary`` list's entry of its number and to no other of its entries (step 2)."""
    calls: dict[str, list[tuple[fx.Node, int]]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in paths:
            owner, number = paths[node.target]
            calls.setdefault(owner, []).append((node, number))
    ancestry, own = Ancestry(graph), calls.get(primary, [])
    return [owner for owner, made in calls.items() if owner != primary and own and all(
        _tied_to(ancestry, call, number, own) for call, number in made)]


def _tied_to(ancestry: Ancestry, call: fx.Node, number: int, primary: list[tuple[fx.Node, int]]) -> bool:
    """Is ``call`` tied to a primary call of entry ``number`` and computed from (or into) none of another entry?
    Sharing rows with another entry's call is no tie against it: a top-k of every expert gives them all the same
    rows."""
    computed = {other for node, other in primary
                if ancestry.is_ancestor(node, call) or ancestry.is_ancestor(call, node)}
    shared = {other for node, other in primary if _shares_rows(node, call)}
    return computed <= {number} and number in computed | shared


def _shares_rows(one: fx.Node, other: fx.Node) -> bool:
    """Are two calls given the same rows: one node, or rows equal bit for bit (gathered twice, ``w1[e](x[t])`` and
    ``w3[e](x[t])``)?"""
    if not (one.args and other.args):
        return False
    if one.args[0] is other.args[0]:
        return True
    rows, others = value(one.args[0]), value(other.args[0])
    return isinstance(rows, torch.Tensor) and isinstance(others, torch.Tensor) and rows.shape == others.shape \
        and rows.dtype == others.dtype and bool(torch.equal(rows, others))
