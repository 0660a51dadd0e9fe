"""Dispatch by a 0/1 mask contraction (GShard, Switch, DeepSpeed-MoE, fairseq, Tutel)::

    dispatched = torch.einsum("sec,sm->ecm", dispatch_mask, tokens)  # [E, capacity, M]
    outputs = torch.stack([expert(d) for expert, d in zip(self.experts, dispatched)])
    combined = torch.einsum("sec,ecm->sm", combine_weights, outputs)

Each expert gets ``capacity`` rows, each one token's row or zeros (an unfilled
slot); tokens past an expert's capacity are dropped. The pass finds the
contraction whose output the expert inputs are slices of: one operand the token
rows ``[S, M]``, the other a 0/1 mask with a dimension of the tokens and one of
the experts. Tokens in batches (``[G, S, M]``, with a capacity per group:
``einsum("gsec,gsm->egcm", mask, tokens)``) are rows too, the mask's
dimensions matching the batches' found alike. A mask whose experts' dimension
also holds their slots, experts first (``torch.mm(mask.view(E * C, S), tokens)``,
fairseq) is read as ``[E, C]`` there. It checks that each expert's
non-zero input rows are exactly the rows of the tokens its slice of the mask
marks. Where each expert is called once
and its input rows are its slots in the mask's order (``_slot_width``), the
calibration module knows which rows are empty slots.

At run time the calibration module (``synthesize/container.py``) keeps that
contraction's operands (the ``ordinal``-th call of its function that fits) and, after the block's forward,
runs each expert on the tokens its mask left out (dropped ones included). Where
the slots map to rows, an expert's calls in the block's forward get only the
rows of the slots its mask fills: empty slots are not tokens.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch import fx, nn

from .. import errors
from ..trace.dispatch import MaskDispatch
from .block import module_experts_info, other_children
from .graph_utils import CONTRACTIONS, Ancestry, flat_args, returns_of, source_of, target_name, value
from .router import analyze_router, router_of, routing_choice
from .facts import Facts
from .plans import MaskDispatchPlan, NoMatch
from .recorded import block_recording
from .structure import MoEStructure

__all__ = ["detect_mask_dispatch"]

_SLICING = ("getitem", "__getitem__", "unbind", "chunk", "split", "select", "view", "reshape", "squeeze",
            "contiguous", "to", "type_as", "narrow")


def _dispatch_node(call: fx.Node) -> fx.Node | None:
    """The contraction an expert's input is a slice of (through indexing and views), if any."""
    node = call.args[0] if call.args else None
    while isinstance(node, fx.Node) and target_name(node) in _SLICING:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and target_name(node) in CONTRACTIONS else None


def _check(dispatch: MaskDispatch, mask: torch.Tensor, tokens: torch.Tensor, calls: list[fx.Node],
           expert_paths: dict[str, int]) -> bool:
    """Is every expert's non-zero input exactly the rows of the tokens its slice of the mask marks?"""
    for call in calls:
        expert = expert_paths[call.target]
        rows = value(call.args[0]).reshape(-1, tokens.shape[-1])
        filled = rows[(rows != 0).any(-1)]
        marked = tokens[~dispatch.unrouted(mask, expert)]
        if filled.shape != marked.shape or not (filled[:, None] == marked[None]).all(-1).any(1).all():
            return False
    return True


def _slot_width(dispatch: MaskDispatch, mask: torch.Tensor, tokens: torch.Tensor, calls: list[fx.Node],
                expert_paths: dict[str, int]) -> int | None:
    """The experts' output width if each expert is called once with its slots of the mask as its input rows, in
    order, and returns one row per input row (the calibration module can then leave empty slots out)."""
    if len({expert_paths[call.target] for call in calls}) != len(calls):
        return None
    widths = set()
    for call in calls:
        given, output = value(call.args[0]), value(call)
        if not (isinstance(output, torch.Tensor) and output.shape[:-1] == given.shape[:-1]
                and _given_its_slots(given, dispatch.slot_tokens(mask, expert_paths[call.target]), tokens)):
            return None
        widths.add(output.shape[-1])
    return widths.pop() if len(widths) == 1 else None


