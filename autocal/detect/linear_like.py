"""Experts made of matmuls with their own weights, where the Linear is not ``nn.Linear``.

Tensor-parallel and inference code writes its own Linear class: a module
holding ``weight`` (and maybe ``bias``) whose forward calls ``F.linear``.
``linear_like`` recognises such a module by recording its forward: one
``linear`` of the input with the module's own ``weight`` and ``bias``, and
nothing else. ``as_linear`` gives an ``nn.Linear`` holding the same parameter
objects (no copies), so that calibration and quantizers see real ``nn.Linear``
layers and the output is bitwise the original's (both call ``F.linear``).

``made_of_linears`` is what makes a module an expert: it has ``nn.Linear`` or
Linear-like submodules, and every other parameter is its own (a gating
multiplier beside its Linears), not a norm's or another layer's.
"""

from __future__ import annotations

import torch
from torch import nn

from ..trace.record import record
from .graph_utils import target_name

__all__ = ["linear_like", "linear_modules", "made_of_linears", "as_linear", "linear_views"]


def linear_like(module: nn.Module) -> bool:
    """Is ``module`` (not an ``nn.Linear``) a leaf whose forward is ``F.linear(x, self.weight, self.bias)``?"""
    params = dict(module.named_parameters())
    weight = params.get("weight")
    if isinstance(module, nn.Linear) or next(module.children(), None) is not None or weight is None:
        return False
    bias = params.get("bias")
    if weight.dim() != 2 or set(params) - {"weight", "bias"} or (bias is not None and bias.shape != weight.shape[:1]):
        return False
    x = torch.zeros(2, weight.shape[1], dtype=weight.dtype, device=weight.device)
    try:
        with torch.no_grad():
            rec = record(module, (x,))
    except Exception:  # a forward that does not take one [rows, in] input is no Linear
        return False
    calls = [n for n in rec.graph.nodes if n.op == "call_function"]
    if len(calls) != 1 or target_name(calls[0]) != "linear" or rec.graph.output_node().args[0] is not calls[0]:
        return False
    _, *operands = [getattr(a, "target", a) for a in (*calls[0].args, *calls[0].kwargs.values())]
    expected = [["weight", "bias"]] if bias is not None else [["weight"], ["weight", None]]
    return calls[0].args[0].op == "placeholder" and operands in expected


def linear_modules(module: nn.Module) -> list[str]:
    """Paths (in ``module``) of its ``nn.Linear`` and Linear-like submodules."""
    return [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear) or linear_like(sub)]


def made_of_linears(module: nn.Module) -> bool:
    """Does ``module`` hold Linear(-like) submodules, and beside them only parameters of its own (no norm or other
    layer: a list of decoder layers is no list of experts)?"""
    paths = linear_modules(module)
    owned = {id(p) for path in paths for p in module.get_submodule(path).parameters()}
    owned |= {id(p) for p in module.parameters(recurse=False)}
    return bool(paths) and all(id(p) in owned for p in module.parameters())


def linear_views(container: nn.Module, entries: list[nn.Module]) -> list[str]:
    """Paths (in ``container``) of the entries' Linear-like submodules, each to be seen as an ``nn.Linear``."""
    names = {id(m): n for n, m in container.named_modules()}
    inner = [path for path in linear_modules(entries[0]) if not isinstance(entries[0].get_submodule(path), nn.Linear)]
    return [f"{names[id(entry)]}.{path}".strip(".") for entry in entries for path in inner]


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding ``module``'s own weight and bias (the same parameter objects)."""
    weight = module.weight
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = weight
    linear.register_parameter("bias", module.bias)
    return linear
