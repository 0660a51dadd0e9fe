"""Concrete op recording: run a module once and capture every torch call as an fx graph.

Symbolic tracing cannot follow the data-dependent expert loops of MoE blocks
(``nonzero``, ``for idx in expert_hit``, ``if x.numel() == 0``). Running the
block on example inputs under a ``TorchFunctionMode`` sees every torch call
with its real arguments, whatever the Python control flow. Each call becomes a
``call_function`` node whose tensor arguments point at the nodes that produced
them (tensor provenance), so passes can follow data flow exactly as in a traced
graph. The graph is a record of one run: loops are unrolled and Python numbers
are baked in, so it is analysed, never replayed as the block's new forward.

Every node carries in ``node.meta``:

- ``"value"``: the concrete value the call returned (tensors are kept),
- ``"source"``: ``file:line`` of the user code that made the call,
- ``"module_path"``: the innermost submodule whose forward was running.

Calls inside *leaf* modules are not recorded; the leaf call becomes one
``call_module`` node instead.
"""

from __future__ import annotations

import inspect
import operator
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .decompose import decomposition
from .inputs import keyword_arguments

__all__ = ["Recording", "record", "value", "flat_args"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_AUTOCAL_DIR = os.path.dirname(os.path.dirname(__file__))
_USER_DIRS = (os.path.join(_AUTOCAL_DIR, "testing"),)


@dataclass
class Recording:
    """The graph of one concrete run of ``root`` and what it returned; ``nested``: the recordings of the leaves
    recorded inside too, by path (``record(..., nested=...)``)."""

    graph: fx.Graph
    root: nn.Module
    inputs: dict[str, fx.Node]
    output: Any
    nested: dict[str, "Recording"] = field(default_factory=dict)


def _user_source() -> str | None:
    """``file:line`` of the innermost frame outside torch and autocal."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        internal = filename.startswith((_TORCH_DIR, _AUTOCAL_DIR)) and not filename.startswith(_USER_DIRS)
        if not internal and not filename.startswith("<"):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        super().__init__()
        self.graph = graph
        self.env: dict[int, fx.Node] = {}
        self.keepalive: list[Any] = []
        self.module_stack: list[str] = [""]
        self.leaf_depth = 0
        self.inner: _Recorder | None = None  # recording a nested leaf's call: its ops go there
        self.nested: dict[str, Recording] = {}
        self._names = {id(t): name for name, t in root.named_parameters(remove_duplicate=False)}
        self._names.update({id(t): name for name, t in root.named_buffers(remove_duplicate=False)})

    # -- provenance -------------------------------------------------------
    def bind(self, value: Any, node: fx.Node) -> None:
        node.meta["value"] = value
        if isinstance(value, torch.Tensor):
            self.env[id(value)] = node
            self.keepalive.append(value)

    def keep_value(self, tensor: torch.Tensor) -> None:
        """Before an op writes into ``tensor``: the node that computed it keeps a copy of what it returned (passes
        compare recorded values: ``t = einsum(...); t += bias`` must not change the einsum's). Written-into
        buffers (``torch.zeros`` …) and the results of earlier writes keep the tensor itself: one copy per value
        at most, whatever a loop writes."""
        node = self.env.get(id(tensor))
        if node is None or node.op != "call_function" or node.meta.get("kept") or node.meta.get("written"):
            return
        if getattr(node.target, "__name__", "") in _FRESH:
            return
        node.meta["value"] = tensor.detach().clone()
        node.meta["kept"] = True

    def node_for(self, tensor: torch.Tensor) -> fx.Node:
        node = self.env.get(id(tensor))
        if node is not None:
            return node
        name = self._names.get(id(tensor))
        if name is not None:
            node = self.graph.get_attr(name)
        else:  # a tensor made outside the record (a constant, or a Python-side cache)
            node = self.graph.create_node("get_attr", f"_autocal_const_{len(self.keepalive)}")
            node.meta["constant"] = True
        self.bind(tensor, node)
        return node

    def map_args(self, args: Any) -> Any:
        """``args`` with each tensor in it replaced by its node; plain tuples, lists and dicts walked here (most
        calls' arguments: a hot path), any other container by pytree."""
        if isinstance(args, torch.Tensor):
            return self.node_for(args)
        if type(args) in (tuple, list):
            return type(args)(self.map_args(a) for a in args)
        if type(args) is dict:
            return {k: self.map_args(v) for k, v in args.items()}
        if isinstance(args, _SCALARS):
            return args
        return tree_map(lambda a: self.node_for(a) if isinstance(a, torch.Tensor) else a, args)

    # -- recording --------------------------------------------------------
    def emit(self, op: str, target: Any, args: tuple, kwargs: dict, out: Any) -> fx.Node:
        node = self.graph.create_node(op, target, self.map_args(args), self.map_args(kwargs))
        node.meta["source"] = _user_source()
        node.meta["module_path"] = self.module_stack[-1]
        mutated = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if out is None and mutated is not None:
            node.meta["mutates"] = self.env.get(id(mutated))
        if mutated is not None and out is mutated:
            node.meta["written"] = True  # an in-place op's result: the tensor it wrote into
        self.bind(out, node)
        if isinstance(out, (tuple, list)):
            for i, item in enumerate(out):
                if isinstance(item, torch.Tensor):
                    getitem = self.graph.call_function(operator.getitem, (node, i))
                    getitem.meta.update(source=node.meta["source"], module_path=node.meta["module_path"])
                    self.bind(item, getitem)
        return node

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.inner is not None:
            return self.inner.__torch_function__(func, types, args, kwargs)
        kwargs = kwargs or {}
        decomposed = decomposition(func, args, kwargs) if self.leaf_depth == 0 else None
        if decomposed is not None:  # recorded as the plain ops it stands for (``trace/decompose.py``)
            with self:
                return decomposed()
        if self.leaf_depth == 0 and _in_place(func, args, kwargs):
            self.keep_value(args[0])
        out = func(*args, **kwargs)
        if self.leaf_depth == 0 and _has_tensor(out):
            self.emit("call_function", func, args, kwargs, out)
        elif self.leaf_depth == 0 and func is torch.Tensor.__setitem__:
            self.emit("call_function", func, args, kwargs, out)
        return out


_FRESH = frozenset({"zeros", "zeros_like", "empty", "empty_like", "full", "full_like", "ones", "ones_like",
                    "new_zeros", "new_empty", "new_full", "new_ones"})  # buffers made to be written into
_WRITES = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__ipow__",
                     "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"})


def _in_place(func: Any, args: tuple, kwargs: dict) -> bool:
    """Does ``func`` write into its first argument (``add_``, ``+=``, ``t[i] = v``)?"""
    if not args or not isinstance(args[0], torch.Tensor):
        return False
    name = getattr(func, "__name__", "")
    return name in _WRITES or (name.endswith("_") and not name.startswith("_"))


_SCALARS = (int, float, bool, str, type(None), slice, torch.dtype, torch.device)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    leaves, _ = tree_flatten(value)
    return any(isinstance(leaf, torch.Tensor) for leaf in leaves)


def record(
    root: nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    leaves: Iterable[nn.Module] = (),
    nested: Iterable[nn.Module] = (),
) -> Recording:
    """Run ``root(*args, **kwargs)`` once and return what it did as an fx graph.

    Args:
        root: the module to run (its parameters and buffers become ``get_attr`` nodes).
        args, kwargs: the example inputs; tensors among them become placeholders.
        leaves: submodules recorded as one ``call_module`` node each.
        nested: leaves whose first call is recorded too, as ``record(leaf, <that call's inputs>)`` would
            record it, without running the leaf a second time (``Recording.nested``, by the leaf's path).

    Example:
        >>> rec = record(torch.nn.Linear(2, 3), (torch.randn(4, 2),))
        >>> [n.op for n in rec.graph.nodes][-1]
        'output'
    """
    recorder, inputs = _started(root, args, kwargs or {})
    leaf_ids = {id(m) for m in leaves}
    handles = _hooks(recorder, root, leaf_ids, {id(m) for m in nested})
    try:
        with recorder:
            output = root(*args, **(kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
    return _finished(recorder, root, inputs, output)


def _started(root: nn.Module, args: tuple, kwargs: dict) -> tuple[_Recorder, dict[str, fx.Node]]:
    """A recorder for a run of ``root``, its inputs bound to placeholders."""
    recorder = _Recorder(fx.Graph(), root)
    inputs: dict[str, fx.Node] = {}
    for name, value in _named_inputs(root, args, kwargs).items():
        if isinstance(value, torch.Tensor):
            inputs[name] = recorder.graph.placeholder(name)
            recorder.bind(value, inputs[name])
    return recorder, inputs


def _finished(recorder: _Recorder, root: nn.Module, inputs: dict[str, fx.Node], output: Any) -> Recording:
    recorder.graph.output(recorder.map_args(output))
    return Recording(recorder.graph, root, inputs, output, recorder.nested)


def _hooks(recorder: _Recorder, root: nn.Module, leaf_ids: set[int], nested_ids: set[int] = frozenset()) -> list:
    """Hooks on ``root``'s submodules that keep ``recorder``'s module stack and leaf depth, and record the
    first call of each module in ``nested_ids`` on a recorder of its own."""
    paths = {id(m): p for p, m in root.named_modules(remove_duplicate=False)}
    handles = []
    for module in root.modules():
        if module is root:
            continue
        handles.append(module.register_forward_pre_hook(_pre_hook(recorder, paths, leaf_ids), with_kwargs=True))
        handles.append(module.register_forward_hook(_post_hook(recorder, paths, leaf_ids), with_kwargs=True))
        if id(module) in nested_ids:
            handles += _nesting_hooks(recorder, module, paths[id(module)], handles)
    return handles


def _nesting_hooks(recorder: _Recorder, leaf: nn.Module, path: str, handles: list) -> list:
    """Hooks that record ``leaf``'s first call on an inner recorder, ``recorder`` passing it every op meanwhile.
    The inner recorder's hooks join ``handles`` too, so a run that raises inside the leaf leaves none behind."""
    inner_handles: list = []
    inner_inputs: dict[str, fx.Node] = {}

    def start(module, args, kwargs):  # after the leaf's own pre-hook: its depth is 1 on its outermost call
        if recorder.leaf_depth == 1 and recorder.inner is None and path not in recorder.nested:
            recorder.inner, inputs = _started(leaf, args, kwargs)
            inner_inputs.update(inputs)
            inner_handles[:] = _hooks(recorder.inner, leaf, set())
            handles.extend(inner_handles)

    def finish(module, args, kwargs, output):  # before the leaf's own post-hook, which records the call
        if recorder.inner is not None and recorder.leaf_depth == 1:
            for handle in inner_handles:
                handle.remove()
            inner, recorder.inner = recorder.inner, None
            recorder.nested[path] = _finished(inner, leaf, inner_inputs, output)

    return [leaf.register_forward_pre_hook(start, with_kwargs=True),
            leaf.register_forward_hook(finish, with_kwargs=True, prepend=True)]


def _named_inputs(root: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The inputs by the names a replay binds them by (``trace.inputs.keyword_arguments``): positional ones by
    their parameter's name, or ``arg0``, ``arg1``... where the forward's signature does not take them."""
    try:
        return keyword_arguments(inspect.signature(root.forward), args, kwargs)
    except (TypeError, ValueError):
        return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}


def _pre_hook(recorder: _Recorder, paths: dict[int, str], leaf_ids: set[int]):
    def hook(module, args, kwargs):
        path = paths.get(id(module), "")
        if recorder.leaf_depth == 0 and id(module) in leaf_ids:
            module._autocal_leaf_call = (args, kwargs)
        if id(module) in leaf_ids:
            recorder.leaf_depth += 1
        recorder.module_stack.append(path)

    return hook


def _post_hook(recorder: _Recorder, paths: dict[int, str], leaf_ids: set[int]):
    def hook(module, args, kwargs, output):
        recorder.module_stack.pop()
        if id(module) in leaf_ids:
            recorder.leaf_depth -= 1
            if recorder.leaf_depth == 0:
                call_args, call_kwargs = _positional(module, *module.__dict__.pop("_autocal_leaf_call"))
                recorder.emit("call_module", paths.get(id(module), ""), call_args, call_kwargs, output)

    return hook


def _positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A leaf call's arguments with those given by keyword for positional parameters moved into place: passes read
    an expert's input as its first argument, also where the block wrote ``expert(hidden_states=rows)``."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):  # no signature to bind to: the call as made
        return args, kwargs
    return bound.args, bound.kwargs


def value(node: Any) -> Any:
    """The recorded value of a node (an argument that is not a node is its own value)."""
    return node.meta.get("value") if isinstance(node, fx.Node) else node


def flat_args(args: tuple) -> list[Any]:
    """An op's arguments, with those passed as one list or tuple (``einsum(eq, [a, b])``) spread out."""
    return [item for a in args for item in (a if isinstance(a, (list, tuple)) else (a,))]
