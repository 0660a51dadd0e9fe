"""Passes over the recorded experts container: one expert's computation as a template.

The container was recorded while the block ran, so its graph holds the real
dispatch: slices of the packed parameters for each hit expert, the rows each
expert received, the matmuls, the activation and the weighted scatter. The
passes here pick one expert's instance and cut it out:

1. ``expert_slices`` — which nodes select expert ``e`` from a packed parameter;
2. ``weight_side`` — what is computed from those slices alone (views, transposes);
3. ``expert_region`` — everything computed from the expert's input rows up to the
   value scattered into the output (its *contribution*);
4. ``route_tail`` — where the container writes the contributions one row per route
   into a buffer and only then weights and sums them, the per-row ops between (a
   per-expert norm after the down projection): they belong to the expert too;
5. ``build_template`` — the region (and its tail) as a graph over Linear layers, with
   each Linear's weight a recipe that views the packed parameter for any expert.

``check_template`` then replays the template through the dispatch the
synthesized container performs, on the recorded inputs, and raises where it does
not give the container's recorded output: nothing detection saw differ is left
for verification alone to find.

Then ``split_outputs`` turns slices of a Linear's output (``chunk``, ``[..., ::2]``)
into Linears of their own, and ``label_linears`` names them gate/up/down by what
the graph shows: the gate is the projection whose output goes through a
non-affine function before it meets the other one.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from .. import errors
from ..synthesize.ops import project
from ..verify import compare_outputs
from .graph_utils import Ancestry, is_int_tensor, target_name, tensor_inputs, value
from .structure import ExpertTemplate, LinearRecipe, Projection

__all__ = ["ExpertsRecording", "packed_parameters", "count_experts", "router_rows", "resolve", "analyze_experts",
           "CONTAINER_ATTR", "EXPERT_ATTR"]

# Generated expert code reaches parameters shared by all experts through this attribute.
CONTAINER_ATTR = "_container"
# And its own expert number through this one (to take its entry of a per-expert parameter, see route_tail).
EXPERT_ATTR = "_autocal_expert"
# Ops that write an expert's rows into a buffer the container combines later.
_SCATTER_OPS = {"__setitem__", "index_put_", "index_copy_"}

_SELECT_OPS = {"__getitem__", "select", "index_select"}
_MATMUL_OPS = {"matmul", "__matmul__", "mm"}
_BATCHED_MATMUL_OPS = {"bmm", "matmul", "__matmul__"}
_ADD_OPS = {"add", "__add__", "__radd__", "add_"}
# Ops that keep a value affine in its input; a projection whose path to the join
# holds any other op goes through a non-affine function: it is the gate.
_AFFINE_OPS = {
    "add", "__add__", "__radd__", "add_", "sub", "__sub__", "__rsub__", "mul", "__mul__", "__rmul__", "mul_",
    "div", "__truediv__", "neg", "__neg__", "clamp", "clamp_", "clip", "to", "float", "type_as", "contiguous",
    "view", "reshape", "getitem", "__getitem__",
}


@dataclass
class ExpertsRecording:
    """The recorded container call and which of its inputs plays which role."""

    graph: fx.Graph
    container: nn.Module
    hidden: fx.Node
    index: fx.Node | None = None
    weights: fx.Node | None = None


def _raw_parameters(container: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of ``container`` not owned by a torch layer (``nn.Linear``, ``nn.Embedding``, …).

    Packed experts store their weights as bare parameters of a model's own module.
    """
    layered = {id(p) for m in container.modules() if type(m).__module__.startswith("torch.nn.")
               for p in m.parameters(recurse=False)}
    return {name: p for name, p in container.named_parameters() if id(p) not in layered}


