"""Small helpers over recorded graphs: names of targets, ancestry, tensor arguments."""

from __future__ import annotations

import inspect
import os
import re
from typing import Any

import torch
from torch import fx

from .. import errors

_TORCH_DIR = os.path.dirname(torch.__file__)

CONTRACTIONS = ("einsum", "matmul", "__matmul__", "bmm")  # ops that contract two tensors (``F.linear``: one is 2-D)

__all__ = ["CONTRACTIONS", "flat_args", "bound_inputs", "source_of", "target_name", "tensor_inputs", "holds_tensor", "Ancestry", "Replay",
           "is_int_tensor", "returns_of", "value"]


def target_name(node: fx.Node) -> str:
    """A short, readable name of what a node calls (``topk``, ``linear``, ``__getitem__``)."""
    target = node.target
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or str(target)
    return name.removeprefix("_C._nn.")


def source_of(node: fx.Node) -> str | None:
    """``file:line`` behind a node: recorded directly, or the last frame of an fx stack trace."""
    if node.meta.get("source"):
        return node.meta["source"]
    trace = node.meta.get("stack_trace") or ""
    frames = [f for f in re.findall(r'File "([^"]+)", line (\d+)', trace) if not f[0].startswith(_TORCH_DIR)]
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else None


def bound_inputs(module: Any, call: fx.Node) -> dict[str, Any]:
    """The recorded values a ``call_module`` node passed, by ``module.forward``'s parameter names."""
    args = tuple(value(a) for a in call.args)
    kwargs = {k: value(v) for k, v in call.kwargs.items()}
    return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)


def flat_args(args: tuple) -> list[Any]:
    """An op's arguments, with those passed as one list or tuple (``einsum(eq, [a, b])``) spread out."""
    return [item for a in args for item in (a if isinstance(a, (list, tuple)) else (a,))]


def value(node: Any) -> Any:
    """The recorded value of a node (an argument that is not a node is its own value)."""
    return node.meta.get("value") if isinstance(node, fx.Node) else node


def holds_tensor(node: fx.Node) -> bool:
    v = value(node)
    return isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(i, torch.Tensor) for i in v))


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs holding a tensor (or a tuple of tensors, as ``chunk`` returns)."""
    return [n for n in node.all_input_nodes if holds_tensor(n)]


def is_int_tensor(node: fx.Node) -> bool:
    v = value(node)
    return isinstance(v, torch.Tensor) and not (v.is_floating_point() or v.is_complex())


class Ancestry:
    """Ancestor sets of every node of one graph, as bitmasks (graphs are topologically ordered)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.nodes = list(graph.nodes)
        self._index = {n: i for i, n in enumerate(self.nodes)}
        self._mask: dict[fx.Node, int] = {}
        for node in self.nodes:
            mask = 0
            parents = list(node.all_input_nodes)
            if node.meta.get("mutates") is not None:
                parents.append(node.meta["mutates"])
            for parent in parents:
                mask |= self._mask[parent] | (1 << self._index[parent])
            self._mask[node] = mask

    def is_ancestor(self, ancestor: fx.Node, node: fx.Node) -> bool:
        return bool(self._mask[node] >> self._index[ancestor] & 1)

    def of(self, node: fx.Node) -> list[fx.Node]:
        mask = self._mask[node]
        return [n for i, n in enumerate(self.nodes) if mask >> i & 1]

    def between(self, start: fx.Node, end: fx.Node) -> list[fx.Node]:
        """Nodes on some path from ``start`` to ``end`` (both included), in graph order."""
        return [n for n in self.of(end) + [end] if n is start or self.is_ancestor(start, n)]


class Replay:
    """Evaluates nodes of a recorded graph again, on new inputs of the recorded module.

    ``given`` maps nodes to values used instead of computing them; ``substitute``
    maps nodes to ``(argument position, value)``, replacing one argument of that
    op. Nodes that depend on neither are kept in ``shared``, so calls on the
    same inputs (one per expert, say) compute them once.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self._varying: dict[frozenset, set[fx.Node]] = {}

    def __call__(self, node: Any, bound: dict[str, Any], shared: dict, given: dict[fx.Node, Any] | None = None,
                 substitute: dict[fx.Node, tuple[int, Any]] | None = None) -> Any:
        given, substitute = given or {}, substitute or {}
        varying = self._descendants(frozenset(given) | frozenset(substitute))
        memo = dict(given)

        def evaluate(n: fx.Node):
            cache = memo if n in varying else shared
            if n in cache:
                return cache[n]
            if n.op == "placeholder":
                result = bound[n.target]
            elif n.op == "get_attr":
                result = value(n)
            elif n.op == "call_module":
                raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"`{n.target}` is called on the way")
            else:
                args = list(fx.node.map_arg(n.args, evaluate))
                if n in substitute:
                    position, replacement = substitute[n]
                    args[position] = replacement
                result = n.target(*args, **fx.node.map_arg(n.kwargs, evaluate))
            cache[n] = result
            return result

        return evaluate(node) if isinstance(node, fx.Node) else fx.node.map_arg(node, evaluate)

    def _descendants(self, roots: frozenset) -> set[fx.Node]:
        if roots not in self._varying:
            found = set(roots)
            for node in self.graph.nodes:
                if any(a in found for a in node.all_input_nodes):
                    found.add(node)
            self._varying[roots] = found
        return self._varying[roots]


def returns_of(output: Any) -> str:
    """What a block returns, as the report says it: ``tensor``, ``tuple of 2``, or the type's name."""
    if isinstance(output, torch.Tensor):
        return "tensor"
    if isinstance(output, (tuple, list)):
        return f"tuple of {len(output)}"
    return type(output).__name__

