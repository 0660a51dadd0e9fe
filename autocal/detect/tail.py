"""The per-route ops an expert's output goes through after it leaves the expert and before the weighted sum.

A container may write each route's output into a buffer, one row per route
(``buffer[rows] = out``), and only then process every row (ergo's per-expert
RMS norm, its scale gathered by the row's expert index) before it weights and
sums the routes. Those ops are part of each expert's computation up to the
combine: ``route_tail`` finds them, ``per_route_entry`` turns a per-route
gather of a per-expert parameter into the expert's own entry, and
``sums_over_slots`` says whether the routes are combined by a sum over the slot
dimension, which the synthesized container then repeats so that it rounds as
the original does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx

from .graph_utils import Ancestry, target_name, tensor_inputs, value

if TYPE_CHECKING:
    from .experts import ExpertsRecording

__all__ = ["EXPERT_ATTR", "route_tail", "sums_over_slots", "per_route_entry"]

# Generated expert code reaches its own expert number through this attribute (its entry of a per-expert parameter).
EXPERT_ATTR = "_autocal_expert"
# Ops that write an expert's rows into a buffer the container combines later.
_SCATTER_OPS = {"__setitem__", "index_put_", "index_copy_"}


def route_tail(rec: ExpertsRecording, contribution: fx.Node,
               ancestry: Ancestry) -> tuple[fx.Node | None, list[fx.Node]]:
    """The per-row ops between a buffer of unweighted expert outputs, one row per route, and the routing weights.

    Returns the buffer and the ops in graph order, or ``(None, [])`` when the
    contribution is not written into such a buffer.
    """
    if rec.weights is None or rec.index is None:
        return None, []
    writes = [u for u in contribution.users if target_name(u) in _SCATTER_OPS and u.args[-1] is contribution]
    if len(writes) != 1 or not isinstance(writes[0].args[0], fx.Node):
        return None, []
    buffer = writes[0].args[0]
    shape = value(buffer).shape  # ops on whole rows keep it; a view to [tokens, k, features] ends the tail
    nodes = list(rec.graph.nodes)
    start = max(nodes.index(u) for u in buffer.users if target_name(u) in _SCATTER_OPS) + 1
    data = {n for n in nodes if n is rec.hidden or n is rec.weights or ancestry.is_ancestor(rec.hidden, n)
            or ancestry.is_ancestor(rec.weights, n)}
    tail, members = [], {buffer}
    for node in nodes[start:]:
        out, inputs = value(node), tensor_inputs(node)
        if node.op not in ("call_function", "call_method") or not any(n in members for n in inputs):
            continue
        if isinstance(out, torch.Tensor) and out.shape == shape and all(n in members or n not in data for n in inputs):
            tail.append(node)
            members.add(node)
    leaving = [n for n in tail if any(u not in members for u in n.users)]
    weighted = len(leaving) == 1 and any(
        n.op in ("call_function", "call_method") and ancestry.is_ancestor(leaving[0], n)
        and ancestry.is_ancestor(rec.weights, n) for n in nodes)
    return (buffer, tail[:tail.index(leaving[0]) + 1]) if weighted else (None, [])


def sums_over_slots(rec: ExpertsRecording, tail_end: fx.Node, ancestry: Ancestry) -> bool:
    """Does the container combine the weighted routes by a sum over the slot dimension (``[tokens, k, …].sum(1)``)?

    The synthesized container then sums them the same way, not by adding one expert after another, so that
    the combine rounds as the original's does.
    """
    index = value(rec.index)
    tokens, slots = index.reshape(-1, index.shape[-1]).shape
    for node in rec.graph.nodes:
        if target_name(node) != "sum" or not ancestry.is_ancestor(tail_end, node):
            continue
        source = value(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(source, torch.Tensor) and source.dim() == 3 and tuple(source.shape[:2]) == (tokens, slots) \
                and dim in (1, -2, (1,), [1], (-2,), [-2]):
            return True
    return False


def per_route_entry(node: fx.Node, rec: ExpertsRecording, ancestry: Ancestry) -> fx.Node | None:
    """The parameter ``node`` takes one entry of per row by the row's expert index (``w[index]``), or None."""
    if target_name(node) not in ("__getitem__", "index_select", "embedding") or len(node.args) < 2:
        return None
    table, ids = (node.args[0], node.args[-1]) if target_name(node) != "embedding" else node.args[1::-1]
    from_index = isinstance(ids, fx.Node) and (ids is rec.index or ancestry.is_ancestor(rec.index, ids))
    if not from_index or not isinstance(table, fx.Node) or table.op != "get_attr":
        return None
    return table
