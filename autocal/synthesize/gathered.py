"""Calibration for gathered expert weights (see ``detect/gathered.py``).

Each gathered ``[E, a, b]`` parameter gets ``E`` Linears viewing its entries
(``<name>_experts.<e>`` beside it; the parameter itself stays reachable by the
forward under its name but is no longer listed twice). The block keeps its own
forward; while its Linears are plain and unobserved, nothing changes (bitwise
the original). Otherwise the forward runs under a mode that computes each
contraction of gathered weights as the Linears of the experts chosen, slot by
slot, and with calibration on the block runs again with the routing forced to
every group of ``k`` experts (``synthesize/forced.py``). Parameters contracted
whole with every token (``detect/contracted.py``) are computed by every
expert's Linear on all of its features; calibration needs no re-run. Where
those features are tokens dispatched into capacity slots
(``detect/dispatched.py``), calibration calls the experts module with every
token in every expert's slots, and gives each slot its token's output; where
the block contracts its own weights with rows it copies tokens into, or an
experts module zeroes the rows of unrouted tokens (``detect/inline.py``), it
does the same between the first and last contraction (``trace/rows.py``).
Segment loops (``F.linear(buffer[start:end], w[e])``) give a bias-free Linear
no all-zero row: padding, as in a decomposed grouped matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from ..detect.contracted import expert_slices
from ..detect.gathered_plan import GatheredWeight
from ..trace.decompose import not_padding
from ..trace.gathers import BIAS, GatherTracker, slot_inputs
from ..detect.plans import GatheredPlan
from .forced import ExpertViews, forced_forward
from ..trace.rows import every_token_in_every_row
from .dispatched import every_token_in_every_slot
from .module import KeptForwardMoE, adopt, kept_forward_class, owned

__all__ = ["GatheredCalibrationMoE", "build_gathered_calibration"]


class GatheredCalibrationMoE(KeptForwardMoE):
    """The block, its gathered weights also as per-expert Linears; forward kept (module docstring)."""

    def __init__(self, original: nn.Module, config=None, calibrate_all_experts: bool = True) -> None:
        adopt(self, original)
        for weight in self.plan.dispatch.weights:
            bias = _unlisted(self, original, weight.bias) if weight.bias else None
            owner, name = _owner(self, original, weight.param)
            param = _unlisted(self, original, weight.param)
            viewed = param.view(weight.shape) if weight.shape else param
            owner._modules[f"{name}_experts"] = ExpertViews(viewed, weight.orientation, bias)
        self.calibrate_all_experts = calibrate_all_experts

    def _views(self) -> dict[int, tuple[ExpertViews, GatheredWeight] | str]:
        """By the identity of each gathered parameter: its Linears and how it is gathered (``BIAS`` for a bias
        its weight's Linears hold)."""
        found = {}
        for weight in self.plan.dispatch.weights:
            owner_path, _, name = weight.param.rpartition(".")
            owner = self.get_submodule(owner_path)
            found[id(owner.__dict__[name])] = (owner._modules[f"{name}_experts"], weight)
            if weight.bias:
                bias_owner, _, bias_name = weight.bias.rpartition(".")
                found[id(self.get_submodule(bias_owner).__dict__[bias_name])] = BIAS
        return found

    def expert_parts(self) -> list[list[nn.Module]]:
        """Per expert, its Linear of each gathered weight (``expert_modules`` holds the first weight's only)."""
        views = [found[0] for found in self._views().values() if found != BIAS]
        return [list(linears) for linears in zip(*(v.experts() for v in views))]

    @property
    def experts_container(self) -> nn.Module:
        return next(found for found in self._views().values() if found != BIAS)[0]

    def forward(self, *args, **kwargs):
        by_weight = self._views()
        views = [found[0] for found in by_weight.values() if found != BIAS]
        if not self.calibrate_all_experts and all(v.plain() and not v.hooked() for v in views):
            return self._block_forward(*args, **kwargs)
        slots = self.plan.dispatch.slots
        if self.calibrate_all_experts and slots is not None:  # the experts module on every token in every slot
            with _dispatch(by_weight), every_token_in_every_slot(self.get_submodule(slots.experts), slots):
                return self._block_forward(*args, **kwargs)
        rows = self.plan.dispatch.rows
        if self.calibrate_all_experts and rows is not None:  # the block's own contractions on every token
            with _dispatch(by_weight), every_token_in_every_row(rows, args, kwargs):
                return self._block_forward(*args, **kwargs)
        if not self.calibrate_all_experts or self.plan.dispatch.choice is None:  # None: experts see every token
            with _dispatch(by_weight):
                return self._block_forward(*args, **kwargs)
        return forced_forward(self, self.plan.dispatch.choice, views, args, kwargs,
                              run=lambda: _dispatch(by_weight))


def _dispatch(weights: dict[int, tuple[ExpertViews, GatheredWeight] | str]) -> GatherTracker:
    """A mode computing each contraction of gathered expert weights by the chosen experts' Linears."""

    def contract(key, index, features, func, args, kwargs):
        views, weight = key
        if func not in weight.contractions or (views.plain() and views.__dict__.get("observed") == set()):
            return None  # quiet and plain: the op itself, bitwise
        if index is None:  # the parameter contracted whole: every expert on every token
            return None if weight.expert_axis is None else _every_expert(views, weight, features, func, args, kwargs)
        if isinstance(index, int):  # one expert's slice, in the block's loop over the experts
            out = _without_padding(views, index, features.reshape(-1, features.shape[-1]))
        else:
            out = _by_expert(views, slot_inputs(weight.orientation, features, index.shape, _width(views, weight)),
                             index)
            out = out.sum(-2) if weight.orientation == "slot-sum" else out
        return out.reshape(_shape_of(func, args, kwargs))

    return GatherTracker(weights, contract)


def _without_padding(views: ExpertViews, expert: int, rows: torch.Tensor) -> torch.Tensor:
    """Expert ``expert``'s Linear on ``rows``, its all-zero rows left out where it has no bias (a zero row then gives
    a zero row): the padding a loop over expert segments hands each expert, left out as a decomposed grouped
    matmul leaves it out (``trace/decompose.not_padding`` says why)."""
    linear = views.experts()[expert]
    kept = not_padding(rows) if linear.bias is None else None
    if kept is None or kept.numel() == rows.shape[0]:
        return views.call(expert, rows)
    out = rows.new_zeros(rows.shape[0], linear.out_features)
    if kept.numel():
        part = views.call(expert, rows[kept])
        out = out.to(part.dtype)
        out[kept] = part
    return out


def _owner(module: nn.Module, original: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner_path, _, name = path.rpartition(".")
    return owned(module, original, owner_path), name


def _unlisted(module: nn.Module, original: nn.Module, path: str) -> nn.Parameter:
    """The parameter at ``path``, no longer listed (its experts' Linears list it) but still reachable by the
    forward under its name."""
    owner, name = _owner(module, original, path)
    param = owner._parameters.pop(name)
    owner.__dict__[name] = param
    return param


def _width(views: ExpertViews, weight: GatheredWeight) -> int:
    """The length of one expert's gathered vector (tables) or its input features."""
    linear = views.experts()[0]
    return linear.out_features if weight.orientation == "slot-sum" else linear.in_features


def _shape_of(func, args: tuple, kwargs: dict) -> torch.Size:
    """The shape ``func(*args, **kwargs)`` returns, computed on the meta device."""
    def meta(a):
        if isinstance(a, torch.Tensor):
            return torch.empty_like(a, device="meta")
        return type(a)(meta(i) for i in a) if isinstance(a, (list, tuple)) else a
    return func(*meta(args), **{k: meta(v) for k, v in kwargs.items()}).shape


def _every_expert(views: ExpertViews, weight: GatheredWeight, features: torch.Tensor, func, args: tuple,
                  kwargs: dict) -> torch.Tensor:
    """A whole parameter's contraction computed by each expert's Linear on all of its features, the outputs
    stacked along the expert dimension detection found."""
    shape = _shape_of(func, args, kwargs)
    slices = expert_slices(features, len(shape), weight.expert_axis, len(views.experts()))
    outs = [views.call(e, f.reshape(-1, f.shape[-1])).reshape(*f.shape[:-1], -1) for e, f in enumerate(slices)]
    return torch.stack(outs, weight.expert_axis).reshape(shape)


def _by_expert(views: ExpertViews, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each slot's features through the Linear of the expert chosen there: ``[*slots, out]``."""
    flat, experts = rows.reshape(-1, rows.shape[-1]), index.reshape(-1)
    order = experts.argsort(stable=True)
    counts = torch.bincount(experts, minlength=len(views.experts())).tolist()
    parts = [views.call(e, part) for e, part in enumerate(flat[order].split(counts)) if part.shape[0]]
    out = torch.empty(flat.shape[0], parts[0].shape[-1], dtype=parts[0].dtype, device=parts[0].device)
    out[order] = torch.cat(parts)
    return out.view(*index.shape, -1)


def build_gathered_calibration(plan: GatheredPlan, block: nn.Module) -> type[GatheredCalibrationMoE]:
    return kept_forward_class(GatheredCalibrationMoE, plan, block)
