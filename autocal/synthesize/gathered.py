"""Calibration for gathered expert weights (see ``detect/gathered.py``).

Each gathered ``[E, a, b]`` parameter gets ``E`` Linears viewing its entries
(``<name>_experts.<e>`` beside it; the parameter itself stays reachable by the
forward under its name but is no longer listed twice). The block keeps its own
forward; while its Linears are plain and unobserved, nothing changes (bitwise
the original). Otherwise the forward runs under a mode that computes each
contraction of gathered weights as the Linears of the experts chosen, slot by
slot, and with calibration on the block runs again with the routing forced to
every group of ``k`` experts (``synthesize/forced.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..detect.gathered import GatheredWeight, gathered_index, slot_inputs
from ..detect.structure import MoEStructure
from .forced import ExpertViews, forced_forward
from .module import KeptForwardMoE, adopt, kept_forward_class, owned

__all__ = ["GatheredCalibrationMoE", "build_gathered_calibration"]


class GatheredCalibrationMoE(KeptForwardMoE):
    """The block, its gathered weights also as per-expert Linears; forward kept (module docstring)."""

    def __init__(self, original: nn.Module, config=None, calibrate_all_experts: bool = True) -> None:
        adopt(self, original)
        for weight in self.structure.tokens.weights:
            owner_path, _, name = weight.param.rpartition(".")
            owner = owned(self, original, owner_path)
            param = owner._parameters.pop(name)
            owner.__dict__[name] = param  # the forward still gathers from it
            owner._modules[f"{name}_experts"] = ExpertViews(param, weight.orientation)
        self.calibrate_all_experts = calibrate_all_experts

    def _views(self) -> list[tuple[ExpertViews, GatheredWeight]]:
        found = []
        for weight in self.structure.tokens.weights:
            owner_path, _, name = weight.param.rpartition(".")
            found.append((self.get_submodule(f"{owner_path}.{name}_experts" if owner_path else f"{name}_experts"),
                          weight))
        return found

    @property
    def experts_container(self) -> nn.Module:
        return self._views()[0][0]

    def forward(self, *args, **kwargs):
        views = self._views()
        plain = all(v.plain() and not v.hooked() for v, _ in views)
        if not self.calibrate_all_experts and plain:
            return self._block_forward(*args, **kwargs)
        by_weight = {id(_gathered_from(self, w)): (v, w) for v, w in views}
        if not self.calibrate_all_experts:
            with _Dispatch(by_weight):
                return self._block_forward(*args, **kwargs)
        return forced_forward(self, self.structure.tokens.choice, [v for v, _ in views], args, kwargs,
                              run=lambda: _Dispatch(by_weight))


def _gathered_from(module: nn.Module, weight: GatheredWeight) -> torch.Tensor:
    owner_path, _, name = weight.param.rpartition(".")
    return module.get_submodule(owner_path).__dict__[name]


class _Dispatch(TorchFunctionMode):
    """Contractions of gathered expert weights computed by the chosen experts' Linears."""

    def __init__(self, weights: dict[int, tuple[ExpertViews, GatheredWeight]]) -> None:
        super().__init__()
        self.weights = weights
        self.gathered: dict[int, tuple[torch.Tensor, ExpertViews, GatheredWeight, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = gathered_index(func, args)
        if found is not None and id(found[0]) in self.weights:
            out = func(*args, **kwargs)
            views, weight = self.weights[id(found[0])]
            if not (views.plain() and views.__dict__.get("observed") == set()):  # quiet and plain: the op itself
                self.gathered[id(out)] = (out, views, weight, found[1])
            return out
        operands = [a for a in _flat(args) if isinstance(a, torch.Tensor)]
        hits = [a for a in operands if id(a) in self.gathered]
        if len(hits) == 1 and len(operands) == 2 and func is self.gathered[id(hits[0])][2].contraction:
            gathered, views, weight, index = self.gathered.pop(id(hits[0]))
            features = operands[1] if operands[0] is hits[0] else operands[0]
            inputs = slot_inputs(weight.orientation, features, index.shape, gathered.shape[-1])
            out = _by_expert(views, inputs, index)
            if weight.orientation == "slot-sum":
                out = out.sum(-2)
            return out.reshape(_shape_of(func, args, kwargs))
        return func(*args, **kwargs)


def _shape_of(func, args: tuple, kwargs: dict) -> torch.Size:
    """The shape ``func(*args, **kwargs)`` returns, computed on the meta device."""
    def meta(a):
        if isinstance(a, torch.Tensor):
            return torch.empty_like(a, device="meta")
        return type(a)(meta(i) for i in a) if isinstance(a, (list, tuple)) else a
    return func(*meta(args), **{k: meta(v) for k, v in kwargs.items()}).shape


def _flat(args: tuple) -> list[Any]:
    return [item for a in args for item in (a if isinstance(a, (list, tuple)) else (a,))]


def _by_expert(views: ExpertViews, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each slot's features through the Linear of the expert chosen there: ``[*slots, out]``."""
    flat, experts = rows.reshape(-1, rows.shape[-1]), index.reshape(-1)
    order = experts.argsort(stable=True)
    counts = torch.bincount(experts, minlength=len(views.experts())).tolist()
    parts = [views.call(e, part) for e, part in enumerate(flat[order].split(counts)) if part.shape[0]]
    out = torch.empty(flat.shape[0], parts[0].shape[-1], dtype=parts[0].dtype, device=parts[0].device)
    out[order] = torch.cat(parts)
    return out.view(*index.shape, -1)


def build_gathered_calibration(structure: MoEStructure, block: nn.Module) -> type[GatheredCalibrationMoE]:
    return kept_forward_class(GatheredCalibrationMoE, structure, block)
