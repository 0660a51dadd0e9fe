"""The experts container that replaces a packed one, and its dispatch.

Each expert is a module of ``nn.Linear`` views (``synthesize/unpack.py``) whose
forward is the code fx generates from the detected template, e.g.::

    def forward(self, x, routing_weight):
        gate_proj = self.gate_proj(x)
        silu = torch.nn.functional.silu(gate_proj, inplace = False)
        up_proj = self.up_proj(x)
        ...

One class is generated per analysed block class and shared by all its experts.

The container dispatches exactly as the experts contract of transformers v5
states (``sum over slots of weight * expert(hidden)``, experts in ascending
order, each expert's rows in slot-major order, scattered with ``index_add_``),
so with calibration off it computes what the original computed. With
calibration on, each expert *also* runs on the tokens it was not routed; those
outputs are discarded (the complement strategy), so every expert Linear sees
every token exactly once and the output is bitwise the same as with
calibration off.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from ..coverage import _COUNTER
from ..detect.structure import MoEStructure
from ..trace.hf import eager_experts
from .grouped import GroupedTemplate
from .slots import RoutedSlots, group_firsts, routed_rows
from .unpack import SynthesizedExpert, UnpackedExperts

# How many experts run in one group (see grouped.py). Grouping saves the host the element-wise launches of
# each expert and costs the device one copy of each Linear's outputs into the group's stack. On a GPU an
# expert whose Linears do more than GROUP_WORK multiply-adds on all tokens keeps the device busy for longer
# than the host takes to launch it, so it runs on its own (nothing stacked); smaller experts run together,
# within GROUP_ELEMENTS elements per stacked activation (GPU, CPU; two groups' outputs are alive at a time).
# On CPU the budget is small enough to stay in cache.
GROUP_ELEMENTS = {False: 1 << 27, True: 1 << 18}
GROUP_WORK = 1 << 35
# Experts that run alone are combined several at a time: their outputs, up to COMBINE_ELEMENTS elements, are
# stacked (one copy) and weighted and added by one gather, product and index_add_, not three launches each.
# On CPU a launch costs less than the copy, so each is combined on its own.
COMBINE_ELEMENTS = {False: 1 << 24, True: 0}

__all__ = ["CalibrationExperts"]


class CalibrationExperts(UnpackedExperts):
    """Replaces a packed experts container: one child module per expert, named ``"0"``, ``"1"``, …

    Called exactly like the container it replaces.
    """

    def __init__(self, original: nn.Module, structure: MoEStructure, expert_cls: type[SynthesizedExpert],
                 calibrate_all_experts: bool = True) -> None:
        super().__init__(original, structure, expert_cls, calibrate_all_experts)
        self.roles = dict(structure.experts.call_roles)
        self.uses_routing_weight = structure.template.uses_routing_weight
        self.dense_calibration = structure.template.weight_applied_last
        self.calibration_chunk_size: int | None = None
        self.group_experts = True  # False: each expert module called on its own (``convert(group_experts=...)``)
        self.output_features = structure.experts.output_features
        self.accumulate_dtype = _dtype(structure.experts.accumulate_dtype)
        self.output_dtype = _dtype(structure.experts.output_dtype)
        self._signature = inspect.signature(original.forward)
        self._positions = _positions(self._signature, [self.roles[r] for r in _ROLES])
        self.counts_tokens = True  # _call counts rows for autocal.coverage; no hook needed
        # Router choices past the packed experts (weightless "zero experts") run through the original container.
        self.num_choices = max(structure.router.num_choices, self.num_experts)
        self.token_major = structure.experts.layout.get("rows") == "token-major"  # each expert's rows' order
        self.sum_over_slots = structure.experts.layout.get("combine") == "sum over slots"  # how routes are added
        self.__dict__["_packed_container"] = original
        self._grouped = GroupedTemplate(structure.template.graph)
        self._widest = max([p.features for p in structure.template.projections]
                           + [r.out_features for r in structure.template.linears])
        self._work_per_token = sum(r.in_features * r.out_features for r in structure.template.linears)
        # The grouping budgets, per container so that a check can run each path (keys: on_cpu; see above).
        self.group_elements, self.combine_elements = dict(GROUP_ELEMENTS), dict(COMBINE_ELEMENTS)
        self.group_work = GROUP_WORK
        self._span_firsts: dict[tuple, torch.Tensor] = {}
        self._wrapped_forwards: dict[int, Callable] = {}  # see _why_called

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if not kwargs and self._positions is not None and len(args) == self._positions[0]:  # the usual call
            hidden, index, weights = (args[p] for p in self._positions[1])
        else:
            bound = self._signature.bind(*args, **kwargs).arguments
            hidden, index, weights = (bound[self.roles[r]] for r in _ROLES)
        leading = hidden.shape[:-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index, weights = index.reshape(-1, index.shape[-1]), weights.reshape(-1, weights.shape[-1])
        slot_major = index.transpose(0, 1)
        if self.calibrate_all_experts and self.dense_calibration and self.calibration_chunk_size is None:
            output = self._dense(hidden, index, weights)
        else:
            output, routes = None if self.sum_over_slots else self._zeros(hidden), None
            for expert, (slot, token) in enumerate(routed_rows(slot_major, self.num_experts, self.token_major)):
                if token.numel():
                    contribution = self._call(expert, hidden[token], weights[token, slot, None])
                    if output is not None:
                        output.index_add_(0, token, contribution.to(output.dtype))
                    else:  # each route's output in its slot, summed over the slots at the end, as the original
                        if routes is None:
                            routes = contribution.new_zeros(*index.shape, contribution.shape[-1])
                        routes[token, slot] = contribution
                if self.calibrate_all_experts:
                    self._run_unrouted(expert, hidden, token, weights.dtype)
            if output is None:
                output = routes.sum(1) if routes is not None else self._zeros(hidden)
        for choice in range(self.num_experts, self.num_choices):  # after every expert, as in ascending order
            slot, token = torch.where(slot_major == choice)
            if token.numel():
                contribution = self._weightless(choice, hidden[token], index, weights[token, slot, None])
                output.index_add_(0, token, contribution.to(output.dtype))
        return output.to(self.output_dtype or hidden.dtype).reshape(*leading, self.output_features)

    def _weightless(self, choice: int, rows: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A routed choice with no weights in the packed storage (an identity "zero expert"), as the original runs it.

        The original container is called on the choice's rows alone, every slot
        holding that choice and all but the first weighted 0 (a container may
        assume its usual number of slots), so its contribution is the original's
        and is added at the original's place in the expert order.
        """
        slots = torch.full((rows.shape[0], index.shape[-1]), choice, dtype=index.dtype, device=index.device)
        slot_weights = weight.new_zeros(rows.shape[0], index.shape[-1])
        slot_weights[:, :1] = weight
        inputs = {self.roles["hidden"]: rows, self.roles["index"]: slots, self.roles["weights"]: slot_weights}
        with eager_experts(self.__dict__["_packed_container"]):
            return self.__dict__["_packed_container"](**inputs)

    def _zeros(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output the routed rows are added to."""
        return hidden.new_zeros(hidden.shape[0], self.output_features, dtype=self.accumulate_dtype or hidden.dtype)

    def _dense(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # With ``calibration_chunk_size`` set, calibration takes the routed + unrouted path instead: the
        # routed rows are computed as with calibration off and the unrouted rows run in chunks of at most
        # that many tokens, bounding activation memory with the same output.
        """Calibration with the weight applied last: each expert once on every token, only routed rows kept.

        A token an expert was not routed to gets weight 1 (its rows are seen
        unscaled) and its output is dropped. The routed rows come from a larger
        matmul than the original's, so they equal it within rounding.
        """
        experts = self.experts()
        if self._groupable(experts, hidden):
            return self._dense_grouped(experts, hidden, index, weights)
        output = self._zeros(hidden)
        # One pass over the routing for all experts: per token, each expert's summed weight and whether it
        # was routed at all (index E and above, e.g. an expert-parallel sentinel, falls into a spare column).
        columns = index.clamp(max=self.num_experts)
        dense = weights.new_zeros(index.shape[0], self.num_experts + 1).scatter_add_(1, columns, weights)
        routed = torch.zeros_like(dense, dtype=torch.bool).scatter_(1, columns, True)
        weight = torch.where(routed, dense, torch.ones_like(dense))
        if hidden.device.type == "cpu":  # no host synchronisation to avoid: add the routed rows only
            rows = [routed[:, expert].nonzero().squeeze(-1) for expert in range(self.num_experts)]
            for expert in range(self.num_experts):
                contribution = self._call(expert, hidden, weight[:, expert, None])
                output.index_add_(0, rows[expert], contribution[rows[expert]].to(output.dtype))
            return output
        unrouted = ~routed
        for expert in range(self.num_experts):
            contribution = self._call(expert, hidden, weight[:, expert, None])
            output.add_(contribution.to(output.dtype).masked_fill(unrouted[:, expert, None], 0))
        return output

    def _groupable(self, experts: list[nn.Module], hidden: torch.Tensor) -> bool:
        """Can the experts run in groups: nothing needs the expert modules called, and the grouped run checked?"""
        if not self.group_experts:
            return False
        reason = self._why_called(experts)
        if reason is not None:
            if not self.__dict__.get("_warned_ungrouped"):  # said once per container
                self.__dict__["_warned_ungrouped"] = True
                warnings.warn(
                    f"autocal: the calibration forward of the experts replacing a "
                    f"{type(self.__dict__['_packed_container']).__name__} calls each expert module on its own, "
                    f"not in groups, because {reason}; on a GPU this is several times slower. Hooks on the expert "
                    f"Linears (quantization observers) keep the grouped run.", stacklevel=4)
            return False
        usable = self._grouped.usable  # checked once (check() caches it); no slicing per call
        return usable if usable is not None else self._grouped.check(experts[:2], hidden[:4])

    def _why_called(self, experts: list[nn.Module]) -> str | None:
        """Why each expert module must be called itself (the grouped run calls their Linears), or None.

        A hook on it does, and a forward replaced on the instance, except a
        ``functools.wraps`` wrapper of its own forward: offloading
        (compressed-tensors, which LLM Compressor's pipelines apply to every
        module; accelerate) installs one that places the arguments on the device
        the module's parameters are brought to, then calls the forward it wraps,
        and in the grouped run the Linears' own wrappers do that. Wrappers seen
        are remembered per expert, so the walk runs once, not on every forward.
        """
        if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
            return "a global module hook is registered (torch.nn.modules.module.register_module_forward_*hook)"
        seen = self._wrapped_forwards
        for number, expert in enumerate(experts):
            if expert._forward_hooks or expert._forward_pre_hooks:
                return f"expert {number} ({type(expert).__name__}) has a forward hook"
            forward = expert.__dict__.get("forward")
            if forward is None or seen.get(number) is forward:
                continue
            if not _runs_own_forward(expert):
                return (f"expert {number} ({type(expert).__name__}) has its forward replaced on the instance "
                        f"(not by a wrapper of its own forward)")
            seen[number] = forward
        return None

    def _group_size(self, tokens: int, on_cpu: bool) -> int:
        """Experts per group: as many as keep one stacked activation within ``group_elements`` (``GROUP_ELEMENTS``)."""
        if not on_cpu and tokens * self._work_per_token > self.group_work:
            return 1
        return max(1, min(self.num_experts, self.group_elements[on_cpu] // max(1, tokens * self._widest)))

    def _span(self, size: int, tokens: int, on_cpu: bool) -> int:
        """Experts combined at once: one group, or lone experts within ``combine_elements`` (``COMBINE_ELEMENTS``)."""
        if size > 1:
            return size
        return max(1, min(self.num_experts, self.combine_elements[on_cpu] // max(1, tokens * self.output_features)))

    def _dense_grouped(self, experts: list[nn.Module], hidden: torch.Tensor, index: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
        """``_dense`` with the experts run ``size`` at a time (see ``grouped.py``) and combined ``span`` at a time.

        Each group's unweighted outputs on all tokens are computed at once; only
        the routed rows are then weighted, cast and added. A span is combined
        once the next one is queued. The host never waits for the device while
        the device has nothing queued: the first expert Linear is launched
        before anything else, and which rows are routed is worked out
        (``RoutedSlots``) once the device has a group to run meanwhile, and
        copied to the host while it runs the next.
        """
        tokens, on_cpu = hidden.shape[0], hidden.device.type == "cpu"
        size = self._group_size(tokens, on_cpu)
        span = self._span(size, tokens, on_cpu)
        output, slots = None, None
        running: list[torch.Tensor] = []  # outputs of the span being run
        queued: list[tuple[int, torch.Tensor]] = []  # (number, outputs) of a span run and not yet combined
        for start in range(0, self.num_experts, size):
            members = experts[start:start + size]
            running.append(self._grouped(members, hidden))
            for module in members:  # counted once the group is queued: the device is busy meanwhile
                if _COUNTER in module.__dict__:
                    module.__dict__[_COUNTER] += tokens
            last = start + size >= self.num_experts
            if slots is None and (len(running) == 2 or span == size or last):  # a span of lone experts: the second
                output = self._zeros(hidden)
                slots = RoutedSlots(index, weights, self.num_experts, span, self._firsts(span, index))
            if last or (start + size) % span == 0:
                queued.append((start // span, running[0] if len(running) == 1 else torch.stack(running)))
                running = []
                if len(queued) == 2:
                    self._combine(*queued.pop(0), slots, output)
        self._combine(*queued.pop(0), slots, output)
        return output

    def _firsts(self, span: int, index: torch.Tensor) -> torch.Tensor:
        """``group_firsts`` for ``index``, made once per span, device and dtype."""
        key = (span, index.device, index.dtype)
        if key not in self._span_firsts:
            self._span_firsts[key] = group_firsts(self.num_experts, span, index)
        return self._span_firsts[key]

    @staticmethod
    def _combine(number: int, unweighted: torch.Tensor, slots: "RoutedSlots", output: torch.Tensor) -> None:
        """Add span ``number``'s routed rows, weighted, to ``output`` (``unweighted``: ``[G, T, H]``, or ``[T, H]``)."""
        row, token, weight = slots.group(number)
        rows = unweighted.reshape(-1, unweighted.shape[-1]).index_select(0, row) * weight
        output.index_add_(0, token, rows.to(output.dtype))

    def _call(self, expert: int, rows: torch.Tensor, routing_weight: torch.Tensor) -> torch.Tensor:
        module = self._modules[str(expert)]
        if _COUNTER in module.__dict__:
            module.__dict__[_COUNTER] += rows.shape[0]
        return module(rows, routing_weight) if self.uses_routing_weight else module(rows)

    def _run_unrouted(self, expert: int, hidden: torch.Tensor, routed: torch.Tensor, dtype: torch.dtype) -> None:
        """Run the expert on the tokens it was not routed, discarding the result."""
        unrouted = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        unrouted[routed] = False
        rows = unrouted.nonzero().squeeze(-1)
        for chunk in rows.split(self.calibration_chunk_size or max(rows.numel(), 1)):
            self._call(expert, hidden[chunk], torch.ones(chunk.numel(), 1, dtype=dtype, device=hidden.device))

_ROLES = ("hidden", "index", "weights")


def _runs_own_forward(module: nn.Module) -> bool:
    """Is ``module``'s forward its class's, as is or behind ``functools.wraps`` wrappers (see ``_why_called``)?

    Also a bound method of the class's forward set on the instance, as removing offloading leaves it.
    """
    forward = module.__dict__.get("forward")
    if forward is None:
        return True
    if getattr(forward, "__self__", module) is not module:  # bound to another module
        return False
    return _wraps(forward, type(module).forward)


def _wraps(replaced: Callable, own: Callable) -> bool:
    """Is ``replaced`` the function ``own``, itself or behind ``functools.wraps`` wrappers (bound or partial)?"""
    inner = getattr(replaced, "__func__", replaced)
    for _ in range(8):  # wrappers of wrappers; a cycle of __wrapped__ ends here
        if inner is own:
            return True
        wrapped = getattr(inner, "__wrapped__", None)
        if wrapped is None:
            return False
        inner = getattr(wrapped, "__func__", wrapped)
    return False


def _positions(signature: inspect.Signature, names: list[str]) -> tuple[int, tuple[int, ...]] | None:
    """For a call passing every positional parameter and nothing else: how many, and where ``names`` are.

    Such a call binds as ``signature.bind`` would, without its cost on every forward. None where it may
    not (a name that is not positional, a keyword-only parameter without default).
    """
    parameters = list(signature.parameters.values())
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in parameters) or \
            not all(name in positional for name in names):
        return None
    return len(positional), tuple(positional.index(name) for name in names)


def _dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None
