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

import inspect
from typing import Any

import torch
from torch import fx, nn

from .. import errors
from ..trace.inputs import BlockCall, keyword_arguments
from ..trace.record import record
from .block import _VIEW_OPS, _routing_weight, gathered_rows, module_experts_info, other_children, row_gather
from .graph_utils import Ancestry, Replay, bound_inputs, is_int_tensor, returns_of, source_of, target_name, value
from .router import analyze_router, router_of, routing_choice
from .structure import MoEStructure, RouterInfo

__all__ = ["detect_module_container", "TokenRecipe"]


class TokenRecipe:
    """Replays, for any expert, how the original picks that expert's token rows from the recorded inputs.

    ``selectors`` are the ops whose argument is the expert's number (an index,
    an ``== e``); replaying with another number there gives that expert's rows.
    ``source`` (optional) is the node the rows are gathered from. Pass one
    ``shared`` dict for the calls on the same inputs: what does not depend on
    the expert (the router, say) is then computed once.
    """

    def __init__(self, graph: fx.Graph, tokens: fx.Node | None, selectors: dict[fx.Node, int],
                 source: fx.Node | None = None) -> None:
        self.replay = Replay(graph)
        self.tokens = tokens
        self.source = source
        self.selectors = selectors  # node -> position of the expert index in its args

    def __call__(self, bound: dict[str, Any], expert: int, shared: dict[fx.Node, Any] | None = None) -> torch.Tensor:
        """Expert ``expert``'s row indices (a boolean row mask is turned into indices)."""
        substitute = {}
        for node, position in self.selectors.items():
            recorded = node.args[position]
            substitute[node] = (position, _like(value(recorded) if isinstance(recorded, fx.Node) else recorded, expert))
        rows = self.replay(self.tokens, bound, {} if shared is None else shared, substitute=substitute)
        return rows.reshape(-1).nonzero().squeeze(-1) if rows.dtype == torch.bool else rows

    def rows(self, bound: dict[str, Any], shared: dict[fx.Node, Any] | None = None) -> torch.Tensor:
        """The 2-D token rows the experts' inputs are gathered from."""
        source = self.replay(self.source, bound, {} if shared is None else shared)
        return source.reshape(-1, source.shape[-1])


def _like(index: Any, expert: int) -> Any:
    """``expert`` in the form the recorded loop used for its index (int, 0-d or 1-element tensor)."""
    if isinstance(index, torch.Tensor):
        return torch.full_like(index, expert)
    return expert


def _selectors(tokens: fx.Node, expert: int, ancestry: Ancestry) -> dict[fx.Node, int]:
    """Indexing ops and comparisons on the way to ``tokens`` whose operand is the expert being dispatched."""
    found = {}
    for node in ancestry.of(tokens) + [tokens]:
        if target_name(node) not in ("getitem", "__getitem__", "select", "eq", "__eq__") or len(node.args) < 2:
            continue  # an index, or a comparison with the expert's number (``index == e``)
        position = len(node.args) - 1
        index = node.args[position]
        index_value = value(index) if isinstance(index, fx.Node) else index
        if isinstance(index_value, torch.Tensor) and index_value.numel() == 1 and not index_value.is_floating_point():
            index_value = int(index_value)
        if isinstance(index_value, int) and not isinstance(index_value, bool) and index_value == expert:
            source = node.args[0]
            if isinstance(source, fx.Node) and isinstance(value(source), torch.Tensor):
                found[node] = position
    return found


