"""Packed experts run on a dispatched tensor: tokens placed in capacity slots by a 0/1 contraction.

GShard-style code (research libraries, Tutel, DeepSpeed-MoE, fairseq) places
each token in a slot of its experts by contracting the tokens with a 0/1
dispatch mask, runs one experts module on the whole ``[..., E, capacity, d]``
result, each expert on its slice along the expert dimension, and takes the
outputs back by a weighted combine contraction::

    dispatched = torch.einsum("bnd,bnec->becd", x, dispatch_mask)
    outputs = self.experts(dispatched)            # einsum / bmm with [E, a, b] weights
    y = torch.einsum("becd,bnec->bnd", outputs, combine_weights)

Slots past an expert's capacity drop tokens. The pass starts from the
contractions of whole ``[E, a, b]`` weights that ``detect/contracted.py``
found, whose features depend on the routing. It finds the module they sit in
(the one its weights belong to), the one tensor that module is called with, and
the contraction of token rows with a 0/1 mask that made it (through views). It
checks on the recorded values that each slot holds one token's row or zeros
(``SlotDispatch.slot_tokens``: the contraction on the tokens' numbers), and
that the experts module is row-wise per expert: run with every token in every
expert's slots (capacity: all tokens), it gives each filled slot what it gave
in the block's forward.

Calibration (``synthesize/gathered.py``) computes the whole weights'
contractions with one ``nn.Linear`` per expert; with calibration on, the
experts module is called with every token in every expert's slots, and each
slot gets its token's output (empty slots zeros), so the combine and the
tokens dropped by capacity stay the block's own.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..numerics import compare_outputs
from ..trace.dispatch import SlotDispatch
from .graph_utils import CONTRACTIONS, Ancestry, flat_args, source_of, target_name, value
from .plans import NoMatch

__all__ = ["slot_dispatch"]

_ONE_TENSOR = ("getitem", "__getitem__", "view", "reshape", "contiguous", "to", "type_as", "flatten", "squeeze",
               "unsqueeze")


def _inside(path: str | None, module: str) -> bool:
    return path is not None and (path == module or path.startswith(f"{module}."))


def _boundary(graph: fx.Graph, module: str) -> tuple[list[fx.Node], list[fx.Node]]:
    """The tensors ``module``'s recorded ops take from outside it (parameters aside), and those it hands out."""
    inside = {n for n in graph.nodes if _inside(n.meta.get("module_path"), module)}
    given = {a: None for n in inside for a in n.all_input_nodes
             if a not in inside and a.op != "get_attr" and isinstance(value(a), torch.Tensor)}
    returned = [n for n in graph.nodes if n in inside and any(u not in inside for u in n.users)]
    return list(given), returned


def _same_rows(graph: fx.Graph, given: fx.Node, features: fx.Node) -> bool:
    """Are ``features`` the module's input ``given``, or made from it keeping its rows' layout (a norm, a cast)?
    Then the experts lie along the same dimension of both."""
    shape, rows = value(given).shape, value(features).shape
    return len(shape) >= 3 and (given is features or (
        rows[:-1] == shape[:-1] and Ancestry(graph).is_ancestor(given, features)))


def _dispatch_of(node: fx.Node) -> fx.Node | None:
    """The contraction ``node`` is (or a view of: one tensor in, as many elements and the same last size out)."""
    while target_name(node) not in CONTRACTIONS:
        inputs = [a for a in node.all_input_nodes if isinstance(value(a), torch.Tensor)]
        if target_name(node) not in _ONE_TENSOR or len(inputs) != 1 or value(inputs[0]).numel() != value(node).numel():
            return None
        node = inputs[0]
    return node


