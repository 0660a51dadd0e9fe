"""Recordings of a block whose experts are modules of their own (a list of identical MLPs), shared by its rules.

Where the list has a dispatch loop of its own (``has_own_forward``), the block
is recorded with the list as a leaf and the list then recorded on the inputs the
block gave it; otherwise the block is recorded with each expert a leaf. Either
way the rules read the expert calls of one recording, made once per block.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .. import errors
from ..trace.forcing import fresh_inputs
from ..trace.inputs import BlockCall, call_arguments, keyword_arguments
from ..trace.record import Recording, record
from .block import _VIEW_OPS
from .facts import Facts
from .graph_utils import bound_inputs, target_name
from .plans import NoMatch

__all__ = ["ExpertCalls", "list_inputs", "loop_recording", "block_recording", "sets_recording", "record_expert_calls",
           "whole_input"]


@dataclass
class ExpertCalls:
    """A recording whose experts are leaves: each expert's path (to its number), and their calls in order.

    ``bound``: the recorded module's inputs by name; ``outer``: the block's
    recording (the same as ``rec`` where the block itself was recorded).
    """

    rec: Recording
    expert_paths: dict[str, int]
    calls: list[fx.Node]
    bound: dict[str, Any]
    outer: Recording
    outer_call: fx.Node | None = None  # the list's call in ``outer`` (its own loop recorded apart)


def record_expert_calls(module: nn.Module, bound: dict[str, Any], entries: list[nn.Module], container: nn.Module,
                        more: list[nn.Module] = ()):
    """``module`` recorded on ``bound`` with its experts (and ``more`` modules: parts of experts in parallel lists) as
    leaves; each expert's path (to its number: its place in ``container``, where a zero or identity expert also takes
    one); their calls."""
    with torch.no_grad():
        # on a copy: the forward may change its inputs in place, and ``bound`` is replayed as given
        rec = record(module, *call_arguments(inspect.signature(module.forward), fresh_inputs(bound)),
                     leaves=[*entries, *more])
    paths = {id(m): p for p, m in module.named_modules()}
    numbers = {id(m): i for i, m in enumerate(container.children())}
    expert_paths = {paths[id(e)]: numbers[id(e)] for e in entries}
    return rec, expert_paths, [n for n in rec.graph.nodes if n.op == "call_module" and n.target in expert_paths]


def list_inputs(facts: Facts) -> BlockCall | NoMatch:
    """The block's example inputs; a list with no router that cannot be run so is no MoE."""
    try:
        return facts.inputs(facts.list_container, max(16, 4 * len(facts.entries)))
    except errors.AutocalError as error:  # identical layers with no router beside them prove no MoE
        if facts.unrouted and error.kind == errors.TRACE_FAILED:
            return NoMatch(f"{error.explanation}, and no router sits beside `{facts.list_name}`", not_moe=True)
        raise


def loop_recording(facts: Facts) -> ExpertCalls | NoMatch:
    """The list's own dispatch loop, recorded on the inputs the block gives it (made once per block)."""
    call = list_inputs(facts)
    if not call:
        return call
    return facts.memo("loop", lambda: _record_loop(facts, call))


def _record_loop(facts: Facts, call: BlockCall) -> ExpertCalls:
    name, container = facts.list_name, facts.list_container
    with torch.no_grad():
        block_rec = record(facts.block, call.args, call.kwargs, leaves=[container])
    container_call = next((n for n in block_rec.graph.nodes if n.op == "call_module" and n.target == name), None)
    if container_call is None:
        raise errors.AutocalError(errors.NO_MOE_BLOCK, f"the forward never calls `{name}`",
                                  block_class=facts.block_class)
    bound = bound_inputs(container, container_call)
    rec, expert_paths, calls = record_expert_calls(container, bound, facts.entries, container)
    return ExpertCalls(rec, expert_paths, calls, bound, block_rec, container_call)


def block_recording(facts: Facts) -> ExpertCalls | NoMatch:
    """The block recorded with each expert of its (first) list a leaf (made once per block)."""
    call = list_inputs(facts)
    if not call:
        return call

    def make() -> ExpertCalls:
        bound = keyword_arguments(inspect.signature(facts.block.forward), call.args, call.kwargs)
        rec, expert_paths, calls = record_expert_calls(facts.block, bound, facts.entries, facts.list_container)
        return ExpertCalls(rec, expert_paths, calls, bound, rec)

    return facts.memo("block", make)


def sets_recording(facts: Facts) -> ExpertCalls | NoMatch:
    """The block recorded with the experts of every one of its lists leaves, each numbered in its own list (a block
    with several expert sets, ``detect/expert_sets.py``; made once per block)."""
    call = list_inputs(facts)
    if not call:
        return call

    def make() -> ExpertCalls:
        block = facts.block
        bound = keyword_arguments(inspect.signature(block.forward), call.args, call.kwargs)
        with torch.no_grad():
            rec = record(block, *call_arguments(inspect.signature(block.forward), fresh_inputs(bound)),
                         leaves=[e for entries in facts.lists.values() for e in entries])
        paths, expert_paths = {id(m): p for p, m in block.named_modules()}, {}
        for name, entries in facts.lists.items():
            numbers = {id(m): i for i, m in enumerate(block.get_submodule(name).children())}
            expert_paths.update({paths[id(e)]: numbers[id(e)] for e in entries})
        calls = [n for n in rec.graph.nodes if n.op == "call_module" and n.target in expert_paths]
        return ExpertCalls(rec, expert_paths, calls, bound, rec)

    return facts.memo("sets", make)


_WHOLE = _VIEW_OPS | {"view_as", "reshape_as", "unflatten", "float", "type_as"}


def whole_input(call: fx.Node) -> fx.Node | None:
    """The recorded module's input an expert call receives whole (up to views and casts that keep its elements in
    order), if it does."""
    node = call.args[0] if call.args else None
    while isinstance(node, fx.Node) and target_name(node) in _WHOLE:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "placeholder" else None
