"""Forced routing: run a block's own forward with the top-k's choice replaced.

Where the ops between an expert's projections mix tokens (attention experts:
the query projection is an expert, the attention runs, then the output
projection is an expert), no replay of the expert alone can say what an
unrouted expert would have seen. Running the block's forward again with the
router's top-k made to choose that expert for every token can: the code that
mixes tokens runs as written, on the chosen expert's outputs.

The calls are forced by ``trace/forcing.py`` (which the calibration forward runs
too). The pass finds the top-k call behind the routing choice (which function, which
call of it during the forward, along which dimension), and checks on the
recorded inputs that replacing its result (a) with the recorded choice gives the
recorded output and (b) with a fixed set of experts sends every token to exactly
those experts.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager

import torch
from torch import fx, nn

from .. import errors
from ..numerics import compare_outputs
from ..trace.forcing import ChoiceCall, fresh_inputs
from .choices import cut_sort
from .graph_utils import is_int_tensor, source_of, target_name, value

__all__ = ["choice_call", "check_forced_routing"]


def choice_call(graph: fx.Graph, index: fx.Node, *, unscored: bool = False) -> tuple[ChoiceCall, fx.Node] | None:
    """The top-k call whose indices are ``index`` (up to views), and the node of those indices.

    None: ``index`` is not a top-k's output. With ``unscored``, such an
    ``index`` is forced where it is made: the op computing it, its last
    dimension the ``k`` slots.
    """
    source = index
    while _hands_on(source):
        source = source.args[0]
    topk = source.args[0] if target_name(source) in ("getitem", "__getitem__") and source.args[1] == 1 else None
    if isinstance(topk, fx.Node) and target_name(topk) == "topk":
        dim = topk.kwargs.get("dim", topk.args[2] if len(topk.args) > 2 else -1)
        return ChoiceCall(topk.target, _ordinal(graph, topk), dim, value(source).shape[dim]), source
    cut = cut_sort(source)
    if cut is not None:  # ``scores.sort(descending=True)`` (or ``argsort``), its first k entries kept
        sort, k = cut
        return ChoiceCall(sort.target, _ordinal(graph, sort), -1, k, scored=target_name(sort) == "sort",
                          cut=True), source
    if unscored and index.op == "call_function" and is_int_tensor(index) and value(index).dim() >= 1:
        return ChoiceCall(index.target, _ordinal(graph, index), -1, value(index).shape[-1], scored=False), index
    return None


def _hands_on(node: fx.Node) -> bool:
    """Does ``node`` hand on its input's indices unchanged: a view, an op of one index tensor whose recorded
    output equals its input (a clamp of expert-parallel sentinels that clamped nothing: ``ids.clamp(0, E - 1)``),
    or one that reorders them by other indices (``ids[order]``: the routes sorted by expert; forcing the choice
    behind them is then checked to decide which expert gets which token)?"""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return False
    if target_name(node) in ("view", "reshape", "flatten", "contiguous"):
        return True
    tensors = [a for a in node.all_input_nodes if isinstance(value(a), torch.Tensor)]
    if not (tensors and tensors[0] is source and all(is_int_tensor(a) for a in (node, *tensors))):
        return False
    given, handed = value(source), value(node)
    if len(tensors) == 1:
        return handed.shape == given.shape and torch.equal(handed, given)
    return handed.numel() == given.numel() and torch.equal(handed.flatten().sort().values,
                                                           given.flatten().sort().values)


def _ordinal(graph: fx.Graph, node: fx.Node) -> int:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is node.target].index(node)


def check_forced_routing(block: nn.Module, call: ChoiceCall, args: tuple, kwargs: dict, recorded_output: Any,
                         recorded_index: torch.Tensor, rows_per_expert: Callable[[], ContextManager[list]],
                         node: fx.Node) -> None:
    """Forcing the recorded choice gives the recorded output; forcing experts ``0..k-1`` sends all rows there.

    ``rows_per_expert()`` is a context in which the experts' first projection
    lists, per call, the rows it got for each expert.
    """
    where = {"block_class": type(block).__name__, "source": source_of(node)}
    with torch.no_grad():
        if not compare_outputs(recorded_output, _run_forced(block, call, args, kwargs, recorded_index))[2]:
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "forcing the router's own choice changes the "
                                      "block's output", **where)  # within rounding: GPU atomics add in any order
        with rows_per_expert() as counts:
            _run_forced(block, call, args, kwargs, torch.arange(call.k))
    rows = recorded_index.numel() // call.k
    if not counts or any(c[:call.k] != [rows] * call.k or any(c[call.k:]) for c in counts) or len(counts) != 1:
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "replacing the top-k's choice does not decide which "
                                  "expert gets which token", **where)


def _run_forced(block: nn.Module, call: ChoiceCall, args: tuple, kwargs: dict, experts: torch.Tensor) -> Any:
    with call.forced(experts):
        return block(*fresh_inputs(args), **fresh_inputs(kwargs))
