"""Expert weights contracted whole with every token: every expert on every token, routing on the outputs.

Research code may store each projection of all experts as one ``[E, a, b]``
parameter and contract it, ungathered, with all tokens along an expert
dimension, then pick and weight the chosen experts' *outputs* by the top-k::

    h = F.gelu(torch.einsum("th,ehi->tei", x, self.w1))    # [T, E, I]
    out = torch.einsum("tei,eih->teh", h, self.w2)         # [T, E, H]
    picked = out.gather(1, chosen[..., None].expand(-1, -1, H))

The pass finds, in the block's recording, each op that takes one such
parameter (or a view of it in the same memory) and one other tensor, the
features, and checks on the recorded values that its output holds, along one
dimension of ``E`` entries, ``features @ W[e]`` (or ``@ W[e].T``) for each
expert ``e``, the features being the same for every expert or their own slice
along that dimension. No contraction may depend on the routing choice, nor
read a buffer the routing wrote into (capacity rows per expert): the routing is
applied to the outputs only. Calibration (``synthesize/gathered.py``)
computes those ops with one ``nn.Linear`` per expert; every expert already sees
every token, so no re-run is needed.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .. import errors
from .gathered_plan import GatheredDispatch, GatheredWeight, gathered_plan, stored_parameter
from ..trace.gathers import same_entries
from .graph_utils import Ancestry, flat_args, source_of, value
from .dispatched import slot_dispatch
from .inline import inline_rows
from .plans import GatheredPlan, NoMatch
from .router import routing_choice

__all__ = ["detect_contracted", "expert_slices"]


def expert_slices(features: torch.Tensor, out_dim: int, axis: int, experts: int) -> list[torch.Tensor] | None:
    """Each expert's features of a contraction whose output has ``out_dim`` dimensions, experts along ``axis``:
    the expert's own slice where the features have that dimension too, else all the features."""
    if features.dim() == out_dim and features.shape[axis] == experts:
        return [features.select(axis, e) for e in range(experts)]
    return [features] * experts if features.dim() == out_dim - 1 else None


def _orientation(out: torch.Tensor, features: torch.Tensor, weight: torch.Tensor) -> tuple[str, int] | None:
    """``(orientation, expert axis)`` when ``out`` holds ``features @ W[e]`` (``matmul``) or ``@ W[e].T``
    (``linear``) for every expert along one dimension (checked on the recorded values), else None."""
    experts = weight.shape[0]
    for axis in [a for a in range(out.dim() - 1) if out.shape[a] == experts]:
        slices = expert_slices(features.to(weight.dtype), out.dim(), axis, experts)
        if slices is None:
            continue
        for orientation, apply in (("matmul", lambda f, w: f @ w), ("linear", lambda f, w: f @ w.T)):
            try:
                expected = [apply(f, weight[e]) for e, f in enumerate(slices)]
            except RuntimeError:
                continue
            if all(x.shape == out.select(axis, e).shape and torch.allclose(x, out.select(axis, e).to(x.dtype),
                                                                             rtol=1e-3, atol=1e-4)
                   for e, x in enumerate(expected)):
                return orientation, axis
    return None


def _entries_of(node: fx.Node, params: dict[str, nn.Parameter]) -> fx.Node | None:
    """The ``[E, a, b]`` parameter (or view of it in its own order) that ``node`` views all the entries of, through
    ops of one tensor sharing its storage (``transpose``, ``permute``), or None."""
    start = node
    while isinstance(value(node), torch.Tensor) and same_entries(value(start), value(node)):
        source = stored_parameter(node)
        if source is not None and source.target in params and value(node).dim() == 3:
            return node if value(start).dim() == 3 else None
        inputs = [a for a in node.all_input_nodes if isinstance(value(a), torch.Tensor)]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def _contractions(graph: fx.Graph, params: dict[str, nn.Parameter]) -> list[tuple]:
    """``(op, parameter path, how, features)`` for each op contracting a whole ``[E, a, b]`` parameter with features."""
    found = []
    for node in graph.nodes:
        stored = _entries_of(node, params)
        if stored is None:
            continue
        source = stored_parameter(stored)
        for op in node.users:
            operands = [a for a in flat_args((*op.args, *op.kwargs.values()))
                        if isinstance(a, fx.Node) and isinstance(value(a), torch.Tensor)]
            features = [a for a in operands if a is not node]
            if len(operands) != 2 or len(features) != 1 or not isinstance(value(op), torch.Tensor):
                continue
            how = _orientation(value(op), value(features[0]), value(stored))
            if how is not None:
                shape = tuple(value(stored).shape)
                viewed = shape if shape != tuple(params[source.target].shape) else None
                found.append((op, source.target, GatheredWeight(source.target, how[0], (op.target,), None, viewed,
                                                                how[1]), features[0]))
    return found


def _routed(features: fx.Node, op: fx.Node, index: fx.Node, graph: fx.Graph, ancestry: Ancestry) -> bool:
    """Do the features ``op`` contracts depend on the routing choice, also through an in-place write before it (a
    buffer of capacity rows per expert filled by the chosen ids: ``buffer[ids, position] = rows``)?"""
    sources = {features, *ancestry.of(features)}
    for node in graph.nodes:
        if node is op:
            break
        if node.meta.get("mutates") in sources and (node is index or ancestry.is_ancestor(index, node)):
            return True
    return ancestry.is_ancestor(index, features)