def detect_module_container(block: nn.Module, name: str, container: nn.Module, entries: list[nn.Module],
                            call: BlockCall, unrouted: bool = False) -> MoEStructure:
    """Container-level detection: keep the container's forward, learn each expert's token rows.

    ``unrouted``: no router weight sits beside the container, so it is an MoE
    only if its experts turn out to be gated per row (``errors.NotAnMoE`` otherwise).
    """
    with torch.no_grad():
        block_rec = record(block, call.args, call.kwargs, leaves=[container])
    container_call = next((n for n in block_rec.graph.nodes if n.op == "call_module" and n.target == name), None)
    if container_call is None:
        raise errors.AutocalError(errors.NO_MOE_BLOCK, f"the forward never calls `{name}`",
                                  block_class=type(block).__name__)
    bound = bound_inputs(container, container_call)
    rec, expert_paths, calls = _record_expert_calls(container, bound, entries)
    if not calls:
        raise errors.AutocalError(errors.NO_MOE_BLOCK, f"`{name}` never calls its experts",
                                  block_class=type(block).__name__)
    first = calls[0]
    if _whole_input(first) is not None:
        return _detect_gated(block, name, container, entries, calls, block_rec, rec)
    if unrouted:
        raise errors.NotAnMoE(name)
    source, tokens = row_gather(first, masks=True)
    hidden = [n for n in rec.graph.nodes if n.op == "placeholder" and (n is source or _views(source, n))]
    if not hidden:
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "the experts' rows are not gathered from an input",
                                  block_class=type(block).__name__, source=source_of(first))
    ancestry = Ancestry(rec.graph)
    expert = expert_paths[first.target]
    recipe = TokenRecipe(rec.graph, tokens, _selectors(tokens, expert, ancestry))
    _check_recipe(recipe, calls, expert_paths, rec, bound, type(block).__name__)
    routing = [a for a in container_call.all_input_nodes if a is not container_call.args[0]]
    if not routing:
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"`{name}` is called without routing inputs",
                                  block_class=type(block).__name__, source=source_of(container_call))
    router = analyze_router(block_rec.graph, routing[0], routing[-1])
    applied = "on the expert output, in the experts' loop" if _routing_weight(first) is not None else "not found"
    experts = module_experts_info(name, container, entries, first, applied, {"hidden": hidden[0].target})
    structure = MoEStructure(
        block_class=type(block).__name__,
        level="container",
        router=router,
        experts=experts,
        shared_modules=other_children(block, name, router.module_path),
        returns=returns_of(block_rec.output),
        tokens=recipe,
    )
    return structure


def _record_expert_calls(module: nn.Module, bound: dict[str, Any], entries: list[nn.Module]):
    """``module`` recorded on ``bound`` with its experts as leaves; each expert's path (to its number); their calls."""
    with torch.no_grad():
        rec = record(module, (), bound, leaves=entries)
    paths = {id(m): p for p, m in module.named_modules()}
    expert_paths = {paths[id(e)]: i for i, e in enumerate(entries)}
    return rec, expert_paths, [n for n in rec.graph.nodes if n.op == "call_module" and n.target in expert_paths]


def _whole_input(call: fx.Node) -> fx.Node | None:
    """The container input an expert call receives whole (up to views), if it does."""
    node = call.args[0] if call.args else None
    while isinstance(node, fx.Node) and target_name(node) in ("view", "reshape", "contiguous", "to"):
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "placeholder" else None


def _gated_rows(call: fx.Node) -> torch.Tensor | None:
    """Per output row: does the factor the expert's output is multiplied by keep it (is non-zero)?"""
    factor = _routing_weight(call)
    if factor is None or not isinstance(value(factor), torch.Tensor):
        return None
    output = value(call)
    try:
        kept = torch.broadcast_to(value(factor), output.shape) != 0
    except RuntimeError:
        return None
    return kept.reshape(-1, output.shape[-1]).any(-1)


def _detect_gated(block: nn.Module, name: str, container: nn.Module, entries: list[nn.Module],
                  calls: list[fx.Node], block_rec, rec) -> MoEStructure:
    """Every expert already runs on the whole input and a per-row factor gates its output.

    The experts then see every token in the original forward: calibration needs
    no extra calls, and the module only wraps the container (for coverage and
    the report). ``k`` is the most experts any row keeps.
    """
    gated = [_gated_rows(c) for c in calls]
    whole = {_whole_input(c) for c in calls}
    if len(calls) != len(entries) or len(whole) != 1 or any(g is None for g in gated):
        raise errors.NotAnMoE(name)
    factors = [_routing_weight(c) for c in calls]
    index_inputs = [p.target for p in Ancestry(rec.graph).of(factors[0]) if p.op == "placeholder" and is_int_tensor(p)]
    router = RouterInfo(
        module_path=None,
        scoring="mask" if value(factors[0]).dtype == torch.bool else "weights",
        top_k=int(torch.stack(gated).sum(0).max()),
        num_choices=len(entries),
        renormalized=False, correction_bias=None, grouped=False, scaling=None,
        sources={"gating": source_of(next(iter(calls[0].users)))},
        selection=f"input `{index_inputs[0]}`" if index_inputs else "per-row factor",
    )
    experts = module_experts_info(name, container, entries, calls[0], "on the expert output (a per-row factor)",
                                  {"hidden": next(iter(whole)).target})
    return MoEStructure(
        block_class=type(block).__name__,
        level="gated",
        router=router,
        experts=experts,
        shared_modules=other_children(block, name),
        returns=returns_of(block_rec.output),
    )


