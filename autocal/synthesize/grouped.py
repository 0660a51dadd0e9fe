"""Run one expert template for a group of experts at once (the calibration forward's fast path).

With calibration on, every expert runs on every token. Called one expert at a
time, each expert costs its Linear calls plus a handful of small element-wise
kernels (activation, product, weighting, combine), and on a GPU those launches,
not the arithmetic, set the time. Here the template graph is interpreted once
for a group of experts: each Linear is still called once per expert (observers
and hooks see exactly what they would), but every other op runs once on the
group's outputs stacked along a new leading dimension.

Values in the interpreter are one of three kinds: ``Shared`` (the same for every
expert of the group, e.g. the token rows, or a weight of the experts' container), a
stacked ``[G, ...]`` tensor, or a per-expert list (module attributes: Linears, layouts). Ops other than
``project`` see shared values as they are and stacked ones whole, so they must
broadcast over the leading dimension; ``GroupedTemplate.check`` compares the
result with the expert-at-a-time forward before the path is used, and the
container falls back to one expert at a time where they differ. Each value is
dropped after its last use, as ``fx.Interpreter`` does.

Experts large enough to keep the device busy on their own run alone, and a
group of one needs no stacking and no interpreter: ``GroupedTemplate.alone``
runs code generated once from the same template, up to the unweighted output.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..linear_calls import linear_calls_for
from ..numerics import assemble_columns, call_linear, observation_off, project, unobserved, untouched

__all__ = ["GroupedTemplate"]


_SHAPED = {"view", "reshape"}  # methods given one expert's shape
# Bytes of one expert Linear's weight up to which a group's Linears are computed by one batched matmul on their
# stacked weights (GPU, CPU). Stacking costs the device a read and a write of the weights; a launch per Linear
# costs the host some microseconds: about what a GPU copies of 16 MiB of weights meanwhile, a CPU of 64 KiB.
STACK_BYTES = {False: 16 << 20, True: 64 << 10}


class Shared:
    """A value every expert of the group shares (not stacked)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _NotGroupable(Exception):
    """The template uses a per-expert value outside ``project``: run experts one at a time."""