def detect_contracted(block: nn.Module, graph: fx.Graph, output: object, params: dict[str, nn.Parameter],
                      inputs: dict) -> GatheredPlan | NoMatch:
    """The plan for a block contracting whole expert weights with every token, routing applied to the outputs
    (``inputs``: the recorded call, by name)."""
    cls = type(block).__name__
    found = _contractions(graph, params)
    if not found:
        return NoMatch("no expert weights are gathered by the routing indices, nor contracted whole with every "
                       "token along an expert dimension", shallow=True)
    by_param = {}
    for _, param, weight, _ in found:
        known = by_param.get(param)
        if known and (known.orientation, known.shape, known.expert_axis) != (weight.orientation, weight.shape,
                                                                             weight.expert_axis):
            raise errors.AutocalError(errors.UNSUPPORTED_EXPERT, f"`{param}` is contracted in different ways",
                                      block_class=cls, source=source_of(found[0][0]))
        ops = (*known.contractions, *weight.contractions) if known else weight.contractions
        by_param[param] = GatheredWeight(param, weight.orientation, tuple(dict.fromkeys(ops)), None, weight.shape,
                                         weight.expert_axis)
    weights_found = list(by_param.values())
    num_experts = {(w.shape or params[w.param].shape)[0] for w in weights_found}
    if len(num_experts) != 1:
        raise errors.AutocalError(errors.UNSUPPORTED_EXPERT, "the contracted weights hold different numbers of "
                                  "experts", block_class=cls)
    returned = next(n for n in graph.nodes if n.op == "output")
    last = next(a for a in flat_args(returned.args) if isinstance(a, fx.Node))
    index, weights = routing_choice(graph, last)
    ancestry = Ancestry(graph)
    if index is not weights and any(_routed(f, op, index, graph, ancestry) for op, _, _, f in found):
        experts = num_experts.pop()
        if not found[0][1].rpartition(".")[0]:  # the block's own weights, contracted in its own forward
            return _inline(block, graph, output, found, weights_found, experts, inputs, (index, weights))
        dispatched = _dispatched(block, graph, output, found, weights_found, experts)
        if dispatched:
            return dispatched
        # A module of experts given every token, the rows not routed to an expert zeroed inside it
        rows = _inline(block, graph, output, found, weights_found, experts, inputs, (index, weights))
        return rows if rows else dispatched
    if index is weights:
        return NoMatch("the experts' weights are contracted with every token, but no top-k is applied to their "
                       "outputs alone", source_of(found[0][0]), shallow=True)
    return gathered_plan(block, graph, output, (index, weights), GatheredDispatch(weights_found, None),
                         "contracted whole (every expert on every token)",
                         "none: every expert already runs on every token",
                         "on the expert outputs, by the block's own ops",
                         {param: source_of(op) for op, param, _, _ in found if source_of(op)})


def _dispatched(block: nn.Module, graph: fx.Graph, output: object, found: list[tuple],
                weights: list[GatheredWeight], num_experts: int) -> GatheredPlan | NoMatch:
    """The plan for whole expert weights contracted with tokens a dispatch contraction placed in capacity slots
    (``detect/dispatched.py``), or why not."""
    op, param, weight, features = min(found, key=lambda f: list(graph.nodes).index(f[0]))
    found_slots = slot_dispatch(block, graph, op, features, weight.expert_axis, num_experts,
                                param.rpartition(".")[0])
    if not found_slots:
        return NoMatch(lambda: f"the experts' weights are contracted with routed features, but not as experts on a "
                       f"dispatched tensor: {found_slots}", found_slots.source or source_of(op))
    slots, mask = found_slots
    return gathered_plan(block, graph, output, routing_choice(graph, mask), GatheredDispatch(weights, None, slots),
                         "contracted whole, on the capacity slots a dispatch contraction fills",
                         "every token placed in every expert's slots with calibration on (capacity: all tokens); "
                         "each slot then gets its own token's output", "in the combine contraction, by the block's "
                         "own ops", {w: source_of(o) for o, w, _, _ in found if source_of(o)})


def _inline(block: nn.Module, graph: fx.Graph, output: object, found: list[tuple], weights: list[GatheredWeight],
            num_experts: int, inputs: dict, routing: tuple[fx.Node, fx.Node]) -> GatheredPlan | NoMatch:
    """The plan for whole expert weights contracted with rows that each hold a copy of a token or zeros: rows the
    block wrote token copies into, or an experts module's batch of every token with the unrouted rows zeroed
    (``detect/inline.py``), or why not."""
    rows = inline_rows(block, graph, found, num_experts, inputs, output)
    if not rows:
        return rows
    return gathered_plan(block, graph, output, routing, GatheredDispatch(weights, None, rows=rows),
                         "contracted whole, on rows that each hold a copy of a token or zeros",
                         "every token in every expert's rows with calibration on; each of the block's rows then gets "
                         "its own token's output", "by the block's own ops, reading the rows back",
                         {w: source_of(o) for o, w, _, _ in found if source_of(o)})