def _given_its_slots(given: torch.Tensor, slot_tokens: torch.Tensor | None, tokens: torch.Tensor) -> bool:
    """Is row p of ``given`` the row of the token the mask puts in slot p, or zeros where it puts none?"""
    if slot_tokens is None or given.shape[-1] != tokens.shape[-1] or given.numel() != tokens.shape[-1] * len(
            slot_tokens):
        return False
    filling = tokens[slot_tokens.clamp(min=0)]
    return torch.equal(given.reshape(filling.shape), torch.where((slot_tokens >= 0)[:, None], filling, 0))


def detect_mask_dispatch(facts: Facts) -> MaskDispatchPlan | NoMatch:
    """``mask-dispatch``: dispatch by a mask contraction (see the module docstring)."""
    found = block_recording(facts)
    if not found:
        return found
    block, name, entries = facts.block, facts.list_name, facts.entries
    rec, expert_paths, calls = found.rec, found.expert_paths, found.calls
    nodes = {_dispatch_node(c) for c in calls}
    node = nodes.pop() if len(nodes) == 1 else None
    if node is None or not calls:
        return NoMatch("the experts' inputs are not slices of one contraction of the tokens with a mask",
                       shallow=True)
    tensors = [a for a in flat_args(node.args) if isinstance(a, fx.Node) and isinstance(value(a), torch.Tensor)]
    same = [n for n in rec.graph.nodes if n.op == "call_function" and n.target is node.target]
    for mask_node, token_node in (tensors, tensors[::-1]) if len(tensors) == 2 else ():
        mask, tokens = value(mask_node), value(token_node)
        if tokens.dim() < 2 or not ((mask == 0) | (mask == 1)).all():
            continue
        for dims in itertools.permutations(range(mask.dim()), tokens.dim()):  # batches..., tokens, experts
            experts_size = mask.shape[dims[-1]]
            if tuple(mask.shape[d] for d in dims[:-1]) != tokens.shape[:-1] or experts_size % len(entries):
                continue
            dispatch = MaskDispatch(node.target, 0, dims[-2], dims[-1], len(entries), batch_dims=dims[:-2],
                                    flat=experts_size != len(entries))
            ordinal = [n for n in same if dispatch.operands(tuple(value(a) for a in n.args))].index(node)
            dispatch = dataclasses.replace(dispatch, ordinal=ordinal)
            rows = tokens.reshape(-1, tokens.shape[-1])
            if _check(dispatch, mask, rows, calls, expert_paths):
                width = _slot_width(dispatch, mask, rows, calls, expert_paths)
                dispatch = dataclasses.replace(dispatch, out_features=width)
                return _structure(block, name, entries, rec, calls, dispatch, mask_node)
    return NoMatch("the experts' inputs are a contraction, but not of the token rows with a 0/1 mask that marks "
                   "each expert's tokens", source_of(node))


def _structure(block: nn.Module, name: str, entries: list[nn.Module], rec, calls: list[fx.Node],
               dispatch: MaskDispatch, mask_node: fx.Node) -> MaskDispatchPlan:
    index, weights = routing_choice(rec.graph, mask_node)
    try:
        router = analyze_router(rec.graph, index, weights) if index is not mask_node else router_of(rec.graph)
    except errors.AutocalError:
        router = router_of(rec.graph)
    if router is None:
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "no top-k or argmax chooses the experts of the mask",
                                  block_class=type(block).__name__)
    router.num_choices = max(router.num_choices, len(entries))
    experts = module_experts_info(name, block.get_submodule(name), entries, calls[0], "in the combine contraction")
    experts.layout["unrouted tokens"] = "the tokens the dispatch mask leaves out (dropped ones included)"
    if dispatch.out_features is not None:
        experts.layout["empty slots"] = "left out of the experts' calls with calibration on"
    ancestry = Ancestry(rec.graph)
    routing = {n.meta.get("module_path", "").split(".")[0] for n in ancestry.of(mask_node)}
    structure = MoEStructure(
        block_class=type(block).__name__,
        router=router,
        experts=experts,
        shared_modules=other_children(block, name, router.module_path, *routing),
        returns=returns_of(rec.output),
    )
    return MaskDispatchPlan(structure, dispatch)
