"""Packed experts containers: the block calls a child that stores every expert's weights in a few parameters.

Two rules read the same recording of the block (the container a leaf, its call recorded on its own too):

- ``experts``: the container is called with (hidden states, expert indices,
  routing weights), as transformers v5 calls its experts; the container is then
  recorded on those inputs and one expert's computation cut out of it
  (``detect/experts.py``). Not where each row it gets is one route of a token
  (each token in k rows): calibrating every expert on every row would show it
  each token k times; the gathered rule forces the routing instead;
- ``block-dense``: the container is called with one tensor, the tokens already
  scaled by their routing scores (``detect/dense.py``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .. import errors
from ..trace.hf import eager_experts
from ..trace.inputs import BlockCall
from ..trace.record import Recording, record
from ..trace.rows import token_rows
from .dense import detect_dense
from .experts import ExpertsRecording, analyze_experts
from .storage import count_experts, packed_parameters, router_rows
from .facts import Facts
from .graph_utils import Ancestry, bound_inputs, returns_of, value
from .plans import DenseExpertsPlan, NoMatch, PackedExpertsPlan
from .router import analyze_router
from .structure import ExpertsInfo, MoEStructure

__all__ = ["PackedCall", "packed_call", "detect_packed_experts", "detect_packed_dense", "container_roles"]


@dataclass
class PackedCall:
    """The block recorded with its packed container as a leaf, and the container's call in that recording."""

    name: str
    container: nn.Module
    packed: dict[str, nn.Parameter]
    num_experts: int
    call: BlockCall
    recording: Recording
    node: fx.Node

    @property
    def tensor_inputs(self) -> int:
        return sum(isinstance(value(a), torch.Tensor) for a in (*self.node.args, *self.node.kwargs.values()))


def packed_call(facts: Facts) -> PackedCall:
    """The recording both packed rules read (made once per block)."""
    return facts.memo("packed", lambda: _record_packed(facts))


def _record_packed(facts: Facts) -> PackedCall:
    block, (name, container) = facts.block, facts.packed
    rows = router_rows(block, container)
    packed = packed_parameters(container, rows)
    num_experts = count_experts(packed, rows)
    with eager_experts(block):
        call = facts.inputs(container, max(16, 4 * num_experts))
        with torch.no_grad():
            rec = record(block, call.args, call.kwargs, leaves=[container], nested=[container])
    node = next((n for n in rec.graph.nodes if n.op == "call_module" and n.target == name), None)
    if node is None:
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"the forward never calls `{name}`",
                                  block_class=facts.block_class)
    return PackedCall(name, container, packed, num_experts, call, rec, node)


def container_roles(bound: dict[str, Any], call: fx.Node) -> dict[str, str] | NoMatch:
    """Which of the container's forward parameters holds hidden states, indices and weights."""
    tensors = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
    index = [k for k, v in tensors.items() if not v.is_floating_point()]
    floats = [k for k, v in tensors.items() if v.is_floating_point()]
    if len(index) != 1 or len(floats) != 2:
        return NoMatch("the experts are not called with (hidden states, expert indices, routing weights)",
                       call.meta.get("source"), shallow=True)
    index_shape = tensors[index[0]].shape
    weights = [k for k in floats if tensors[k].shape == index_shape]
    hidden = [k for k in floats if k not in weights]
    if len(weights) != 1 or len(hidden) != 1:
        return NoMatch("no routing-weight input matches the shape of the expert indices", call.meta.get("source"),
                       shallow=True)
    return {"hidden": hidden[0], "index": index[0], "weights": weights[0]}


def detect_packed_dense(facts: Facts) -> DenseExpertsPlan | NoMatch:
    """``block-dense``: the container is called with one (routing-scaled) tensor."""
    found = packed_call(facts)
    if found.tensor_inputs != 1:
        return NoMatch(lambda: f"`{found.name}` is called with {found.tensor_inputs} tensors, not one", shallow=True)
    with eager_experts(facts.block):
        return detect_dense(facts.block, found.name, found.container, found.call, found.node, found.packed,
                            found.num_experts)


