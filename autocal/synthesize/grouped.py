"""Run one expert template for a group of experts at once (the calibration forward's fast path).

With calibration on, every expert runs on every token. Called one expert at a
time, each expert costs its Linear calls plus a handful of small element-wise
kernels (activation, product, weighting, combine), and on a GPU those launches,
not the arithmetic, set the time. Here the template graph is interpreted once
for a group of experts: each Linear is still called once per expert (observers
and hooks see exactly what they would), but every other op runs once on the
group's outputs stacked along a new leading dimension.

Values in the interpreter are one of three kinds: ``Shared`` (the same for every
expert of the group, e.g. the token rows), a stacked ``[G, ...]`` tensor, or a
per-expert list (module attributes: Linears, layouts). Ops other than
``project`` see shared values as they are and stacked ones whole, so they must
broadcast over the leading dimension; ``GroupedTemplate.check`` compares the
result with the expert-at-a-time forward before the path is used, and the
container falls back to one expert at a time where they differ.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from .ops import assemble_columns, project, unobserved, untouched

__all__ = ["GroupedTemplate"]


_SHAPED = {"view", "reshape"}  # methods given one expert's shape


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

    def __call__(self, experts: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """``[G, rows, out]``: each expert's output on all rows ``x``, before the routing weight."""
        env: dict[fx.Node, Any] = {}
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = Shared(x) if node.target == "x" else _Unused()
            elif node.op == "get_attr":
                env[node] = [_member(expert, node.target) for expert in experts]
            elif node.op == "output":
                break
            elif node.target is project:
                env[node] = _project(*fx.node.map_arg(node.args, env.__getitem__), len(experts))
            else:
                env[node] = _apply(node, env)
            if node is self.unweighted:
                return _stacked(_materialized(env[node]), len(experts))
        raise _NotGroupable()

    def check(self, experts: list[nn.Module], x: torch.Tensor) -> bool:
        """Does the grouped run give each expert's own forward? Checked once, unobserved (no hook sees it)."""
        if self.usable is None:
            weight = torch.rand(len(experts), x.shape[0], 1, dtype=x.dtype, device=x.device)
            try:
                with unobserved(), torch.no_grad():
                    grouped = (self(experts, x) * weight).float()
                    one_by_one = torch.stack([e(x, weight[i]) for i, e in enumerate(experts)]).float()
                tolerance = dict(rtol=1e-5, atol=1e-6) if x.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
                self.usable = grouped.shape == one_by_one.shape and torch.allclose(grouped, one_by_one, **tolerance)
            except (_NotGroupable, RuntimeError, TypeError, IndexError):
                self.usable = False
        return self.usable


class _Unused:
    """The routing weight: never read before the product the grouped run stops at."""


class _Columns:
    """A projection's Linears' outputs, each stacked ``[G, rows, f]``, not yet written into one tensor.

    Slicing out exactly one Linear's columns (gate or up of a fused gate_up
    matmul) gives that Linear's stack with no copy; any other use assembles them.
    """

    def __init__(self, pieces: tuple[torch.Tensor, ...], columns: tuple[slice, ...], features: int) -> None:
        self.pieces, self.columns, self.features = pieces, columns, features

    def piece(self, index: Any) -> torch.Tensor | None:
        for piece, cols in zip(self.pieces, self.columns):
            if index == (Ellipsis, cols):
                return piece
        return None


def _materialized(value: Any) -> Any:
    if isinstance(value, _Columns):
        return assemble_columns(value.pieces, value.columns, value.features)
    return value


def _member(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)`` without ``nn.Module.__getattr__``'s cost for children and plain attributes."""
    found = module._modules.get(name, _MISSING)
    if found is _MISSING:
        found = module.__dict__.get(name, _MISSING)
    return getattr(module, name) if found is _MISSING else found


_MISSING = object()


def _stacked(value: Any, group: int) -> torch.Tensor:
    if isinstance(value, Shared):
        return value.value.expand(group, *value.value.shape)
    return value


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
    if node.op == "call_method" and node.target in _SHAPED and not shared:  # a per-expert shape: keep the group
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
             layouts: list, group: int) -> torch.Tensor:
    """``ops.project`` for every expert of the group, stacked ``[G, rows, features]``.

    Observed Linears are called one by one and each Linear's outputs stacked
    once for the group, so writing them into their columns costs one copy per
    Linear per group, not per expert.
    """
    per_expert = [tuple(linear[g] for linear in linears) for g in range(group)]
    if all(untouched(per_expert[g], layouts[g]) for g in range(group)):
        packed = _packed_operands(per_expert, layouts)
        if packed is not None:  # nothing observes the Linears: one batched matmul on the packed storage
            operand, bias = packed
            inputs = x.value if isinstance(x, Shared) else x
            out = torch.matmul(inputs, operand.transpose(-1, -2) if layouts[0].op == "linear" else operand)
            return out if bias is None else out + bias.unsqueeze(-2)
    rows = [x.value] * group if isinstance(x, Shared) else list(x)
    if all(untouched(per_expert[g], layouts[g]) for g in range(group)):
        return _stack([project(rows[g], per_expert[g], columns, features, layouts[g]) for g in range(group)])
    pieces = tuple(_stack([per_expert[g][i](rows[g]) for g in range(group)]) for i in range(len(linears)))
    return pieces[0] if len(pieces) == 1 else _Columns(pieces, columns, features)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, without a copy for a group of one."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _packed_operands(per_expert: list[tuple[nn.Linear, ...]], layouts: list) -> tuple | None:
    """The group's matmul operands (and biases) as one strided view ``[G, ...]``, if evenly spaced in storage."""
    operand = _stacked_view([linears[0].weight for linears in per_expert], [layout.operand for layout in layouts])
    if operand is None:
        return None
    if layouts[0].bias is None:
        return operand, None
    bias = _stacked_view([linears[0].bias for linears in per_expert], [layout.bias for layout in layouts])
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