def packed_parameters(container: nn.Module, router_rows: Iterable[int] = ()) -> dict[str, nn.Parameter]:
    """Parameters that store the experts, by qualified name; empty if ``container`` holds no experts.

    Two layouts are recognised by shape alone:

    - *stacked*: at least two parameters of the container itself, of 3 or more
      dimensions, share a leading size E >= 2 (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``);
      their 2-D companions with the same leading size (biases) belong too. A lone
      3-D weight is a convolution, not experts. Leading sizes may differ when the
      largest is the router's choice count: choices past the smallest size have no
      weights of their own (LongCat's identity "zero experts"), see ``count_experts``.
    - *flat*: the container holds nothing but two or more raw 2-D parameters
      (possibly one module down) of one shape ``[E * m, H]`` (m >= 2),
      where E is the row count of a router weight beside the container
      (``router_rows``), e.g. DBRX's ``w1``/``v1``/``w2``.
    """
    own = dict(container.named_parameters(recurse=False))
    stacked = [p for p in own.values() if p.dim() >= 3]
    leading = {p.shape[0] for p in stacked}
    if len(stacked) >= 2 and min(leading, default=0) >= 2 and (len(leading) == 1 or max(leading) in router_rows):
        sizes = {name: p.shape[0] for name, p in own.items() if p.dim() >= 2}
        return {name: own[name] for name, size in sizes.items() if size in leading}
    raw = _raw_parameters(container)
    if len(raw) != len(list(container.parameters())):  # flat experts hold nothing but their weights
        return {}
    for rows in sorted(set(router_rows), reverse=True):
        shapes: dict[tuple, list[str]] = {}
        for name, p in raw.items():
            if rows >= 2 and p.dim() == 2 and p.shape[0] % rows == 0 and p.shape[0] // rows >= 2:
                shapes.setdefault(tuple(p.shape), []).append(name)
        group = max(shapes.values(), key=len, default=[])
        if len(group) >= 2 and len(group) == len(raw):
            return {name: raw[name] for name in group}
    return {}


def count_experts(packed: dict[str, nn.Parameter], router_rows: Iterable[int] = ()) -> int:
    """E: the shared leading size of stacked parameters, or the router rows that divide flat ones."""
    stacked = [p for p in packed.values() if p.dim() >= 3]
    if stacked:  # entries past the smallest size (a weight some choices lack) are not experts' weights
        return min(p.shape[0] for p in stacked)
    first = next(iter(packed.values()))
    return max(r for r in router_rows if r >= 2 and first.shape[0] % r == 0)


def router_rows(block: nn.Module, container: nn.Module) -> set[int]:
    """Row counts of 2-D weights beside ``container`` in ``block``: candidates for the number of experts."""
    inside = {id(p) for p in container.parameters()}
    return {p.shape[0] for p in block.parameters() if p.dim() == 2 and id(p) not in inside}


