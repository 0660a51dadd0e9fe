"""Small helpers over recorded graphs: names of targets, ancestry, tensor arguments.

``value`` and ``flat_args`` come from ``trace/record.py``: the calibration forward uses them too.
"""

from __future__ import annotations

import inspect
import os
import re
from typing import Any

import torch
from torch import fx

from ..trace.record import flat_args, value

_TORCH_DIR = os.path.dirname(torch.__file__)

CONTRACTIONS = ("einsum", "matmul", "__matmul__", "mm", "bmm")  # ops that contract two tensors (``F.linear``: one is 2-D)

__all__ = ["CONTRACTIONS", "flat_args", "bound_inputs", "source_of", "target_name", "tensor_inputs", "holds_tensor",
           "Ancestry", "is_int_tensor", "read_on_host", "returns_of", "value", "viewed_chain", "viewed_from"]


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
    """Ancestor sets of every node of one graph, as bitmasks (graphs are topologically ordered).

    A write into a tensor that returns nothing (``buffer[rows] = expert(x)``, recorded with ``meta["mutates"]``)
    is an ancestor of every later reader of that tensor, and of the tensors it is a view of: the recording's
    edges lead those readers to the tensor as it was made, not as written.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.nodes = list(graph.nodes)
        self._index = {n: i for i, n in enumerate(self.nodes)}
        self._mask: dict[fx.Node, int] = {}
        written: dict[fx.Node, int] = {}  # a tensor's node -> the writes into it so far, with their ancestors
        for node in self.nodes:
            mask = 0
            mutated = node.meta.get("mutates")
            for parent in [*node.all_input_nodes, *([mutated] if mutated is not None else [])]:
                mask |= self._mask[parent] | (1 << self._index[parent]) | written.get(parent, 0)
            self._mask[node] = mask
            for target in viewed_chain(mutated, _VIEWS):  # the tensor written and those it views
                written[target] = written.get(target, 0) | mask | (1 << self._index[node])

    def is_ancestor(self, ancestor: fx.Node, node: fx.Node) -> bool:
        return bool(self._mask[node] >> self._index[ancestor] & 1)

    def of(self, node: fx.Node) -> list[fx.Node]:
        mask = self._mask[node]
        return [n for i, n in enumerate(self.nodes) if mask >> i & 1]

    def between(self, start: fx.Node, end: fx.Node) -> list[fx.Node]:
        """Nodes on some path from ``start`` to ``end`` (both included), in graph order."""
        return [n for n in self.of(end) + [end] if n is start or self.is_ancestor(start, n)]


def viewed_chain(node: fx.Node | None, ops: set[str]) -> list[fx.Node]:
    """``node`` and the tensors it is made from through ``ops`` of one tensor input (views, casts), nearest first."""
    chain = []
    while isinstance(node, fx.Node):
        chain.append(node)
        inputs = [n for n in node.all_input_nodes if isinstance(value(n), torch.Tensor)]
        node = inputs[0] if node.op != "get_attr" and target_name(node) in ops and len(inputs) == 1 else None
    return chain


def returns_of(output: Any) -> str:
    """What a block returns, as the report says it: ``tensor``, ``tuple of 2``, or the type's name."""
    if isinstance(output, torch.Tensor):
        return "tensor"
    if isinstance(output, (tuple, list)):
        return f"tuple of {len(output)}"
    return type(output).__name__



def viewed_from(node: fx.Node, known: Any) -> fx.Node | None:
    """The node of ``known`` that ``node`` is, or is a view of (ops of one tensor keeping its element count:
    ``b[idx].unsqueeze(1)``), or None."""
    while node not in known and len(node.all_input_nodes) == 1 and isinstance(value(node), torch.Tensor) \
            and isinstance(value(node.all_input_nodes[0]), torch.Tensor) \
            and value(node).numel() == value(node.all_input_nodes[0]).numel():
        node = node.all_input_nodes[0]
    return node if node in known else None


_PARTS = {"getitem", "__getitem__", "select", "view", "reshape", "squeeze", "flatten", "contiguous", "to", "cpu"}
_VIEWS = _PARTS | {"narrow", "unsqueeze", "unflatten", "permute", "transpose", "t", "view_as"}  # may return a view


def read_on_host(node: fx.Node) -> bool:
    """Does a part of ``node``'s tensor (an element, a row, a view) end the recording unused: read by Python
    (``int(ids[t, j])``), which the recording does not see?"""
    frontier = [node]
    while frontier:
        part = frontier.pop()
        if part is not node and not part.users:
            return True
        frontier += [u for u in part.users if target_name(u) in _PARTS]
    return False
