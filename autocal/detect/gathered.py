"""Gathered expert weights: the routing indices pick each token's expert weights.

Code written for batched decoding (gpt-fast, torchao) stores each projection
of all experts as one ``[E, a, b]`` parameter and, per token, gathers the
weights of its chosen experts and contracts them with the token's features in
one op, slot by slot::

    w1 = self.w1[expert_indices]                 # [T, k, out, in]
    h = torch.einsum("ti,taoi->tao", x, w1)       # [T, k, out]

The pass finds, in the block's recording, each parameter of ``E`` entries
indexed by a tensor computed from the routing choice (``p[index]``,
``index_select``), and the op that contracts the gathered weights with
features. It checks on the recorded values that the op gives, for every token
and slot, ``features @ W[e].T`` (or ``features @ W[e]``), the features being
the other operand, per slot or the same for all of a token's slots.

Tables of one vector per expert (``nn.Embedding`` rows ``[E, d]``, experts of a
single neuron, as in product-key layers) are recognised the same way, in two
contractions: a *row* (``x · W[e]``, one number per slot: ``Linear(d, 1)``) and a
*slot sum* (``Σ_slots y · W[e]``, ``Linear(1, d)`` per slot, summed over the slots).

Calibration (``synthesize/gathered.py``) then computes those ops with one
``nn.Linear`` per expert and runs the block again with the routing forced to
every group of ``k`` experts (``detect/reroute.py``).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .. import errors
from ..trace.inputs import BlockCall, keyword_arguments
from ..trace.record import record
from .graph_utils import is_int_tensor, returns_of, source_of, target_name, value
from .reroute import ChoiceCall, check_forced_routing, choice_call
from .router import analyze_router, routing_choice
from .structure import ExpertsInfo, MoEStructure

__all__ = ["GatheredWeight", "GatheredDispatch", "own_expert_weights", "expert_tables", "detect_gathered",
           "slot_inputs", "per_slot", "gathered_index"]

_GATHERS = ("getitem", "__getitem__", "index_select", "embedding")
_CONTRACTIONS = ("einsum", "matmul", "__matmul__", "bmm")


@dataclass(frozen=True)
class GatheredWeight:
    """One ``[E, a, b]`` parameter whose per-token gather is contracted with features."""

    param: str  # its path in the block
    orientation: str  # "linear": f @ W[e].T, "matmul": f @ W[e], "row": f · W[e], "slot-sum": Σ_slots f * W[e]
    contraction: Callable  # the op that contracts it


@dataclass
class GatheredDispatch:
    weights: list[GatheredWeight]
    choice: ChoiceCall

    @property
    def params(self) -> list[str]:
        return [w.param for w in self.weights]


def own_expert_weights(block: nn.Module) -> dict[str, nn.Parameter]:
    """The block's own parameters of shape ``[E, a, b]`` (a, b >= 2) with a router-shaped ``[E, H]`` weight beside."""
    own = {n: p for n, p in block.named_parameters(recurse=False) if p.dim() == 3 and min(p.shape) >= 2}
    routers = [p.shape for p in block.parameters() if p.dim() == 2]
    return {n: p for n, p in own.items() if any(r[0] == p.shape[0] and r[1] in p.shape[1:] for r in routers)}


def expert_tables(block: nn.Module) -> dict[str, nn.Parameter]:
    """Two or more embedding tables of one shape ``[E, d]`` among the block's children: one vector per expert.

    Weaker evidence than ``own_expert_weights`` (no router beside them by
    shape): detection decides, and a block whose tables the routing does not
    gather is not an MoE.
    """
    tables = {f"{n}.weight": m.weight for n, m in block.named_children() if isinstance(m, nn.Embedding)}
    shapes = [p.shape for p in tables.values()]
    return {n: p for n, p in tables.items() if shapes.count(p.shape) >= 2 and p.shape[0] >= 2}