def resolve(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


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


def expert_region(rec: ExpertsRecording, weights_side: set[fx.Node], ancestry: Ancestry):
    """The expert's input rows, its contribution, the routing-weight input and the nodes between."""
    anchors = [n for n in rec.graph.nodes if n not in weights_side and any(a in weights_side for a in n.all_input_nodes)]
    if not anchors:
        _fail(errors.UNSUPPORTED_EXPERT, "no operation uses the expert's packed weights")
    inputs = [n for n in tensor_inputs(anchors[0]) if n not in weights_side and not is_int_tensor(n)]
    if len(inputs) != 1:
        _fail(errors.UNSUPPORTED_EXPERT, "the first matmul of an expert has no single activation input", anchors[0])
    rows = inputs[0]
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


def route_tail(rec: ExpertsRecording, contribution: fx.Node,
               ancestry: Ancestry) -> tuple[fx.Node | None, list[fx.Node]]:
    """The per-row ops between a buffer of unweighted expert outputs, one row per route, and the routing weights.

    A container may write each expert's output into a buffer (``buffer[rows] = out``),
    then process every row (a norm with each expert's own scale, gathered by the
    row's expert index) before it weights and sums the routes. Those ops are part
    of each expert's computation up to the combine. Returns the buffer and the ops
    in graph order, or ``(None, [])`` when the contribution is not written into such a buffer.
    """
    if rec.weights is None or rec.index is None:
        return None, []
    writes = [u for u in contribution.users if target_name(u) in _SCATTER_OPS and u.args[-1] is contribution]
    if len(writes) != 1 or not isinstance(writes[0].args[0], fx.Node):
        return None, []
    buffer = writes[0].args[0]
    shape = value(buffer).shape  # ops on whole rows keep it; a view to [tokens, k, features] ends the tail
    nodes = list(rec.graph.nodes)
    start = max(nodes.index(u) for u in buffer.users if target_name(u) in _SCATTER_OPS) + 1
    data = {n for n in nodes if n is rec.hidden or n is rec.weights or ancestry.is_ancestor(rec.hidden, n)
            or ancestry.is_ancestor(rec.weights, n)}
    tail, members = [], {buffer}
    for node in nodes[start:]:
        out, inputs = value(node), tensor_inputs(node)
        if node.op not in ("call_function", "call_method") or not any(n in members for n in inputs):
            continue
        if isinstance(out, torch.Tensor) and out.shape == shape and all(n in members or n not in data for n in inputs):
            tail.append(node)
            members.add(node)
    leaving = [n for n in tail if any(u not in members for u in n.users)]
    weighted = len(leaving) == 1 and any(
        n.op in ("call_function", "call_method") and ancestry.is_ancestor(leaving[0], n)
        and ancestry.is_ancestor(rec.weights, n) for n in nodes)
    return (buffer, tail[:tail.index(leaving[0]) + 1]) if weighted else (None, [])


def sums_over_slots(rec: ExpertsRecording, tail_end: fx.Node, ancestry: Ancestry) -> bool:
    """Does the container combine the weighted routes by a sum over the slot dimension (``[tokens, k, …].sum(1)``)?

    The synthesized container then sums them the same way, not by adding one expert after another, so that
    the combine rounds as the original's does.
    """
    index = value(rec.index)
    tokens, slots = index.reshape(-1, index.shape[-1]).shape
    for node in rec.graph.nodes:
        if target_name(node) != "sum" or not ancestry.is_ancestor(tail_end, node):
            continue
        source = value(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(source, torch.Tensor) and source.dim() == 3 and tuple(source.shape[:2]) == (tokens, slots) \
                and dim in (1, -2, (1,), [1], (-2,), [-2]):
            return True
    return False


def _per_route_entry(node: fx.Node, rec: ExpertsRecording, ancestry: Ancestry) -> fx.Node | None:
    """The parameter ``node`` takes one entry of per row by the row's expert index (``w[index]``), or None."""
    if target_name(node) not in ("__getitem__", "index_select", "embedding") or len(node.args) < 2:
        return None
    table, ids = (node.args[0], node.args[-1]) if target_name(node) != "embedding" else node.args[1::-1]
    from_index = isinstance(ids, fx.Node) and (ids is rec.index or ancestry.is_ancestor(rec.index, ids))
    if not from_index or not isinstance(table, fx.Node) or table.op != "get_attr":
        return None
    return table


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


def _last_dim(node: fx.Node) -> int:
    return value(node).dim() - 1


def _compose(recipe: Callable | None, step: Callable) -> Callable | None:
    if recipe is None:
        return None
    return lambda container, expert: step(recipe(container, expert))


@dataclass
class _Origin:
    """The original matmul a Linear was cut from: its weight operand, op and bias."""

    operand: Callable
    op: str
    bias: Callable | None = None
    bias_in_op: bool = False


@dataclass
class _Linear:
    weight: Callable
    bias: Callable | None
    in_features: int
    out_features: int
    packed_param: str
    note: str
    origin: _Origin
    columns: slice | None = None


def build_template(rec, region, rows, contribution, routing, weights_side, slices,
                   tail: tuple[fx.Node | None, list[fx.Node]] = (None, []),
                   ancestry: Ancestry | None = None) -> tuple[fx.Graph, dict[str, _Linear]]:
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
    linears: dict[str, _Linear] = {}
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
            table = _per_route_entry(n, rec, ancestry) if tail_nodes else None
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
            origin = _Origin(_recipe(node.args[1], slice_set, None), "linear", bias, bias_in_op=True)
            lin = _Linear(origin.operand, bias, weight.shape[1], weight.shape[0], packed_name(node.args[1]),
                          "F.linear(x, W)", origin)
        elif name in _BATCHED_MATMUL_OPS and node.args[1] in slice_set and value(node.args[1]).dim() == 3:
            weight = value(node.args[1])[0]
            origin = _Origin(_recipe(node.args[1], slice_set, None), "matmul")
            lin = _Linear(_recipe(node.args[1], slice_set, lambda w: w.t()), None, weight.shape[0], weight.shape[1],
                          node.args[1].target, "batched x @ W[e] (transposed storage)", origin)
        elif name in _MATMUL_OPS and node.args[1] in weights_side and value(node.args[1]).dim() == 2:
            weight = value(node.args[1])
            origin = _Origin(_recipe(node.args[1], slice_set, None), "matmul")
            lin = _Linear(_recipe(node.args[1], slice_set, lambda w: w.t()), None, weight.shape[0], weight.shape[1],
                          packed_name(node.args[1]), "x @ W (transposed storage)", origin)
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
    if not tail_nodes:
        graph.output(env[contribution])
        return graph, linears
    env[buffer] = env[contribution]
    for node in tail_nodes:
        env[node] = graph.node_copy(node, outside)
    graph.output(graph.call_function(operator.mul, (env[tail_nodes[-1]], route_weight)))
    return graph, linears


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _output_slices(node: fx.Node) -> list[tuple[fx.Node, Callable]] | None:
    """How each user of a Linear output slices its last dimension, or None."""
    last = _last_dim(node) if value(node) is not None else -1
    pieces = []
    for user in node.users:
        name = target_name(user)
        if name in ("chunk", "split", "tensor_split") and _is_last(user, last):
            for getter in user.users:
                if target_name(getter) != "getitem":
                    return None
                pieces.append((getter, _chunk_step(name, user, getter.args[1])))
        elif name in ("__getitem__",) and _is_last_dim_slice(user.args[1], last):
            step = user.args[1][-1]
            pieces.append((user, lambda t, s=step: t[s]))
        else:
            return None
    return pieces or None


def _is_last(node: fx.Node, last: int) -> bool:
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    return dim in (-1, last)


def _is_last_dim_slice(index: Any, last: int) -> bool:
    if not isinstance(index, tuple) or not isinstance(index[-1], slice):
        return False
    leading = index[:-1]
    return leading == (Ellipsis,) or (len(leading) == last and all(s == slice(None) for s in leading))


def _chunk_step(name: str, node: fx.Node, piece: int) -> Callable:
    arg = node.args[1]
    if name == "chunk":
        return lambda t: t.chunk(arg, 0)[piece]
    if name == "split":
        return lambda t: t.split(arg, 0)[piece]
    return lambda t: t.tensor_split(arg, 0)[piece]


def split_outputs(graph: fx.Graph, linears: dict[str, _Linear]) -> set[str]:
    """Replace slices of a Linear's output by Linears over the matching weight rows.

    Returns how outputs were split: ``"concatenated"`` for contiguous pieces,
    ``"interleaved"`` for strided ones.
    """
    kinds: set[str] = set()
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        pieces = _output_slices(node)
        if not pieces:
            continue
        lin = linears.pop(node.target)
        index = torch.arange(lin.out_features)
        strided = any(not _is_contiguous_range(step(index)) for _, step in pieces)
        kinds.add("interleaved" if strided else "concatenated")
        for piece, step in pieces:
            target = f"{node.target}_{len(linears)}"
            probe = step(torch.arange(lin.out_features))
            linears[target] = _Linear(
                _compose(lin.weight, step), _compose(lin.bias, step), lin.in_features, probe.shape[0],
                lin.packed_param, lin.note, lin.origin, _as_slice(probe),
            )
            with graph.inserting_before(piece):
                new = graph.call_module(target, node.args)
            piece.replace_all_uses_with(new)
        for user in list(node.users):
            for getter in list(user.users):
                graph.erase_node(getter)
            graph.erase_node(user)
        graph.erase_node(node)
    return kinds


def _is_contiguous_range(index: torch.Tensor) -> bool:
    return bool(index.numel() < 2 or (index.diff() == 1).all())


def _as_slice(indices: torch.Tensor) -> slice | None:
    """The slice selecting ``indices`` (an arithmetic progression), or None."""
    start = int(indices[0])
    step = int(indices[1] - indices[0]) if indices.numel() > 1 else 1
    if step < 1 or not torch.equal(indices, torch.arange(start, start + step * indices.numel(), step)):
        return None
    return slice(start, start + step * (indices.numel() - 1) + 1, None if step == 1 else step)


def route_projections(graph: fx.Graph, linears: dict[str, _Linear]) -> list[Projection]:
    """Compute the Linears cut from one original matmul through ``autocal.synthesize.ops.project``.

    ``project`` runs the original matmul on the packed storage while the
    Linears are untouched (bitwise the original), and the Linears themselves
    otherwise (hooks, quantization wrappers, replaced weights). Its output has
    the original's layout either way, so later ops see the same strides.
    """
    calls = {n.target: n for n in graph.nodes if n.op == "call_module"}
    groups: dict[int, list[str]] = {}
    for name, lin in linears.items():
        groups.setdefault(id(lin.origin), []).append(name)
    projections = []
    for names in groups.values():
        origin = linears[names[0]].origin
        features = sum(linears[n].out_features for n in names)
        columns = tuple(linears[n].columns or slice(0, features) for n in names)
        projection = Projection(tuple(names), columns, features, origin.operand, origin.op, origin.bias,
                                origin.bias_in_op)
        nodes = [calls[n] for n in names]
        last = max(nodes, key=list(graph.nodes).index)
        with graph.inserting_before(last.next):
            modules = tuple(graph.get_attr(n) for n in names)
            layout = graph.get_attr(f"_autocal_layout_{len(projections)}")
            out = graph.call_function(project, (nodes[0].args[0], modules, columns, features, layout))
            views = [out] if len(nodes) == 1 else [
                graph.call_function(operator.getitem, (out, (Ellipsis, cols))) for cols in columns
            ]
        for node, view in zip(nodes, views):
            node.replace_all_uses_with(view)
            graph.erase_node(node)
        projections.append(projection)
    return projections


def _eliminate_dead_code(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.op not in ("placeholder", "output") and not node.users and not target_name(node).endswith("_"):
            graph.erase_node(node)


def label_linears(graph: fx.Graph, linears: dict[str, _Linear]) -> dict[str, str]:
    """Name Linears gate/up/down by their place in the graph; returns old -> new name."""
    calls = [n for n in graph.nodes if n.op == "call_module"]
    ancestry = Ancestry(graph)
    first = [n for n in calls if not any(ancestry.is_ancestor(c, n) for c in calls)]
    last = [n for n in calls if not any(ancestry.is_ancestor(n, c) for c in calls)]
    names: dict[str, str] = {}
    if len(calls) == 3 and len(first) == 2 and len(last) == 1:
        gate = [n for n in first if _goes_through_activation(n, first, ancestry, graph)]
        if len(gate) == 1:
            up = [n for n in first if n is not gate[0]][0]
            names = {gate[0].target: "gate_proj", up.target: "up_proj", last[0].target: "down_proj"}
    elif len(calls) == 2 and len(first) == 1 and len(last) == 1 and first != last:
        names = {first[0].target: "up_proj", last[0].target: "down_proj"}
    if not names:
        names = {n.target: f"linear_{i}" for i, n in enumerate(calls)}
    for node in calls:
        node.target = names[node.target]
    renamed = {names[old]: lin for old, lin in linears.items()}
    linears.clear()
    linears.update(renamed)
    return names


def _goes_through_activation(node: fx.Node, first: list[fx.Node], ancestry: Ancestry, graph: fx.Graph) -> bool:
    """Does ``node``'s output pass a non-affine op before it meets the other projection?"""
    others = [n for n in first if n is not node]
    join = next(
        n for n in graph.nodes if ancestry.is_ancestor(node, n) and all(ancestry.is_ancestor(o, n) for o in others)
    )
    path = [n for n in ancestry.between(node, join) if n is not node and n is not join]
    return any(target_name(n) not in _AFFINE_OPS for n in path if not any(ancestry.is_ancestor(o, n) for o in others))


def describe(graph: fx.Graph) -> str:
    """A one-line reading of a template graph, e.g. ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""
    infix = {"mul": "*", "__mul__": "*", "__rmul__": "*", "add": "+", "__add__": "+", "__radd__": "+",
             "sub": "-", "__sub__": "-", "div": "/", "__truediv__": "/"}
    text: dict[fx.Node, str] = {}

    def show(arg):
        if isinstance(arg, fx.Node):
            return text[arg]
        if isinstance(arg, torch.dtype):
            return str(arg).removeprefix("torch.")
        return repr(arg)

    for node in graph.nodes:
        if node.op == "placeholder":
            text[node] = node.target
        elif node.op == "output":
            return text[node.args[0]]
        else:
            name = target_name(node)
            args = [show(a) for a in node.args]
            kwargs = [f"{k}={show(v)}" for k, v in node.kwargs.items() if v is not None]
            if name in ("to", "float", "type_as", "contiguous"):
                text[node] = args[0]
            elif name in infix and len(args) == 2 and not kwargs:
                text[node] = f"({args[0]} {infix[name]} {args[1]})"
            else:
                text[node] = f"{name}({', '.join(args + kwargs)})"
    return ""


def _weight_applied_last(graph: fx.Graph) -> bool:
    """Is the routing weight only a final factor (``expert(x) * w``, then at most a dtype cast)?

    Then an expert's output for a token is linear in its weight, and calibration
    can run every expert on all tokens at once and mask the combine.
    """
    weight = next((n for n in graph.nodes if n.op == "placeholder" and n.target == "routing_weight"), None)
    if weight is None or len(weight.users) != 1:
        return False
    node = next(iter(weight.users))
    if target_name(node) not in ("mul", "__mul__", "__rmul__", "mul_"):
        return False
    while node.op != "output":
        if len(node.users) != 1:
            return False
        node = next(iter(node.users))
        if node.op != "output" and target_name(node) not in ("to", "float", "type_as"):
            return False
    return True


def check_template(rec: ExpertsRecording, graph: fx.Graph, linears: dict[str, _Linear], num_experts: int) -> None:
    """Raise if the template, dispatched as the synthesized container dispatches it, does not give the container's
    recorded output on the recorded inputs (tokens routed only to packed experts; within rounding).

    The dispatch: each expert on its routed rows, weighted by the route's weight when the template takes it,
    summed per token. Detection has recorded both sides, so a difference is known here, verification or not.
    """
    output = value(next(n for n in rec.graph.nodes if n.op == "output").args[0])
    if rec.index is None or rec.weights is None or not isinstance(output, torch.Tensor):
        return
    hidden, index, weights = (value(n) for n in (rec.hidden, rec.index, rec.weights))
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index, weights = index.reshape(-1, index.shape[-1]), weights.reshape(-1, weights.shape[-1])
    if output.numel() % hidden.shape[0] or index.shape[0] != hidden.shape[0]:
        return
    expected = output.reshape(hidden.shape[0], -1)
    total = torch.zeros_like(expected)
    for expert in range(num_experts):
        slot, token = torch.where(index.T == expert)
        if token.numel():
            out = _run_template(graph, linears, rec.container, expert, hidden[token], weights[token, slot, None])
            total.index_add_(0, token, out.reshape(token.numel(), -1).to(total.dtype))
    packed_only = ((index >= 0) & (index < num_experts)).all(-1)
    diff, _, close = compare_outputs(expected[packed_only], total[packed_only])
    if not close:
        _fail(errors.UNSUPPORTED_EXPERT, f"the expert computation found does not reproduce the experts' recorded "
              f"output (differs by up to {diff:.3g}): the experts do more than autocal cut out")


def _run_template(graph: fx.Graph, linears: dict[str, _Linear], container: nn.Module, expert: int,
                  x: torch.Tensor, routing_weight: torch.Tensor) -> torch.Tensor:
    """One expert's template on rows ``x``, its Linears computed from the packed weights."""
    env: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = x if node.target == "x" else routing_weight
        elif node.op == "get_attr":
            env[node] = expert if node.target == EXPERT_ATTR else resolve(container, node.target.split(".", 1)[1])
        elif node.op == "call_module":
            lin = linears[node.target]
            bias = lin.bias(container, expert) if lin.bias is not None else None
            env[node] = torch.nn.functional.linear(env[node.args[0]], lin.weight(container, expert), bias)
        elif node.op == "output":
            return env[node.args[0]]
        else:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            env[node] = node.target(*args, **kwargs) if node.op == "call_function" else \
                getattr(args[0], node.target)(*args[1:], **kwargs)
    raise AssertionError("a template graph ends with its output")


def _tensor_method_names() -> dict[int, str]:
    names = {}
    for name in dir(torch.Tensor):
        member = getattr(torch.Tensor, name, None)
        if callable(member):
            names.setdefault(id(member), name)
    return names


_TENSOR_METHODS = _tensor_method_names()


def _tensor_methods_as_calls(graph: fx.Graph) -> None:
    """Turn ``torch.Tensor.<method>`` targets into ``call_method`` nodes, which fx prints as ``x.method(...)``."""
    for node in graph.nodes:
        if node.op == "call_function" and id(node.target) in _TENSOR_METHODS:
            node.op, node.target = "call_method", _TENSOR_METHODS[id(node.target)]


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
    order = check_gather(rec, min(slices), rows, routing) if slices else "slot-major"
    graph, linears = build_template(rec, region, rows, contribution, routing, side, seeds, tail, ancestry)
    split_kinds = split_outputs(graph, linears)
    _eliminate_dead_code(graph)
    label_linears(graph, linears)
    if num_experts is not None:
        check_template(rec, graph, linears, num_experts)
    sources = {n.target: n.meta["source"] for n in graph.nodes if n.op == "call_module" and n.meta.get("source")}
    _tensor_methods_as_calls(graph)
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
                              weight_applied_last=_weight_applied_last(graph),
                              output_dtype=value(end).dtype, computation=computation,
                              projections=projections)
    return template, layout, sources