def _slots(dispatch: SlotDispatch, node: fx.Node, given: torch.Tensor) -> torch.Tensor | None:
    """Per row of ``given`` (the experts' input), 1 + its token's number, 0 for an empty slot; None where the
    contraction does not place token rows in slots of a 0/1 mask (checked on the recorded values)."""
    args, kwargs = fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)
    mask, tokens = dispatch.operands(args)
    if not (tokens.is_floating_point() and tokens.shape[-1] == given.shape[-1] and ((mask == 0) | (mask == 1)).all()):
        return None
    try:
        slots = dispatch.slot_tokens(args, kwargs)
    except RuntimeError:
        return None
    rows = tokens.reshape(-1, tokens.shape[-1])
    if slots.numel() * given.shape[-1] != given.numel() or not (0 < slots.max() <= rows.shape[0]) or slots.min() < 0:
        return None
    slots = slots.reshape(given.shape[:-1])
    placed = torch.where((slots > 0)[..., None], rows[(slots - 1).clamp(min=0)], 0).to(given.dtype)
    return slots if torch.equal(placed, given) else None


def _row_wise(experts: nn.Module, dispatch: SlotDispatch, rows: torch.Tensor, given: torch.Tensor,
              slots: torch.Tensor, returned: torch.Tensor) -> bool:
    """Does the experts module, given every token in every expert's slots, give each filled slot its recorded
    output (each expert computes each row on its own), within the tolerances verification holds calibration to?"""
    try:
        with torch.no_grad():
            every = experts(dispatch.every_token(rows.to(given.dtype), given))
    except RuntimeError:
        return False
    if not isinstance(every, torch.Tensor) or returned.shape[:-1] != given.shape[:-1]:
        return False
    outputs, filled = dispatch.slot_outputs(every, slots), slots > 0
    return outputs.shape == returned.shape and compare_outputs(returned[filled], outputs[filled])[2]


def slot_dispatch(block: nn.Module, graph: fx.Graph, first: fx.Node, features: fx.Node, expert_axis: int,
                  num_experts: int, module: str) -> tuple[SlotDispatch, fx.Node] | NoMatch:
    """The dispatch into slots behind the experts module at ``module`` (see the module docstring), and the mask's
    node; ``first`` is the module's first contraction of whole expert weights, with ``features``."""
    where = source_of(first)
    if not module:
        return NoMatch("the expert weights are contracted with dispatched tokens in the block's own forward; "
                       "calibration needs them in a module of their own", where)
    given, returned = _boundary(graph, module)
    if len(given) != 1 or len(returned) != 1 or not _same_rows(graph, given[0], features):
        return NoMatch(f"`{module}` is not called with one dispatched tensor whose rows its expert weights are "
                       "contracted with first, returning one tensor", where)
    given = given[0]
    node = _dispatch_of(given)
    tensors = [a for a in flat_args(node.args) if isinstance(a, fx.Node)] if node else []
    if len(tensors) != 2:
        return NoMatch(f"`{module}`'s input is not a contraction of the tokens with a dispatch mask", where)
    same = [n for n in graph.nodes if n.op == "call_function" and n.target is node.target]
    placed = False
    for position in (0, 1):
        dispatch = SlotDispatch(node.target, same.index(node), position, module, expert_axis, num_experts)
        slots = _slots(dispatch, node, value(given))
        placed |= slots is not None
        operand = value(tensors[position])
        if operand.numel() % value(given).shape[-1]:  # the mask, whose size is no multiple of the features
            continue
        token_rows = operand.reshape(-1, value(given).shape[-1])
        if slots is not None and _row_wise(block.get_submodule(module), dispatch, token_rows, value(given), slots,
                                           value(returned[0])):
            return dispatch, tensors[1 - position]
    if placed:
        return NoMatch(f"`{module}` runs on tokens a 0/1 contraction placed in capacity slots, but given every token "
                       "in every slot it does not give each filled slot its output: an expert's rows are not "
                       "computed each on its own", where)
    return NoMatch(f"`{module}` is called with a contraction, but not one placing token rows in slots of a 0/1 "
                   "mask", source_of(node))