def detect_packed_experts(facts: Facts) -> PackedExpertsPlan | NoMatch:
    """``experts``: the container is called with (hidden states, expert indices, routing weights)."""
    found = packed_call(facts)
    block, container, name = facts.block, found.container, found.name
    if found.tensor_inputs == 1:
        return NoMatch(f"`{name}` is called with one tensor, not (hidden states, indices, weights)", shallow=True)
    bound = bound_inputs(container, found.node)
    roles = container_roles(bound, found.node)
    if not roles:
        return roles
    routes = _routes_as_rows(found, bound[roles["hidden"]], bound[roles["index"]])
    if routes is not None:
        return routes
    with eager_experts(block):
        router = analyze_router(found.recording.graph, _arg_node(container, found.node, roles["index"]),
                                _arg_node(container, found.node, roles["weights"]))
        if router.num_choices < 2:  # indices from a lookup (hash routing), not a top-k over scores
            router.num_choices = found.num_experts
        rec = found.recording.nested.get(name)  # the container's own call, recorded inside the block's
        if rec is None:
            with torch.no_grad():
                rec = record(container, (), bound)
    experts_rec = ExpertsRecording(rec.graph, container,
                                   *(rec.inputs[roles[r]] for r in ("hidden", "index", "weights")))
    template, layout, sources = analyze_experts(experts_rec, found.packed, found.num_experts)
    if router.num_choices > found.num_experts:  # run by the original container (see CalibrationExperts._weightless)
        layout["choices_without_weights"] = router.num_choices - found.num_experts
    hidden_dtype = value(experts_rec.hidden).dtype
    output = value(found.node)
    experts = ExpertsInfo(
        module_path=name,
        num_experts=found.num_experts,
        storage="packed",
        layout=layout,
        computation=template.computation,
        weights_applied="inside experts (on the expert output)" if template.uses_routing_weight else "outside experts",
        call_roles=roles,
        output_features=output.shape[-1],
        accumulate_dtype=_relative_dtype(template.output_dtype, hidden_dtype),
        output_dtype=_relative_dtype(output.dtype, hidden_dtype),
        sources={k: v for k, v in sources.items() if v},
    )
    return PackedExpertsPlan(MoEStructure(
        block_class=type(block).__name__,
        router=router,
        experts=experts,
        shared_modules=_shared_modules(found.recording, found.node),
        returns=returns_of(found.recording.output),
        template=template,
    ))


def _routes_as_rows(found: PackedCall, hidden: torch.Tensor, index: torch.Tensor) -> NoMatch | None:
    """Why not, where each row the experts get is one route of a token: more rows than the block has tokens, and
    more routes per token than slots per row (``x.repeat_interleave(k)`` or ``x[flat_index // k]`` with a
    ``[T * k, 1]`` index). The experts rule would show each expert every token once per route; forced routing
    (the gathered rule) shows it each token once."""
    block_rows = token_rows(found.call.args, found.call.kwargs, hidden.shape[-1])
    if block_rows is None:
        return None
    tokens, rows = block_rows.shape[0], hidden.numel() // hidden.shape[-1]
    slots = index.shape[-1] if index.dim() else 1
    routes = rows * slots // tokens
    if rows <= tokens or rows * slots % tokens or routes <= slots:
        return None
    return NoMatch(f"each row `{found.name}` gets is one route of a token ({rows} rows of {slots} slot(s) for "
                   f"{tokens} tokens: {routes} routes per token, a row each): calibrating every expert on every "
                   "row would show it each token once per route", found.node.meta.get("source"))


def _relative_dtype(dtype: torch.dtype, hidden: torch.dtype) -> str | None:
    """None when ``dtype`` follows the hidden states' dtype, else its name."""
    return None if dtype == hidden else str(dtype).removeprefix("torch.")


def _arg_node(container: nn.Module, call: fx.Node, param: str) -> fx.Node:
    names = list(inspect.signature(container.forward).parameters)
    if param in call.kwargs:
        return call.kwargs[param]
    return call.args[names.index(param)]


def _shared_modules(rec: Recording, container_call: fx.Node) -> list[str]:
    """Top-level children that run on every token, apart from the routing and the experts."""
    ancestry = Ancestry(rec.graph)
    routing = {_top(n) for n in ancestry.of(container_call)} | {container_call.target}
    paths = []
    for node in rec.graph.nodes:
        top = _top(node)
        if top and top not in routing and top not in paths:
            paths.append(top)
    return paths


def _top(node: fx.Node) -> str:
    path = node.target if node.op == "call_module" else node.meta.get("module_path") or ""
    return path.split(".")[0]
