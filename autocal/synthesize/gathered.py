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
no all-zero row: padding, as in a decomposed grouped matmul. A list of one
weight per expert (``detect/listed.py``) is replaced by its Linears
(``ListedViews``), which the block's code still indexes as the list.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from ..detect.contracted import expert_slices
from ..detect.gathered_plan import GatheredWeight
from ..detect.storage import parameter_list
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
            owner, name = _owner(self, original, weight.param)
            entries = parameter_list(owner._modules[name]) if name in owner._modules else None
            if entries is not None:  # a list of one weight per expert: its Linears take its place
                owner._modules[name] = ListedViews(entries, weight.orientation, _listed_bias(self, original, weight))
                continue
            bias = _unlisted(self, original, weight.bias) if weight.bias else None
            param = _unlisted(self, original, weight.param)
            viewed = param.view(weight.shape) if weight.shape else param
            owner._modules[f"{name}_experts"] = ExpertViews(viewed, weight.orientation, bias)
        self.calibrate_all_experts = calibrate_all_experts

    def _linears(self, weight: GatheredWeight) -> ExpertViews:
        """The Linears of one gathered weight: beside its parameter, or in place of its list."""
        owner_path, _, name = weight.param.rpartition(".")
        owner = self.get_submodule(owner_path)
        listed = owner._modules.get(name)
        return listed if isinstance(listed, ListedViews) else owner._modules[f"{name}_experts"]

    def _views(self) -> tuple[dict[int, tuple[ExpertViews, GatheredWeight] | str], dict[int, tuple]]:
        """By the identity of each gathered parameter: its Linears and how it is gathered (``BIAS`` for a bias
        its weight's Linears hold); and by the identity of each entry of a listed weight, those and its expert."""
        found, entries = {}, {}
        for weight in self.plan.dispatch.weights:
            views = self._linears(weight)
            if isinstance(views, ListedViews):
                entries |= {id(entry): ((views, weight), e) for e, entry in enumerate(views)}
                biases = self.get_submodule(weight.bias) if weight.bias else ()
                entries |= {id(entry): (BIAS, e) for e, entry in enumerate(biases)}
                continue
            owner_path, _, name = weight.param.rpartition(".")
            found[id(self.get_submodule(owner_path).__dict__[name])] = (views, weight)
            if weight.bias:
                bias_owner, _, bias_name = weight.bias.rpartition(".")
                found[id(self.get_submodule(bias_owner).__dict__[bias_name])] = BIAS
        return found, entries

    def expert_parts(self) -> list[list[nn.Module]]:
        """Per expert, its Linear of each gathered weight (``expert_modules`` holds the first weight's only)."""
        views = [self._linears(weight) for weight in self.plan.dispatch.weights]
        return [list(linears) for linears in zip(*(v.experts() for v in views))]

    @property
    def experts_container(self) -> nn.Module:
        return self._linears(self.plan.dispatch.weights[0])

    def forward(self, *args, **kwargs):
        by_weight = self._views()
        views = [self._linears(weight) for weight in self.plan.dispatch.weights]
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


def _dispatch(weights: tuple[dict[int, tuple[ExpertViews, GatheredWeight] | str], dict]) -> GatherTracker:
    """A mode computing each contraction of gathered expert weights by the chosen experts' Linears (``weights``:
    ``_views()``)."""

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

    return GatherTracker(weights[0], contract, weights[1])


class _Listing:
    """The sequence of a list of parameters, kept unlisted (``_entries``): what the block's code reads."""

    def __getitem__(self, index):
        return self._entries[index if isinstance(index, slice) else operator.index(index)]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)


class ListedViews(_Listing, ExpertViews):
    """A list of one weight per expert (``nn.ParameterList``) as Linears viewing its entries, in its place (children
    ``"0"``, ``"1"``, …: checkpoint keys ``w_in.{e}.weight`` where the list's were ``w_in.{e}``), and still the list
    to the block's code: ``self.w_in[e]``, ``len`` and iteration give the original parameters, whose uses the
    calibration forward follows (``detect/listed.py``). The original list is untouched."""

    def __init__(self, entries: list[nn.Parameter], orientation: str, biases: list[nn.Parameter] | None) -> None:
        super().__init__(entries, orientation, biases)
        self.__dict__["_entries"] = list(entries)


class ListedBiases(_Listing, nn.Module):
    """A list of one bias per expert whose weights' Linears hold them (``ListedViews``): still the list to the
    block's code, listing no parameter (each is saved once, as its Linear's bias)."""

    def __init__(self, entries: list[nn.Parameter]) -> None:
        super().__init__()
        self.__dict__["_entries"] = list(entries)


def _listed_bias(module: nn.Module, original: nn.Module, weight: GatheredWeight) -> list[nn.Parameter] | None:
    """The entries of ``weight``'s list of biases, its place taken by a ``ListedBiases``; None without one."""
    if weight.bias is None:
        return None
    owner, name = _owner(module, original, weight.bias)
    entries = parameter_list(owner._modules[name])
    owner._modules[name] = ListedBiases(entries)
    return entries


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