def _views(source: fx.Node, placeholder: fx.Node) -> bool:
    node = source
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if target_name(node) not in ("view", "reshape", "contiguous", "to"):
            return False
        node = node.args[0]
    return node is placeholder


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
    host and gives expert ``e`` the slice ``sorted[start:end]``. Slices of the
    2-D token rows themselves (one token at a time) give ``(source, None)``.
    """
    sorted_rows = set()
    for call in calls:
        node = call.args[0] if call.args else None
        while isinstance(node, fx.Node) and target_name(node) in _VIEW_OPS:
            node = node.args[0]
        if not (isinstance(node, fx.Node) and target_name(node) in ("getitem", "__getitem__")
                and isinstance(node.args[1], slice) and isinstance(node.args[0], fx.Node)):
            return None
        sorted_rows.add(node.args[0])
    if len(sorted_rows) != 1:
        return None
    rows = sorted_rows.pop()
    if gathered_rows(rows) is not None:
        return gathered_rows(rows)
    is_source = isinstance(value(rows), torch.Tensor) and value(rows).dim() == 2
    return (rows, None) if is_source else None  # slices of the token rows themselves (one token at a time)


def detect_recorded_block(block: nn.Module, name: str, entries: list[nn.Module], call: BlockCall) -> MoEStructure:
    """Block-level dispatch that fx cannot trace (data-dependent ``if``, item assignment): record it instead.

    As at container level, the block keeps its forward (so the output is the
    original's, and the expert modules it calls see their routed rows); each
    expert's token rows are learnt as a recipe replayed on the block's inputs,
    so calibration can run the expert on the rest.
    """
    bound = keyword_arguments(inspect.signature(block.forward), call.args, call.kwargs)
    rec, expert_paths, calls = _record_expert_calls(block, bound, entries)
    if not calls:
        raise errors.AutocalError(errors.NO_MOE_BLOCK, f"the forward never calls the modules in `{name}`",
                                  block_class=type(block).__name__)
    if _whole_input(calls[0]) is not None:  # every expert on every token already (soft or masked mixtures)
        return _detect_gated(block, name, block.get_submodule(name), entries, calls, rec, rec)
    segments = _sorted_segments(calls)
    if segments is not None:  # rows sorted by expert, each expert given its slice (counts on the host)
        source, tokens = segments
        recipe = TokenRecipe(rec.graph, tokens, {}, source=source)
    else:
        source, tokens = row_gather(calls[0], masks=True)
        latest = max(calls, key=lambda c: expert_paths[c.target])  # a high expert number is unlike other constants
        _, latest_tokens = row_gather(latest, masks=True)
        recipe = TokenRecipe(rec.graph, latest_tokens,
                             _selectors(latest_tokens, expert_paths[latest.target], Ancestry(rec.graph)), source=source)
        _check_recipe(recipe, calls, expert_paths, rec, bound, type(block).__name__)
    weight = _routing_weight(calls[0])
    if tokens is not None:
        index, weights = routing_choice(rec.graph, tokens)
        router = analyze_router(rec.graph, index, weight if weight is not None else weights)
    else:  # experts picked by numbers read on the host: the router is the block's last top-k
        router = router_of(rec.graph)
        if router is None:
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "no top-k or argmax picks the experts",
                                      block_class=type(block).__name__, source=source_of(calls[0]))
    applied = "on the expert output, in the block's loop" if weight is not None else "not found"
    experts = module_experts_info(name, block.get_submodule(name), entries, calls[0], applied)
    return MoEStructure(
        block_class=type(block).__name__,
        level="recorded-block",
        router=router,
        experts=experts,
        shared_modules=other_children(block, name, router.module_path),
        returns=returns_of(rec.output),
        tokens=recipe,
    )
