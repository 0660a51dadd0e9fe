"""Passes over the recorded experts container: one expert's computation as a template.

The container was recorded while the block ran, so its graph holds the real
dispatch: slices of the packed parameters for each hit expert, the rows each
expert received, the matmuls, the activation and the weighted scatter. The
passes here pick one expert's instance and cut it out:

1. ``expert_slices`` — which nodes select expert ``e`` from a packed parameter;
2. ``weight_side`` — what is computed from those slices alone (views, transposes);
3. ``expert_region`` — everything computed from the expert's input rows up to the
   value scattered into the output (its *contribution*);
4. ``route_tail`` (``detect/tail.py``) — where the container writes the contributions
   one row per route into a buffer and only then weights and sums them, the per-row
   ops between (a per-expert norm after the down projection): they belong to the expert too;
5. ``build_template`` — the region (and its tail) as a graph over Linear layers, with
   each Linear's weight a recipe that views the packed parameter for any expert.

Then the passes of ``detect/linears.py`` split, label and route the Linears, and
``check_template`` (``detect/replay.py``) replays the template through the
dispatch the synthesized container performs, on the recorded inputs, and raises
where it does not give the container's recorded output: nothing detection saw
differ is left for verification alone to find.
Which parameters store the experts is read from shapes in ``detect/storage.py``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

from .. import errors
from .graph_utils import Ancestry, is_int_tensor, target_name, tensor_inputs, value
from .linears import (CutLinear, Origin, describe, eliminate_dead_code, label_linears, route_projections,
                      split_outputs, tensor_methods_as_calls, weight_applied_last)
from .replay import check_template
from .storage import resolve
from .structure import ExpertTemplate, LinearRecipe
from .tail import EXPERT_ATTR, per_route_entry, route_tail, sums_over_slots

__all__ = ["ExpertsRecording", "analyze_experts", "CONTAINER_ATTR"]

# Generated expert code reaches parameters shared by all experts through this attribute.
CONTAINER_ATTR = "_container"

_SELECT_OPS = {"__getitem__", "select", "index_select"}
_MATMUL_OPS = {"matmul", "__matmul__", "mm"}
_BATCHED_MATMUL_OPS = {"bmm", "matmul", "__matmul__"}
_ADD_OPS = {"add", "__add__", "__radd__", "add_"}
@dataclass
class ExpertsRecording:
    """The recorded container call and which of its inputs plays which role."""

    graph: fx.Graph
    container: nn.Module
    hidden: fx.Node
    index: fx.Node | None = None
    weights: fx.Node | None = None


def _fail(kind: str, explanation: str, node: fx.Node | None = None, hints: list[str] | None = None):
    raise errors.AutocalError(kind, explanation, source=node.meta.get("source") if node else None, hints=hints or [])


def _packed_source(node: Any, packed: dict[str, Any]) -> bool:
    """Is ``node`` a packed parameter, or a view of one (``w1.view(-1, I, H)``)?"""
    while isinstance(node, fx.Node) and node.op != "get_attr":
        if target_name(node) not in ("view", "reshape", "unflatten") or not node.args:
            return False
        node = node.args[0]
    return isinstance(node, fx.Node) and node.target in packed


def _packed_name(node: fx.Node) -> str:
    while node.op != "get_attr":
        node = node.args[0]
    return node.target


def expert_slices(graph: fx.Graph, packed: dict[str, Any]) -> dict[int, list[fx.Node]]:
    """Nodes that take expert ``e``'s entry of a packed parameter, by ``e``."""
    slices: dict[int, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or target_name(node) not in _SELECT_OPS or not node.args:
            continue
        if not _packed_source(node.args[0], packed):
            continue
        index = node.args[-1] if target_name(node) != "select" else node.args[2]
        index = value(index) if isinstance(index, fx.Node) else index
        if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
            index = int(index)
        if isinstance(index, int):
            slices.setdefault(index, []).append(node)
    return slices


def batched_parameters(graph: fx.Graph, packed: dict[str, Any]) -> list[fx.Node]:
    """Packed parameters used whole by a batched matmul (one batch entry per expert, as Llama 4 does)."""
    return [
        n for n in graph.nodes
        if n.op == "get_attr" and n.target in packed and any(target_name(u) in _BATCHED_MATMUL_OPS for u in n.users)
    ]


def weight_side(graph: fx.Graph, seeds: list[fx.Node]) -> set[fx.Node]:
    """``seeds`` and every node computed from them and constants alone."""
    side = set(seeds)
    for node in graph.nodes:
        if node in side or node.op != "call_function":
            continue
        inputs = tensor_inputs(node)
        if any(n in side for n in inputs) and all(n in side or n.op == "get_attr" or is_int_tensor(n) for n in inputs):
            side.add(node)
    return side


def expert_region(rec: ExpertsRecording, weights_side: set[fx.Node], ancestry: Ancestry,
                  rows: fx.Node | None = None):
    """The expert's input rows (the first matmul's input, unless given), its contribution, the routing-weight input
    and the nodes between."""
    anchors = [n for n in rec.graph.nodes if n not in weights_side and any(a in weights_side for a in n.all_input_nodes)]
    if not anchors:
        _fail(errors.UNSUPPORTED_EXPERT, "no operation uses the expert's packed weights")
    inputs = [n for n in tensor_inputs(anchors[0]) if n not in weights_side and not is_int_tensor(n)]
    if rows is None and len(inputs) != 1:
        _fail(errors.UNSUPPORTED_EXPERT, "the first matmul of an expert has no single activation input", anchors[0])
    rows = inputs[0] if rows is None else rows
    routing = set()
    if rec.weights is not None:
        routing = {n for n in rec.graph.nodes if ancestry.is_ancestor(rec.weights, n) or n is rec.weights}
        routing -= {n for n in routing if ancestry.is_ancestor(rec.hidden, n)}
    placeholders = [n for n in rec.graph.nodes if n.op == "placeholder"]
    constant = {n for n in rec.graph.nodes
                if n.op in ("get_attr", "call_function", "call_method")
                and not any(p is n or ancestry.is_ancestor(p, n) for p in placeholders)}
    allowed = weights_side | routing | constant
    region = [rows]
    members = {rows}
    for node in rec.graph.nodes:
        if node in members or node.op not in ("call_function", "call_method"):
            continue
        inputs = tensor_inputs(node)
        if any(n in members for n in inputs) and all(n in members or n in allowed or n.op == "get_attr" for n in inputs):
            region.append(node)
            members.add(node)
    leaving = [n for n in region if any(u not in members for u in n.users)]
    if len(leaving) != 1:
        _fail(
            errors.UNSUPPORTED_DISPATCH,
            f"an expert's computation leaves it in {len(leaving)} places, expected one contribution",
            leaving[-1] if leaving else rows,
        )
    used_routing = {a for n in region for a in tensor_inputs(n) if a in routing}
    if len(used_routing) > 1:
        _fail(errors.UNSUPPORTED_DISPATCH, "an expert uses the routing weights in more than one form", region[-1])
    return rows, leaving[0], (used_routing.pop() if used_routing else None), region


def check_gather(rec: ExpertsRecording, expert: int, rows: fx.Node, routing: fx.Node | None) -> str:
    """The expert's rows are ``hidden[tokens]`` and its weights ``weights[tokens, slot, None]``; returns their order.

    These are the gathers the synthesized dispatch performs, so they are checked
    on the recorded values rather than read from the code. The rows come slot by
    slot (``"slot-major"``, transformers' experts contract) or token by token
    (``"token-major"``, one row per route in token order); the dispatch keeps the
    original's order, since a matmul's rows can round differently by position.
    """
    index = value(rec.index).reshape(-1, value(rec.index).shape[-1])
    hidden = value(rec.hidden)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    slot, tokens = torch.where(index.T == expert)
    order = "slot-major"
    if not torch.equal(value(rows), hidden[tokens]):
        tokens, slot = torch.where(index == expert)
        order = "token-major"
        if not torch.equal(value(rows), hidden[tokens]):
            _fail(errors.UNSUPPORTED_DISPATCH, "an expert's input rows are not the routed tokens of the hidden states",
                  rows)
    if routing is not None and not torch.equal(value(routing), value(rec.weights)[tokens, slot, None]):
        _fail(errors.UNSUPPORTED_DISPATCH, "an expert is weighted by something other than its routing weight", routing)
    return order


def _orders_differ(rec: ExpertsRecording, expert: int) -> bool:
    """Do the expert's routed tokens come in another order slot by slot than token by token (on the recording)?"""
    index = value(rec.index).reshape(-1, value(rec.index).shape[-1])
    return not torch.equal(torch.where(index.T == expert)[1], torch.where(index == expert)[0])


def _row_order(rec: ExpertsRecording, slices: dict, ancestry: Ancestry, order: str) -> str:
    """The rows' order read from the first expert whose routed tokens tell the two orders apart (``order``, the
    first expert's, when none does: the recorded routing, a user's example, may not show it for the first)."""
    expert = next((e for e in sorted(slices) if _orders_differ(rec, e)), None)
    if expert is None or expert == min(slices):
        return order
    rows, _, routing, _ = expert_region(rec, weight_side(rec.graph, slices[expert]), ancestry)
    return check_gather(rec, expert, rows, routing)


def _recipe(node: fx.Node, slices: set[fx.Node], transform: Callable | None) -> Callable:
    """A function ``(container, e) -> Tensor`` that replays ``node`` for expert ``e``."""

    def build(container: nn.Module, expert: int) -> torch.Tensor:
        memo: dict[fx.Node, Any] = {}

        def evaluate(n: fx.Node):
            if n not in memo:
                if n in slices and n.op == "get_attr":  # batched: the whole parameter, one entry per expert
                    memo[n] = resolve(container, n.target)[expert]
                elif n in slices:  # the selection of one expert from the parameter (or a view of it)
                    memo[n] = evaluate(n.args[0])[expert]
                elif n.op == "get_attr":
                    memo[n] = resolve(container, n.target) if not n.meta.get("constant") else value(n)
                else:
                    args = fx.node.map_arg(n.args, evaluate)
                    kwargs = fx.node.map_arg(n.kwargs, evaluate)
                    memo[n] = n.target(*args, **kwargs)
            return memo[n]

        out = evaluate(node)
        return transform(out) if transform else out

    return build


def build_template(rec, region, rows, contribution, routing, weights_side, slices,
                   tail: tuple[fx.Node | None, list[fx.Node]] = (None, []),
                   ancestry: Ancestry | None = None) -> tuple[fx.Graph, dict[str, CutLinear]]:
    """Copy the region into a new graph, turning matmuls with expert weights into Linear calls.

    A ``tail`` (``route_tail``) follows the region, then the routing weight's product.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {rows: graph.placeholder("x")}
    buffer, tail_nodes = tail
    if routing is not None or tail_nodes:
        route_weight = graph.placeholder("routing_weight")
        if routing is not None:
            env[routing] = route_weight
    linears: dict[str, CutLinear] = {}
    slice_set = set(slices)

    def packed_name(n: fx.Node) -> str:
        origin = [s for s in slices if s is n or s in _ancestors(n)]
        return _packed_name(origin[0]) if origin else "?"

    def shared(n: fx.Node) -> fx.Node:
        """A container parameter or buffer every expert uses (a norm weight, say), reached through the container."""
        return graph.get_attr(f"{CONTAINER_ATTR}.{n.target}")

    def outside(n: fx.Node) -> fx.Node:
        """A value computed from container parameters and constants alone: copied into the template.

        In a tail, a per-expert parameter's entry taken per route (``w[index]``) is the expert's own (``w[e]``).
        """
        if n not in env:
            table = per_route_entry(n, rec, ancestry) if tail_nodes else None
            if table is not None:
                env[n] = graph.call_function(operator.getitem, (shared(table), graph.get_attr(EXPERT_ATTR)))
            elif n.op == "placeholder":
                _fail(errors.UNSUPPORTED_EXPERT, f"an expert's computation reads the experts' input `{n.target}`", n)
            else:
                env[n] = shared(n) if n.op == "get_attr" else graph.node_copy(n, outside)
        return env[n]

    for node in region[1:]:
        name = target_name(node)
        weights = [a for a in node.all_input_nodes if a in weights_side]
        if not weights:
            env[node] = graph.node_copy(node, outside)
            continue
        activation = env[node.args[0]] if isinstance(node.args[0], fx.Node) else None
        if name == "linear" and node.args[1] in weights_side:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            weight = value(node.args[1])
            bias = _recipe(bias, slice_set, None) if isinstance(bias, fx.Node) else None
            origin = Origin(_recipe(node.args[1], slice_set, None), "linear", bias, bias_in_op=True)
            lin = CutLinear(origin.operand, bias, weight.shape[1], weight.shape[0], packed_name(node.args[1]),
                          "F.linear(x, W)", origin)
        elif name in _BATCHED_MATMUL_OPS and node.args[1] in slice_set and value(node.args[1]).dim() == 3:
            weight = value(node.args[1])[0]
            origin = Origin(_recipe(node.args[1], slice_set, None), "matmul")
            lin = CutLinear(_recipe(node.args[1], slice_set, lambda w: w.t()), None, weight.shape[0], weight.shape[1],
                          node.args[1].target, "batched x @ W[e] (transposed storage)", origin)
        elif name in _MATMUL_OPS and node.args[1] in weights_side and value(node.args[1]).dim() == 2:
            weight = value(node.args[1])
            origin = Origin(_recipe(node.args[1], slice_set, None), "matmul")
            lin = CutLinear(_recipe(node.args[1], slice_set, lambda w: w.t()), None, weight.shape[0], weight.shape[1],
                          packed_name(node.args[1]), "x @ W (transposed storage)", origin)
        elif name == "conv1d" and node.args[1] in weights_side and _pointwise(node):
            lin, activation = _conv_linear(graph, node, activation, slice_set, packed_name(node.args[1]))
        elif name in _ADD_OPS and activation is not None and activation.op == "call_module" and len(weights) == 1:
            lin = linears[activation.target]
            if lin.bias is not None or len(activation.users) != 0:
                _fail(errors.UNSUPPORTED_EXPERT, "a bias is added to a projection that already has one", node)
            lin.bias = lin.origin.bias = _recipe(weights[0], slice_set, None)
            env[node] = activation
            continue
        else:
            _fail(errors.UNSUPPORTED_EXPERT, f"the expert's weights are used by `{name}`, not a matmul", node)
        target = f"linear{len(linears)}"
        linears[target] = lin
        env[node] = graph.call_module(target, (activation,))
        env[node].meta["source"] = node.meta.get("source")
        if lin.origin.op == "conv1d":  # channels back in place
            env[node] = graph.call_method("movedim", (env[node], -1, 1))
    if not tail_nodes:
        graph.output(env[contribution])
        return graph, linears
    env[buffer] = env[contribution]
    for node in tail_nodes:
        env[node] = graph.node_copy(node, outside)
    graph.output(graph.call_function(operator.mul, (env[tail_nodes[-1]], route_weight)))
    return graph, linears


def _pointwise(node: fx.Node) -> bool:
    """Is this ``conv1d`` a kernel-1 convolution with no stride, padding, dilation or groups (a Linear)?"""
    settings = [*node.args[3:], *node.kwargs.values()]
    plain = ((1,), (0,), (1,), 1)
    return value(node.args[1]).shape[-1] == 1 and all(
        (s,) == p or s == p for s, p in zip(settings, plain)) and len(settings) <= len(plain)


def _conv_linear(graph: fx.Graph, node: fx.Node, activation: fx.Node, slices: set[fx.Node],
                 packed: str) -> tuple[CutLinear, fx.Node]:
    """A kernel-1 ``conv1d(x, W, b)`` as a Linear over ``x`` with its channels last (``W [out, in, 1]``)."""
    weight = value(node.args[1])
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bias = _recipe(bias, slices, None) if isinstance(bias, fx.Node) else None
    origin = Origin(_recipe(node.args[1], slices, None), "conv1d", bias, bias_in_op=True)
    lin = CutLinear(_recipe(node.args[1], slices, lambda w: w.squeeze(-1)), bias, weight.shape[1], weight.shape[0],
                    packed, "kernel-1 conv1d over the channels", origin)
    return lin, graph.call_method("movedim", (activation, 1, -1))


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def analyze_experts(rec: ExpertsRecording, packed: dict[str, nn.Parameter],
                    num_experts: int | None = None) -> tuple[ExpertTemplate, dict[str, Any], dict[str, str]]:
    """The expert template of a packed container, its layout facts and their sources.

    With ``num_experts`` (and a recording with indices and weights), the template is checked against the
    container's recorded output (``check_template``).
    """
    slices = expert_slices(rec.graph, packed)
    seeds = slices[min(slices)] if slices else batched_parameters(rec.graph, packed)
    if not seeds:
        _fail(errors.UNSUPPORTED_DISPATCH,
              "the packed weights are neither selected one expert at a time nor used by a batched matmul")
    side = weight_side(rec.graph, seeds)
    ancestry = Ancestry(rec.graph)
    rows, contribution, routing, region = expert_region(rec, side, ancestry)
    tail = route_tail(rec, contribution, ancestry) if routing is None else (None, [])
    order = _row_order(rec, slices, ancestry, check_gather(rec, min(slices), rows, routing)) if slices else "slot-major"
    graph, linears = build_template(rec, region, rows, contribution, routing, side, seeds, tail, ancestry)
    split_kinds = split_outputs(graph, linears)
    eliminate_dead_code(graph)
    label_linears(graph, linears)
    if num_experts is not None:
        check_template(rec, graph, linears, num_experts)
    sources = {n.target: n.meta["source"] for n in graph.nodes if n.op == "call_module" and n.meta.get("source")}
    tensor_methods_as_calls(graph)
    computation = describe(graph)
    projections = route_projections(graph, linears)
    graph.lint()
    recipes = [
        LinearRecipe(name, lin.weight, lin.bias, lin.in_features, lin.out_features, lin.packed_param, lin.note)
        for name, lin in linears.items()
    ]
    layout = {
        "packed_params": {name: list(p.shape) for name, p in packed.items()},
        "transposed": any("transposed" in r.note for r in recipes),
        "gate_up": "/".join(sorted(split_kinds)) or "separate",
        "bias": any(r.bias is not None for r in recipes),
        "gated": any(r.name == "gate_proj" for r in recipes),
    }
    if order != "slot-major":
        layout["rows"] = order
    if tail[1] and sums_over_slots(rec, tail[1][-1], ancestry):
        layout["combine"] = "sum over slots"
    end = tail[1][-1] if tail[1] else contribution
    sources["contribution"] = end.meta.get("source")
    template = ExpertTemplate(graph=graph, linears=recipes, uses_routing_weight=routing is not None or bool(tail[1]),
                              weight_applied_last=weight_applied_last(graph),
                              output_dtype=value(end).dtype, computation=computation,
                              projections=projections)
    return template, layout, sources
