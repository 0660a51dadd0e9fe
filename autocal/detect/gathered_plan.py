"""What the gathered rule (``detect/gathered.py``) and its contracted and dispatched variants share: the
weights they find, the parameter a weight views, and the plan they build from both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

from ..trace.dispatch import SlotDispatch
from ..trace.forcing import ChoiceCall
from ..trace.rows import RowDispatch
from ..trace.gathers import entries_copy, reshaped_view, swapped_view
from .block import other_children
from .graph_utils import returns_of, value
from .plans import GatheredPlan
from .router import analyze_router
from .storage import stored_shape
from .structure import ExpertsInfo, MoEStructure

__all__ = ["GatheredWeight", "GatheredDispatch", "gathered_plan", "stored_as", "stored_parameter"]


@dataclass(frozen=True)
class GatheredWeight:
    """One ``[E, a, b]`` parameter whose per-token gather is contracted with features."""

    param: str  # its path in the block
    orientation: str  # "linear": f @ W[e].T, "matmul": f @ W[e], "row": f · W[e], "slot-sum": Σ_slots f * W[e]
    contractions: tuple[Callable, ...]  # the ops that contract it (one per branch of the forward that gathers it)
    bias: str | None = None  # the path of an ``[E, out]`` bias gathered into the same op (``F.linear(x, W[e], b[e])``)
    shape: tuple[int, ...] | None = None  # the ``[E, a, b]`` view gathered from, for a parameter stored otherwise
    expert_axis: int | None = None  # not gathered: contracted whole, experts along this output dim (contracted.py)


@dataclass
class GatheredDispatch:
    weights: list[GatheredWeight]
    choice: ChoiceCall
    slots: SlotDispatch | None = None  # whole weights run on tokens dispatched into capacity slots (dispatched.py)
    rows: RowDispatch | None = None  # whole weights on rows that copy tokens or are zeros (inline.py)


def stored_parameter(node: fx.Node | None, swapped: bool = False) -> fx.Node | None:
    """The parameter (``get_attr``) ``node`` is, or is a view of in another shape (as ``param.view(shape)``: the
    same memory, in the same order), or, ``swapped``, with each expert's matrix transposed (``w.transpose(1, 2)``);
    also where the parameter is first copied (``w.bfloat16()``, ``w.to(x.dtype)``: see :func:`stored_as`)."""
    found = stored_as(node, swapped)
    return found[0] if found is not None else None


def stored_as(node: fx.Node | None, swapped: bool = False) -> tuple[fx.Node, torch.Tensor] | None:
    """``(parameter, what node views)`` for :func:`stored_parameter`: the parameter's value, or the copy of it that
    the views between start from (``w.bfloat16().transpose(-2, -1)``, or a copy of its transposed view,
    ``w.transpose(-2, -1).bfloat16()``; ``entries_copy``), followed back as the parameter it copies."""
    chain = []
    while node is not None and node.op != "get_attr":
        chain.append(node)
        inputs = node.all_input_nodes
        node = inputs[0] if len(inputs) == 1 and isinstance(value(inputs[0]), torch.Tensor) else None
    if node is None:
        return None
    base = value(node)
    for step in reversed(chain):
        base = _copied(value(step.all_input_nodes[0]), value(step), base)
    start = value(chain[0]) if chain else base
    if start is base or reshaped_view(start, base) or swapped and swapped_view(start, base):
        return node, base
    return None


def _copied(before: torch.Tensor, after: object, base: torch.Tensor) -> torch.Tensor:
    """``base`` as ``after`` stands for it: ``after`` itself where it copies ``base``, ``after`` with each expert's
    matrix transposed back where it copies ``base`` so transposed (``w.transpose(1, 2).float()``: the copy of a
    view), else ``base`` (a view, left for the caller to check)."""
    if entries_copy(after, base):
        return after
    if swapped_view(before, base) and entries_copy(after, before):
        return after.transpose(-2, -1)
    return base


def gathered_plan(block: nn.Module, graph: fx.Graph, output: object, routing: tuple[fx.Node, fx.Node],
                  dispatch: GatheredDispatch, storage: str, unrouted: str, applied: str,
                  sources: dict[str, str]) -> GatheredPlan:
    """The plan of a block whose expert weights ``dispatch`` reads (gathered, or contracted whole)."""
    found = dispatch.weights
    num_experts = (found[0].shape or stored_shape(block, found[0].param))[0]
    router = analyze_router(graph, *routing)
    router.num_choices = max(router.num_choices, num_experts)
    params = {w.param: list(w.shape or stored_shape(block, w.param)) for w in found}
    experts = ExpertsInfo(
        module_path=found[0].param.rpartition(".")[0], num_experts=num_experts, storage=storage,
        layout={"weights": params, "applied as": {w.param: w.orientation for w in found}, "unrouted tokens": unrouted},
        computation=" → ".join(params), weights_applied=applied, call_roles={}, output_features=None,
        accumulate_dtype=None, output_dtype=None, sources=sources)
    structure = MoEStructure(block_class=type(block).__name__, router=router, experts=experts,
                             shared_modules=other_children(block, router.module_path, *params),
                             returns=returns_of(output))
    return GatheredPlan(structure, dispatch)
