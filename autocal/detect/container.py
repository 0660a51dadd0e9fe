"""Detection for a list of expert modules that dispatches tokens in its own forward.

NLLB-MoE and Switch Transformers keep their experts in a ``ModuleDict`` whose
forward loops over the experts that were hit. The loop is data-dependent, so
it is not traced; it is recorded, and one thing is taken from the recording:
how the rows of expert ``e`` are picked from the container's inputs. That
token-selection subgraph is kept as a *recipe* that can be replayed for any
expert, so calibration can run each expert on the tokens it was not routed
while the original forward computes the output unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import fx

from .. import errors
from ..trace.replay import TokenRecipe
from .block import _VIEW_OPS, _routing_weight, gathered_rows, module_experts_info, other_children, row_gather
from .facts import Facts
from .graph_utils import Ancestry, returns_of, source_of, target_name, value
from .plans import ContainerPlan, NoMatch, RecordedBlockPlan
from .expert_sets import ExpertSet, RecordedSet, check_sets
from .recorded import ExpertCalls, block_recording, loop_recording, sets_recording, whole_input
from .router import EXPERT_CHOICE, LOOKUP, analyze_router, router_of, routing_choice
from .structure import MoEStructure, RouterInfo

__all__ = ["detect_module_container", "detect_recorded_block"]


def _selectors(tokens: fx.Node, expert: int, ancestry: Ancestry) -> dict[fx.Node, int | tuple[int, int]]:
    """Indexing ops and comparisons on the way to ``tokens`` whose operand is the expert being dispatched.

    The value is the position of the expert's number in the op's arguments, or ``(position, i)`` where it is
    entry ``i`` of a tuple index (``mask[:, :, e]``).
    """
    found = {}
    for node in ancestry.of(tokens) + [tokens]:
        if target_name(node) not in ("getitem", "__getitem__", "select", "eq", "__eq__") or len(node.args) < 2:
            continue  # an index, or a comparison with the expert's number (``index == e``)
        source, position = node.args[0], len(node.args) - 1
        if not (isinstance(source, fx.Node) and isinstance(value(source), torch.Tensor)):
            continue
        index = node.args[position]
        if _is_expert(index, expert):
            found[node] = position
        elif isinstance(index, tuple):
            entries = [i for i, entry in enumerate(index) if _is_expert(entry, expert)]
            if len(entries) == 1:
                found[node] = (position, entries[0])
    return found


def _is_expert(index: Any, expert: int) -> bool:
    """Is ``index`` (an argument, or a recorded node) the number ``expert``, as an int or a one-element tensor?"""
    index_value = value(index) if isinstance(index, fx.Node) else index
    if isinstance(index_value, torch.Tensor) and index_value.numel() == 1 and not index_value.is_floating_point():
        index_value = int(index_value)
    return isinstance(index_value, int) and not isinstance(index_value, bool) and index_value == expert


def detect_module_container(facts: Facts) -> ContainerPlan | NoMatch:
    """``container``: keep the list's own dispatch loop, learn each expert's token rows from its recording."""
    found = loop_recording(facts)
    if not found:
        return found
    name, cls = facts.list_name, facts.block_class
    if not found.calls:
        return NoMatch(f"`{name}` never calls its experts", kind=errors.NO_MOE_BLOCK)
    first, rec = found.calls[0], found.rec
    if whole_input(first) is not None:
        return NoMatch("every expert is given the whole input (the gated rule's kind)", source_of(first), shallow=True)
    if facts.unrouted:
        return NoMatch(lambda: f"no router sits beside `{name}`, and its experts are given rows: not an MoE",
                       source_of(first), not_moe=True)
    source, tokens = row_gather(first, masks=True)
    hidden = [n for n in rec.graph.nodes if n.op == "placeholder" and (n is source or _views(source, n))]
    if not hidden:
        return NoMatch("the experts' rows are not gathered from an input", source_of(first))
    recipe = TokenRecipe(rec.graph, tokens, _selectors(tokens, found.expert_paths[first.target], Ancestry(rec.graph)))
    _check_recipe(recipe, found.calls, found.expert_paths, rec, found.bound, cls)
    container_call = found.outer_call
    routing = [a for a in container_call.all_input_nodes if a is not container_call.args[0]]
    if not routing:
        return NoMatch(f"`{name}` is called without routing inputs", source_of(container_call))
    router = analyze_router(found.outer.graph, routing[0], routing[-1])
    applied = "on the expert output, in the experts' loop" if _routing_weight(first) is not None else "not found"
    experts = module_experts_info(name, facts.list_container, facts.entries, first, applied,
                                  {"hidden": hidden[0].target})
    return ContainerPlan(MoEStructure(
        block_class=cls,
        router=router,
        experts=experts,
        shared_modules=other_children(facts.block, name, router.module_path),
        returns=returns_of(found.outer.output),
    ), recipe)


def _views(source: fx.Node, placeholder: fx.Node) -> bool:
    node = source
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if target_name(node) not in ("view", "reshape", "contiguous", "to"):
            return False
        node = node.args[0]
    return node is placeholder


def _unrepeated(source: fx.Node) -> fx.Node:
    """The tensor whose rows ``source`` repeats, each the same number of times (tokens repeated once per slot,
    ``repeat_interleave(k, dim=0)``, ``repeat(1, k, 1)`` or gathered once per slot, ``x[order // k]``): the rows
    calibration gives every expert once. Found by value, through the ops with one float tensor input between them
    (an index is no rows); ``source`` itself where there is none."""
    rows = value(source).reshape(-1, value(source).shape[-1])
    found, node = source, source
    while True:
        inputs = [n for n in node.all_input_nodes
                  if isinstance(value(n), torch.Tensor) and value(n).is_floating_point()]
        if len(inputs) != 1 or value(inputs[0]).shape[-1] != rows.shape[-1] or value(inputs[0]).dim() < 2:
            return found
        node = inputs[0]
        base = value(node).reshape(-1, rows.shape[-1])
        if rows.shape[0] % base.shape[0] == 0 and rows.shape[0] > base.shape[0] and _same_rows(
                rows, base, rows.shape[0] // base.shape[0]):
            found = node


def _same_rows(rows: torch.Tensor, base: torch.Tensor, times: int) -> bool:
    """Does ``rows`` hold each row of ``base`` exactly ``times`` times (in any order)?"""
    seen, counts = torch.unique(rows, dim=0, return_counts=True)
    base_seen, base_counts = torch.unique(base, dim=0, return_counts=True)
    return torch.equal(seen, base_seen) and torch.equal(counts, base_counts * times)


def _check_recipe(recipe: TokenRecipe, calls: list[fx.Node], expert_paths: dict[str, int], rec, bound, cls) -> None:
    """The recipe must give back, for every recorded expert call, the rows that expert received."""
    for call in calls:
        _, tokens = row_gather(call, masks=True)
        replayed, recorded = recipe(bound, expert_paths[call.target]), value(tokens)
        if recorded.dtype == torch.bool:
            recorded = recorded.reshape(-1).nonzero().squeeze(-1)
        if replayed.shape != recorded.shape or not torch.equal(replayed, recorded):
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH,
                                      "which tokens an expert receives could not be recomputed for every expert",
                                      block_class=cls, source=source_of(call))


def _sorted_segments(calls: list[fx.Node]) -> tuple[fx.Node, fx.Node | None] | None:
    """``(source, tokens)`` when every expert's rows are a slice of one ``source[tokens]`` (rows sorted by expert).

    DeepSeek's remote code sorts the routed rows by expert, counts them on the
    host and gives expert ``e`` the slice ``sorted[start:end]``; training code
    splits them by the counts (``torch.split(sorted, counts)[e]``). Slices of the
    2-D token rows themselves (one token at a time) give ``(source, None)``.
    """
    sorted_rows = set()
    for call in calls:
        node = call.args[0] if call.args else None
        while isinstance(node, fx.Node) and target_name(node) in _VIEW_OPS:
            node = node.args[0]
        if not (isinstance(node, fx.Node) and target_name(node) in ("getitem", "__getitem__")
                and isinstance(node.args[0], fx.Node)):
            return None
        whole = node.args[0]
        if isinstance(node.args[1], int) and target_name(whole) in ("split", "split_with_sizes", "tensor_split"):
            whole = whole.args[0]  # one piece of the sorted rows split by the per-expert counts
        elif not isinstance(node.args[1], slice):
            return None
        sorted_rows.add(whole)
    if len(sorted_rows) != 1:
        return None
    rows = sorted_rows.pop()
    if gathered_rows(rows) is not None:
        return gathered_rows(rows)
    is_source = isinstance(value(rows), torch.Tensor) and value(rows).dim() == 2
    return (rows, None) if is_source else None  # slices of the token rows themselves (one token at a time)


def detect_recorded_block(facts: Facts) -> RecordedBlockPlan | NoMatch:
    """``recorded-block``: dispatch that fx cannot trace (data-dependent ``if``, item assignment), recorded instead.

    As at container level, the block keeps its forward (so the output is the
    original's, and the expert modules it calls see their routed rows); each
    expert's token rows are learnt as a recipe replayed on the block's inputs,
    so calibration can run the expert on the rest. A block with several expert
    lists, each with its own router (``detect/expert_sets.py``), gets one recipe
    per list: each expert then runs on the rest of the rows that reach its list.
    """
    several = len(facts.lists) > 1
    found = sets_recording(facts) if several else block_recording(facts)
    if not found:
        return found
    sets = []
    for name, entries in (facts.lists.items() if several else [(facts.list_name, facts.entries)]):
        made = _recorded_set(facts, found, name, entries)
        if not made:
            return made
        sets.append(made)
    checked = check_sets(found.rec.graph, found.bound, sets) if several else None
    if checked is not None:
        return checked
    first = sets[0]
    routers = [s.router.module_path for s in sets]
    return RecordedBlockPlan(MoEStructure(
        block_class=facts.block_class,
        router=first.router,
        experts=first.experts,
        shared_modules=other_children(facts.block, *(s.path for s in sets), *routers),
        returns=returns_of(found.rec.output),
        more_sets=[(s.router, s.experts) for s in sets[1:]],
    ), first.recipe, tuple(ExpertSet(s.path, s.recipe) for s in sets[1:]))


def _recorded_set(facts: Facts, found: ExpertCalls, name: str, entries: list) -> RecordedSet | NoMatch:
    """One list's recipe, router and experts, from the calls of its experts in the recording ``found``."""
    cls, rec = facts.block_class, found.rec
    mine = {p for p, m in facts.block.named_modules() if any(m is e for e in entries)}
    calls = [c for c in found.calls if c.target in mine]
    if not calls:
        return NoMatch(f"the forward never calls the modules in `{name}`"
                       + (" on the example inputs (pass inputs that reach every expert set)" if len(facts.lists) > 1
                          else ""), kind=errors.NO_MOE_BLOCK)
    if whole_input(calls[0]) is not None:
        return NoMatch("every expert is given the whole input (the gated rule's kind)", source_of(calls[0]),
                       shallow=True)
    segments = _sorted_segments(calls)
    if segments is not None:  # rows sorted by expert, each expert given its slice (counts on the host)
        source, tokens = segments
        recipe = TokenRecipe(rec.graph, tokens, {}, source=source)
    else:
        source, tokens = row_gather(calls[0], masks=True)
        latest = max(calls, key=lambda c: found.expert_paths[c.target])  # a high expert number is unlike constants
        _, latest_tokens = row_gather(latest, masks=True)
        recipe = TokenRecipe(rec.graph, latest_tokens,
                             _selectors(latest_tokens, found.expert_paths[latest.target], Ancestry(rec.graph)),
                             source=_unrepeated(source))
        _check_recipe(recipe, calls, found.expert_paths, rec, found.bound, cls)
    weight, weights = _routing_weight(calls[0]), None
    if tokens is not None:
        index, weights = routing_choice(rec.graph, tokens)
        router = _k_as_recorded(analyze_router(rec.graph, index, weight if weight is not None else weights), calls)
    else:  # experts picked by numbers read on the host: the router is the block's last top-k
        router = router_of(rec.graph)
        if router is None:
            return NoMatch("no top-k or argmax picks the experts", source_of(calls[0]))
    applied = "on the expert output, in the block's loop" if weight is not None else _applied_later(rec, weights, calls)
    experts = module_experts_info(name, facts.block.get_submodule(name), entries, calls[0], applied)
    return RecordedSet(name, recipe, router, experts)


def _applied_later(rec, weights: fx.Node | None, calls: list[fx.Node]) -> str:
    """Where the routing weights meet the experts when not right after each call: handed to them beside their rows
    (``expert(rows, scale=w)``), or multiplied with their combined outputs (``outs.view(T, k, H).mul_(w[..., None])
    .sum(1)``, an einsum with a dense weight matrix)."""
    if weights is None or not value(weights).is_floating_point():
        return "not found"
    ancestry = Ancestry(rec.graph)

    def from_weights(node: fx.Node) -> bool:
        return node is weights or ancestry.is_ancestor(weights, node)

    def from_experts(node: fx.Node) -> bool:
        return node is calls[0] or ancestry.is_ancestor(calls[0], node)

    if any(from_weights(a) for a in calls[0].all_input_nodes[1:]):
        return "handed to the experts beside their rows"
    for node in rec.graph.nodes:
        if target_name(node).rstrip("_") not in ("mul", "__mul__", "__rmul__", "einsum", "matmul", "bmm"):
            continue
        inputs = [a for a in node.all_input_nodes if isinstance(value(a), torch.Tensor)]
        if from_experts(node) and any(  # node: after the experts (through writes too), the weights not
                from_weights(a) and not from_experts(a) and value(a).is_floating_point() for a in inputs):
            return "on the experts' combined outputs, after the loop"
    return "not found"


def _k_as_recorded(router: RouterInfo, calls: list[fx.Node]) -> RouterInfo:
    """``router`` with the range of experts the recorded tokens reached, where some token reached more than its
    ``top_k`` and every token at least one: the selection read is then not what decides (an argmax kept only where
    no expert's score passes a threshold, the others chosen by comparing scores with thresholds), and k varies by
    token. Counted over the calls' row indices into the block's token rows.

    Where no selection was read at all (``lookup``: no top-k, argmax or sort behind the rows), the counts are the
    only k there is: the ``top_k`` read then is the size of one expert's row list, not a number of experts (experts
    looked up by token id, hash routing; ReLU gates, ``rows = (gates[:, e] > 0).nonzero()``; a top-k run where the
    recording cannot see it, inside a TorchScript function); a token reaching none is then no dropped token but the
    routing itself."""
    reached = _experts_per_row(calls)
    if reached is None or router.dynamic_k is not None or router.selection.startswith(EXPERT_CHOICE):
        return router  # experts choosing their tokens: a token reaches any number of them, k is their average
    fewest, most = int(reached.min()), int(reached.max())
    if router.selection == LOOKUP and most:
        return replace(router, top_k=most, dynamic_k=(fewest, most) if fewest != most else None,
                       selection=LOOKUP if fewest == most else "experts chosen per token without a selection "
                                                               "(dynamic k)")
    if fewest == 0 or most <= router.top_k:
        return router
    return replace(router, top_k=most, dynamic_k=(fewest, most),
                   selection=f"experts chosen per token besides the {router.selection} (dynamic k)")


def _experts_per_row(calls: list[fx.Node]) -> torch.Tensor | None:
    """How many of ``calls`` took each row of the one 2-D tensor of token rows they all gather from (None: they
    gather from several, or from no 2-D tensor)."""
    found = [gathered_rows(call.args[0]) if call.args else None for call in calls]
    sources = {id(f[0]) for f in found if f is not None}
    if None in found or len(sources) != 1 or value(found[0][0]).dim() != 2:
        return None
    rows = [value(tokens) for _, tokens in found]
    rows = [r.reshape(-1).nonzero().squeeze(-1) if r.dtype == torch.bool else r.reshape(-1) for r in rows]
    return torch.bincount(torch.cat(rows), minlength=value(found[0][0]).shape[0])