class GroupedTemplate:
    """The expert template of one calibration container, run for several experts per call.

    Only for templates that apply the routing weight last (``expert(x) * w``,
    then at most a cast): the grouped run stops before that product and returns
    the unweighted outputs, so the container weights and casts only the rows it
    keeps (the routed ones), not every expert's output on every token.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        weight = next((n for n in graph.nodes if n.op == "placeholder" and n.target == "routing_weight"), None)
        product = next(iter(weight.users)) if weight is not None and len(weight.users) == 1 else None
        others = [a for a in product.all_input_nodes if a is not weight] if product is not None else []
        self.unweighted: fx.Node | None = others[0] if len(others) == 1 else None
        self.usable: bool | None = False if self.unweighted is None else None  # None: not checked yet
        self._alone: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
        self._dead_after = _dead_after(graph)

    def __deepcopy__(self, memo: dict) -> "GroupedTemplate":
        """A template made again from a copy of the graph: ``fx.Graph`` copies itself with new nodes of its
        own, so the nodes held here (``unweighted``, ``_dead_after``) would no longer be the graph's."""
        copied = GroupedTemplate(copy.deepcopy(self.graph, memo))
        copied.usable = self.usable
        return copied

    def __call__(self, experts: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """``[G, rows, out]``: each expert's output on all rows ``x``, before the routing weight.

        One expert alone runs ``alone`` instead and gives ``[rows, out]``.
        """
        if len(experts) == 1:
            return self.alone(experts[0], x)
        group, env = len(experts), {}
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = Shared(x) if node.target == "x" else _Unused()
            elif node.op == "get_attr":
                env[node] = _members(experts, node.target)
            elif node.op == "output":
                break
            elif node.target is project:
                env[node] = _project(*fx.node.map_arg(node.args, env.__getitem__), group)
            else:
                env[node] = _apply(node, env)
            for dead in self._dead_after.get(node, ()):  # free a group's activations as soon as they are used up
                del env[dead]
            if node is self.unweighted:
                result = _materialized(env[node])
                return result.value.expand(group, *result.value.shape) if isinstance(result, Shared) else result
        raise _NotGroupable()

    def alone(self, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One expert's output on all rows ``x`` before the routing weight, by generated code (no interpreter).

        The template up to the unweighted output, with each projection's
        Linears called as modules and a fused projection's columns taken from
        the Linear that computes them (``_alone_graph``).
        """
        if self._alone is None:
            self._alone = _compile(_alone_graph(self.graph, self.unweighted), expert)
        return self._alone(expert, x)

    def check(self, experts: list[nn.Module], x: torch.Tensor) -> bool:
        """Does the grouped run give each expert's own forward? Checked once, unobserved (no hook sees it)."""
        if self.usable is None:
            weight = torch.rand(len(experts), x.shape[0], 1, dtype=x.dtype, device=x.device)
            try:
                with unobserved(), torch.no_grad():
                    grouped = (self(experts, x) * weight).float()
                    alone = (self.alone(experts[0], x) * weight[0]).float()
                    one_by_one = torch.stack([e(x, weight[i]) for i, e in enumerate(experts)]).float()
                tolerance = dict(rtol=1e-5, atol=1e-6) if x.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
                self.usable = grouped.shape == one_by_one.shape and alone.shape == one_by_one.shape[1:] and \
                    torch.allclose(grouped, one_by_one, **tolerance) and torch.allclose(alone, one_by_one[0], **tolerance)
            except (_NotGroupable, RuntimeError, TypeError, IndexError, KeyError, AttributeError):
                self.usable = False
        return self.usable


class _Unused:
    """The routing weight: never read before the product the grouped run stops at."""


class _Columns:
    """A projection's Linears' outputs (each stacked ``[G, rows, f]``, or one expert's), not yet written into one tensor.

    Slicing out exactly one Linear's columns (gate or up of a fused gate_up
    matmul) gives that Linear's stack with no copy; any other use assembles them.
    """

    def __init__(self, pieces: tuple[torch.Tensor, ...], columns: tuple[slice, ...], features: int) -> None:
        self.pieces, self.columns, self.features = pieces, columns, features

    def piece(self, index: Any) -> torch.Tensor | None:
        number = _piece_of(index, self.columns)
        return None if number is None else self.pieces[number]


def _piece_of(index: Any, columns: tuple[slice, ...]) -> int | None:
    """The Linear whose columns ``[..., index]`` takes, exactly, if any."""
    for number, cols in enumerate(columns):
        if isinstance(index, tuple) and index == (Ellipsis, cols):
            return number
    return None


def _materialized(value: Any) -> Any:
    if isinstance(value, _Columns):
        return assemble_columns(value.pieces, value.columns, value.features)
    return value


def _members(experts: list[nn.Module], name: str) -> list[Any] | Shared:
    """``getattr(e, name)`` for every expert (also a dotted path); ``Shared`` where all hold the same object.

    Children and plain attributes are read without ``nn.Module.__getattr__``'s cost.
    """
    try:
        if name in experts[0]._modules:
            members = [e._modules[name] for e in experts]
        elif name in experts[0].__dict__:
            members = [e.__dict__[name] for e in experts]
        else:
            raise KeyError(name)
    except KeyError:  # not held the same way by every expert, or a dotted path (a container's norm weight)
        members = [operator.attrgetter(name)(e) for e in experts]
    return Shared(members[0]) if all(m is members[0] for m in members) else members


def _unwrap(value: Any) -> Any:
    if isinstance(value, (list, _Unused)):
        raise _NotGroupable()
    return value.value if isinstance(value, Shared) else _materialized(value)


def _apply(node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    """One non-Linear op, once for the whole group (shared if none of its inputs is stacked)."""
    values = [env[n] for n in node.all_input_nodes]
    if len(node.args) == 2 and isinstance(node.args[0], fx.Node) and isinstance(env[node.args[0]], _Columns) \
            and node.target in (operator.getitem, "__getitem__"):
        piece = env[node.args[0]].piece(node.args[1])
        if piece is not None:
            return piece
    shared = all(isinstance(v, Shared) for v in values)
    args = fx.node.map_arg(node.args, lambda n: _unwrap(env[n]))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: _unwrap(env[n]))
    if node.op == "call_method" and node.target in _SHAPED and not shared:  # one expert's shape: keep the group
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        result = getattr(args[0], node.target)(args[0].shape[0], *shape)
    elif node.op == "call_method":
        result = getattr(args[0], node.target)(*args[1:], **kwargs)
    elif node.op == "call_function":
        result = node.target(*args, **kwargs)
    else:
        raise _NotGroupable()
    return Shared(result) if shared else result


def _project(x: Any, linears: tuple[list[nn.Linear], ...], columns: tuple[slice, ...], features: int,
             layouts: list, group: int) -> Any:
    """``ops.project`` for every expert of the group, stacked ``[G, rows, features]``.

    Observed Linears are called one by one and each Linear's outputs stacked
    once for the group, so writing them into their columns costs one copy per
    Linear per group, not per expert; a fused projection's Linears stay apart
    (``_Columns``) until something needs them as one tensor.
    """
    x = _materialized(x)
    inputs = x.value if isinstance(x, Shared) else x
    linears, layouts = tuple(_per_expert(linear, group) for linear in linears), _per_expert(layouts, group)
    untouched_group = _all_untouched(linears, layouts, group)
    if untouched_group and (packed := _packed_operands(linears, layouts)) is not None:
        operand, bias = packed  # nothing observes the Linears: one batched matmul on the packed storage
        out = torch.matmul(inputs, operand.transpose(-1, -2) if layouts[0].op == "linear" else operand)
        return out if bias is None else out + bias.unsqueeze(-2)
    rows = [inputs] * group if isinstance(x, Shared) else inputs.unbind(0)
    if untouched_group:
        return torch.stack([project(rows[g], tuple(linear[g] for linear in linears), columns, features, layouts[g])
                            for g in range(group)])
    flat = [linear for per_linear in linears for linear in per_linear]
    calls = None if observation_off() else linear_calls_for(flat, rows[0])
    if calls is None:
        pieces = tuple(torch.stack([call_linear(linear, row) for linear, row in zip(per_linear, rows)])
                       for per_linear in linears)
    else:  # group hooks stand for every hook on the Linears: each called once, then the Linears' matmuls
        calls.run_hooks(flat, rows * len(linears))
        weights = iter(calls.weights)
        pieces = tuple(_linears(inputs, rows, per_linear, [next(weights) for _ in per_linear]) for per_linear in linears)
    return pieces[0] if len(pieces) == 1 else _Columns(pieces, columns, features)


def _linears(inputs: torch.Tensor, rows: list[torch.Tensor], linears: list[nn.Linear],
             weights: list[torch.Tensor]) -> torch.Tensor:
    """``[G, rows, out]``: each Linear's ``F.linear`` with ``weights[g]`` on ``rows[g]``, which are ``inputs``
    (shared by the group) or its ``[g]`` (stacked).

    Small bias-free Linears (``STACK_BYTES``) run as one batched matmul on their stacked weights (``inputs``
    broadcast or batched alike): a launch per Linear costs the host more than the copy costs the device.
    """
    first = weights[0]
    if len(weights) == 1 or first.numel() * first.element_size() > STACK_BYTES[first.device.type == "cpu"] or any(
            linear.bias is not None for linear in linears):
        return torch.stack([F.linear(row, weight, linear.bias) for linear, row, weight in zip(linears, rows, weights)])
    return torch.matmul(inputs, torch.stack(weights).transpose(-1, -2))


def _per_expert(value: Any, group: int) -> list:
    """A module attribute per expert of the group, also where every expert holds the same one."""
    return [value.value] * group if isinstance(value, Shared) else value


def _all_untouched(linears: tuple[list[nn.Linear], ...], layouts: list, group: int) -> bool:
    """``ops.untouched`` for every expert of the group (observed groups stop at the first expert)."""
    return all(untouched(tuple(linear[g] for linear in linears), layouts[g]) for g in range(group))


def _packed_operands(linears: tuple[list[nn.Linear], ...], layouts: list) -> tuple | None:
    """The group's matmul operands (and biases) as one strided view ``[G, ...]``, if evenly spaced in storage."""
    operand = _stacked_view([linear.weight for linear in linears[0]], [layout.operand for layout in layouts])
    if operand is None:
        return None
    if layouts[0].bias is None:
        return operand, None
    bias = _stacked_view([linear.bias for linear in linears[0]], [layout.bias for layout in layouts])
    return (operand, bias) if bias is not None else None


def _stacked_view(tensors: list[torch.Tensor], geometries: list) -> torch.Tensor | None:
    """``tensors[g].as_strided(*geometries[g])`` for every ``g``, as one view, or None if not evenly spaced."""
    sizes, strides, offsets = zip(*geometries)
    base = tensors[0]
    same_storage = all(t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for t in tensors)
    step = offsets[1] - offsets[0] if len(offsets) > 1 else 0
    if not same_storage or len(set(sizes)) > 1 or len(set(strides)) > 1 or step <= 0 or any(
            b - a != step for a, b in zip(offsets, offsets[1:])):
        return None
    return base.as_strided((len(tensors), *sizes[0]), (step, *strides[0]), offsets[0])


def _dead_after(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values whose last use it is (as ``fx.Interpreter`` frees them)."""
    dead_after: dict[fx.Node, list[fx.Node]] = {}
    seen: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        for used in node.all_input_nodes:
            if used not in seen:
                seen.add(used)
                dead_after.setdefault(node, []).append(used)
    return dead_after


def _alone_graph(template: fx.Graph, unweighted: fx.Node) -> fx.Graph:
    """The template's graph up to ``unweighted``, each ``project`` replaced by calls of its Linears.

    An exact column slice of a fused projection (gate or up of ``gate_up``)
    becomes the output of the Linear that computes those columns; any other
    use of a fused projection gets its Linears' outputs written into one tensor.
    """
    graph, env, pieces = fx.Graph(), {}, {}

    def value(node: fx.Node) -> fx.Node:
        if node in pieces and node not in env:
            outputs, columns, features = pieces[node]
            env[node] = graph.call_function(assemble_columns, (outputs, columns, features))
        return env[node]

    for node in template.nodes:
        if node.op == "placeholder" and node.target != "x":
            continue
        if node.target is project:
            x, linears, columns, features = node.args[:4]
            outputs = tuple(graph.call_function(call_linear, (value(linear), value(x))) for linear in linears)
            if len(outputs) == 1:
                env[node] = outputs[0]
            else:
                pieces[node] = (outputs, columns, features)
        elif node.target in (operator.getitem, "__getitem__") and node.args[0] in pieces and \
                _piece_of(node.args[1], pieces[node.args[0]][1]) is not None:
            outputs, columns, _ = pieces[node.args[0]]
            env[node] = outputs[_piece_of(node.args[1], columns)]
        else:
            env[node] = graph.node_copy(node, value)
        if node is unweighted:
            graph.output(value(node))
            graph.eliminate_dead_code()  # the layouts ``project`` took
            return graph
    raise _NotGroupable()


def _compile(graph: fx.Graph, expert: nn.Module) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``graph``'s generated forward, to be called with any expert of the template as ``self``."""
    attributes = {node.target: operator.attrgetter(node.target)(expert) for node in graph.nodes if node.op == "get_attr"}
    return type(fx.GraphModule(attributes, graph)).forward