def gathered_index(func: Callable, args: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(weight, index)`` when ``func(*args)`` gathers entries of a weight along its first dimension."""
    name = getattr(func, "__name__", "")
    if name == "embedding" and len(args) >= 2 and isinstance(args[0], torch.Tensor):
        return args[1], args[0]
    if name in ("__getitem__", "getitem") and len(args) == 2 and isinstance(args[1], torch.Tensor):
        return (args[0], args[1]) if not (args[1].is_floating_point() or args[1].dtype == torch.bool) else None
    if name == "index_select" and len(args) == 3 and args[1] == 0:
        return args[0], args[2]
    return None


def slot_features(features: torch.Tensor, slots: torch.Size) -> torch.Tensor | None:
    """``features`` as ``[*slots, in]``: one row per slot, or a token's row repeated over its slots.

    Size-1 dimensions a batched matmul needs (``x[:, None] @ W[index]``) are dropped.
    """
    leading = tuple(features.shape[:-1])
    if tuple(d for d in leading if d != 1) == tuple(slots) != leading:
        return features.reshape(*slots, features.shape[-1])
    if leading == tuple(slots):
        return features
    if leading == tuple(slots[:len(leading)]):
        view = features.reshape(*leading, *[1] * (len(slots) - len(leading)), features.shape[-1])
        return view.expand(*slots, features.shape[-1])
    return None


def slot_inputs(orientation: str, features: torch.Tensor, slots: torch.Size, width: int) -> torch.Tensor | None:
    """Each slot's input to its expert's Linear, ``[*slots, in]``, from the contraction's other operand."""
    if orientation in ("linear", "matmul"):
        return slot_features(features, slots)
    if orientation == "row":  # the features of each slot or of each token, in any layout of that size
        for leading in (tuple(slots), tuple(slots[:-1])):
            if features.numel() == math.prod(leading) * width:
                return slot_features(features.reshape(*leading, width), slots)
    if orientation == "slot-sum" and features.numel() == math.prod(slots):
        return features.reshape(*slots, 1)
    return None


def per_slot(orientation: str, inputs: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
    """What the contraction computes from each slot's inputs and gathered weights (slot sums done)."""
    if orientation == "linear":
        return torch.einsum("...i,...oi->...o", inputs, gathered)
    if orientation == "matmul":
        return torch.einsum("...i,...io->...o", inputs, gathered)
    if orientation == "row":
        return (inputs * gathered).sum(-1, keepdim=True)
    return (inputs * gathered).sum(-2)


def _orientation(out: torch.Tensor, features: torch.Tensor, gathered: torch.Tensor, slots: torch.Size) -> str | None:
    """How the recorded contraction applied each slot's weights (checked on the recorded values), or None."""
    vectors = gathered.dim() == len(slots) + 1
    for orientation in (("row", "slot-sum") if vectors else ("linear", "matmul")):
        inputs = slot_inputs(orientation, features, slots, gathered.shape[-1])
        if inputs is None:
            continue
        try:
            expected = per_slot(orientation, inputs.to(gathered.dtype), gathered)
        except RuntimeError:
            continue
        if expected.numel() == out.numel() and torch.allclose(expected.reshape(out.shape), out.to(expected.dtype),
                                                              rtol=1e-3, atol=1e-4):
            return orientation
    return None


def _gathers(graph: fx.Graph, block: nn.Module) -> list[tuple[fx.Node, str, fx.Node]]:
    """``(gather node, parameter path, index node)`` for each gathered ``[E, a, b]`` parameter."""
    params = {n: p for n, p in block.named_parameters() if p.dim() == 3} | expert_tables(block)
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or target_name(node) not in _GATHERS:
            continue
        found_index = gathered_index(node.target, tuple(value(a) for a in node.args))
        position = {"index_select": (0, 2), "embedding": (1, 0)}.get(target_name(node), (0, 1))
        source, index = (node.args[i] if i < len(node.args) else None for i in position)
        if found_index is None or not (isinstance(source, fx.Node) and source.op == "get_attr"):
            continue
        if source.target in params and isinstance(index, fx.Node) and is_int_tensor(index):
            found.append((node, source.target, index))
    return found


def _contraction(gather: fx.Node, slots: torch.Size) -> GatheredWeight | None:
    users = [u for u in gather.users if target_name(u) in _CONTRACTIONS]
    if len(users) != 1 or len(gather.users) != 1:
        return None
    op = users[0]
    operands = [a for a in op.args if isinstance(a, fx.Node) and isinstance(value(a), torch.Tensor)]
    others = [a for a in operands if a is not gather]
    if len(operands) != 2 or len(others) != 1:
        return None
    orientation = _orientation(value(op), value(others[0]), value(gather), slots)
    return None if orientation is None else GatheredWeight("", orientation, op.target)


def detect_gathered(block: nn.Module, call: BlockCall) -> MoEStructure:
    """Detection for gathered expert weights (see the module docstring)."""
    cls = type(block).__name__
    bound = keyword_arguments(inspect.signature(block.forward), call.args, call.kwargs)
    with torch.no_grad():
        rec = record(block, (), bound)
    gathers = _gathers(rec.graph, block)
    if not gathers:
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "no expert weights are gathered by the routing "
                                  "indices", block_class=cls)
    index, weights = routing_choice(rec.graph, gathers[0][2])
    found_choice = choice_call(rec.graph, gathers[0][2], unscored=True)  # forced where the indices are made
    if found_choice is None or any(i is not gathers[0][2] for _, _, i in gathers):
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "the gathered expert weights are not chosen by a "
                                  "top-k", block_class=cls, source=source_of(gathers[0][0]))
    found = []
    for gather, param, gather_index in gathers:
        weight = _contraction(gather, value(gather_index).shape)
        if weight is None:
            raise errors.AutocalError(errors.UNSUPPORTED_EXPERT, f"the gathered `{param}` is not contracted slot by "
                                      "slot with features (features @ W[e], or a vector's dot product)", block_class=cls,
                                      source=source_of(gather))
        found.append(GatheredWeight(param, weight.orientation, weight.contraction))
    num_experts = {block.get_parameter(w.param).shape[0] for w in found}
    if len(num_experts) != 1:
        raise errors.AutocalError(errors.UNSUPPORTED_EXPERT, "the gathered weights hold different numbers of "
                                  "experts", block_class=cls)
    num_experts = num_experts.pop()
    choice, chosen = found_choice
    check_forced_routing(block, choice, (), bound, rec.output, value(chosen),
                         lambda: _rows_per_expert(block, found, num_experts), index)
    router = analyze_router(rec.graph, index, weights)
    router.num_choices = max(router.num_choices, num_experts)
    params = {w.param: list(block.get_parameter(w.param).shape) for w in found}
    experts = ExpertsInfo(
        module_path=found[0].param.rpartition(".")[0],
        num_experts=num_experts,
        storage="gathered by index",
        layout={"weights": params, "applied as": {w.param: w.orientation for w in found},
                "unrouted tokens": _forcing(choice)},
        computation=" → ".join(params),
        weights_applied="by the block's own ops",
        call_roles={},
        output_features=None,
        accumulate_dtype=None,
        output_dtype=None,
        sources={g[1]: source_of(g[0]) for g in gathers if source_of(g[0])},
    )
    return MoEStructure(
        block_class=cls,
        level="gathered",
        router=router,
        experts=experts,
        shared_modules=[c for c in dict(block.named_children())
                        if c != router.module_path and c not in {p.split(".")[0] for p in params}],
        returns=returns_of(rec.output),
        tokens=GatheredDispatch(found, choice),
    )


def _forcing(choice: ChoiceCall) -> str:
    if choice.scored:
        return "the block re-run with the top-k forced to each group of k experts"
    return ("the block re-run with its expert indices forced to each group of k experts (routing weights stay "
            "those of the slots replaced)")


@contextmanager
def _rows_per_expert(block: nn.Module, weights: list[GatheredWeight], num_experts: int) -> Iterator[list]:
    """Within, the rows per expert that the first gathered weight is gathered for, per call."""
    first = block.get_parameter(weights[0].param)
    counts: list = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            found = gathered_index(func, args)
            if found is not None and found[0] is first:
                counts.append(torch.bincount(found[1].flatten(), minlength=num_experts).tolist())
            return func(*args, **(kwargs or {}))

    with Count():
        yield counts

