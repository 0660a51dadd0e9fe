"""Passes over an expert template graph once it is cut out: Linears split, labelled, and routed through ``project``.

``split_outputs`` turns slices of a Linear's output (``chunk``, ``[..., ::2]``)
into Linears of their own, ``label_linears`` names them gate/up/down by what
the graph shows (the gate is the projection whose output goes through a
non-affine function before it meets the other one), ``route_projections`` makes
the Linears cut from one original matmul compute it together, and ``describe``
reads the graph as one line.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from ..numerics import project
from .graph_utils import Ancestry, target_name, value
from .structure import Projection

__all__ = ["Origin", "CutLinear", "compose", "split_outputs", "route_projections", "eliminate_dead_code",
           "label_linears", "describe", "weight_applied_last", "tensor_methods_as_calls"]

# Ops that keep a value affine in its input; a projection whose path to the join
# holds any other op goes through a non-affine function: it is the gate.
_AFFINE_OPS = {
    "add", "__add__", "__radd__", "add_", "sub", "__sub__", "__rsub__", "mul", "__mul__", "__rmul__", "mul_",
    "div", "__truediv__", "neg", "__neg__", "clamp", "clamp_", "clip", "to", "float", "type_as", "contiguous",
    "view", "reshape", "getitem", "__getitem__",
}


def _last_dim(node: fx.Node) -> int:
    return value(node).dim() - 1


def compose(recipe: Callable | None, step: Callable) -> Callable | None:
    if recipe is None:
        return None
    return lambda container, expert: step(recipe(container, expert))


@dataclass
class Origin:
    """The original matmul a Linear was cut from: its weight operand, op and bias."""

    operand: Callable
    op: str
    bias: Callable | None = None
    bias_in_op: bool = False


@dataclass
class CutLinear:
    weight: Callable
    bias: Callable | None
    in_features: int
    out_features: int
    packed_param: str
    note: str
    origin: Origin
    columns: slice | None = None


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


def split_outputs(graph: fx.Graph, linears: dict[str, CutLinear]) -> set[str]:
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
            linears[target] = CutLinear(
                compose(lin.weight, step), compose(lin.bias, step), lin.in_features, probe.shape[0],
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


def route_projections(graph: fx.Graph, linears: dict[str, CutLinear]) -> list[Projection]:
    """Compute the Linears cut from one original matmul through ``autocal.numerics.project``.

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


def eliminate_dead_code(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.op not in ("placeholder", "output") and not node.users and not target_name(node).endswith("_"):
            graph.erase_node(node)


def label_linears(graph: fx.Graph, linears: dict[str, CutLinear]) -> dict[str, str]:
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
        elif node.op == "output":  # an expert returning a tuple (output, pre-activation) reads as one
            out = node.args[0]
            return f"({', '.join(show(a) for a in out)})" if isinstance(out, (tuple, list)) else show(out)
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


def weight_applied_last(graph: fx.Graph) -> bool:
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


def _tensor_method_names() -> dict[int, str]:
    names = {}
    for name in dir(torch.Tensor):
        member = getattr(torch.Tensor, name, None)
        if callable(member):
            names.setdefault(id(member), name)
    return names


_TENSOR_METHODS = _tensor_method_names()


def tensor_methods_as_calls(graph: fx.Graph) -> None:
    """Turn ``torch.Tensor.<method>`` targets into ``call_method`` nodes, which fx prints as ``x.method(...)``."""
    for node in graph.nodes:
        if node.op == "call_function" and id(node.target) in _TENSOR_METHODS:
            node.op, node.target = "call_method", _TENSOR_METHODS[id(node.target)]


