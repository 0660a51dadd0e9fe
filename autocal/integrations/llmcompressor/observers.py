"""Static input observers run once per group of expert Linears that receive the same input.

With static activation quantization (FP8, INT8 or NVFP4 input scales), LLM Compressor's
``QuantizationModifier`` hooks every targeted Linear with an input observer (a min/max, or its moving
average, of every calibration input). In calibration mode the gate and up projections of all experts of a
block take the very same tensor (``autocal.shared_input_groups``), so their observers would see the same
values in the same order and reach the same statistics.

``SharedObserverQuantizationModifier`` is ``QuantizationModifier`` with the input observer hooked on the
first member of each group only: per calibration forward of a block, E + 1 hooked expert Linear calls
(the down projections' and the group's one) instead of 3E. At the end of each layer, before LLM Compressor
computes the input scales from the observers' statistics, every other member's observer gets a copy of the
first's; the scales it then computes are the ones its own observer would have reached, bitwise.

Only members whose input quantization is the first's (the same ``QuantizationArgs``) follow it; the others
keep their own hook. Output observers and weights are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers.quantization import QuantizationModifier
from pydantic import PrivateAttr
from torch import nn
from torch.utils.hooks import RemovableHandle

from ...linear_calls import register_group_hook
from ...sharing import shared_input_groups
from .wrappers import hooked, install_transparency_rules, live

__all__ = ["SharedObserverQuantizationModifier"]


def _static_input(module: nn.Module) -> str | None:
    """The module's static input quantization arguments, as JSON (None if its inputs are not observed)."""
    args = getattr(getattr(module, "quantization_scheme", None), "input_activations", None)
    if args is None or args.dynamic not in (False,):
        return None
    return args.model_dump_json()


class SharedObserverQuantizationModifier(QuantizationModifier):
    """``QuantizationModifier`` observing the input of each group of expert Linears that share it once.

    Use it in place of ``QuantizationModifier`` on a model ``prepare`` converted; the arguments are
    ``QuantizationModifier``'s.
    """

    _leaders: dict[nn.Module, nn.Module] = PrivateAttr(default_factory=dict)  # member -> its group's first
    _handle_of: dict[nn.Module, Any] = PrivateAttr(default_factory=dict)  # each Linear's input observer hook
    _observers: dict[nn.Module, Any] = PrivateAttr(default_factory=dict)  # the function each such hook calls
    _group_hook: Any = PrivateAttr(default=None)

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        initialized = super().on_initialize(state, **kwargs)
        install_transparency_rules()
        targeted = {module for _, module in match_named_modules(state.model, self.resolved_targets, self.ignore)}
        self._leaders = {}
        for paths in shared_input_groups(state.model):
            members = [m for m in (state.model.get_submodule(p) for p in paths) if m in targeted and _static_input(m)]
            if members:
                leader = members[0]
                self._leaders.update({m: leader for m in members[1:] if _static_input(m) == _static_input(leader)})
        return initialized

    def _initialize_hooks(self, module: nn.Module) -> set[RemovableHandle]:
        """LLM Compressor's hooks, but for a group member's input observer (its group's first observes)."""
        hooks = super()._initialize_hooks(module)
        if module in self._leaders:
            for handle in [h for h in hooks if h.id in module._forward_pre_hooks]:
                self.remove_hooks({handle})
                hooks.discard(handle)
        return hooks

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        """LLM Compressor's observers and hooks, and one group hook standing for the input observers' hooks of
        all targeted Linears (``autocal.linear_calls``): expert Linears are then computed together."""
        super().on_calibration_start(state, event, **kwargs)
        targeted = [module for _, module in match_named_modules(state.model, self.resolved_targets, self.ignore)]
        pairs = hooked(self._calibration_hooks, targeted, pre_hooks=True)
        self._handle_of = dict(pairs)
        self._observers = {module: module._forward_pre_hooks[handle.id].__wrapped__ for module, handle in pairs}
        self._group_hook = register_group_hook(self._observe_inputs, pairs)

    def on_calibration_end(self, state: State, event: Event, **kwargs: Any) -> None:
        if self._group_hook is not None:
            self._group_hook.remove()
            self._group_hook = None
        super().on_calibration_end(state, event, **kwargs)

    def _observe_inputs(self, linears: Sequence[nn.Module], inputs: Sequence[torch.Tensor]) -> None:
        """What the input observers' hooks of Linears computed together would do: each calls the function
        LLM Compressor registered (``calibrate_input_hook``, which returns nothing) on its input."""
        for linear, inp in zip(*live(linears, inputs, self._handle_of)):
            self._observers[linear](linear, (inp,))

    def on_sequential_epoch_end(self, state: State, event: Event, modules: list[nn.Module], **kwargs: Any) -> None:
        """Give each member its group's first's input statistics, then compute the scales as LLM Compressor does."""
        for module in modules:
            leader = self._leaders.get(module)
            if leader is not None and leader.input_observer.has_statistics:
                for name, value in leader.input_observer.get_statistics().items():
                    setattr(module.input_observer, name, value.clone())
        super().on_sequential_epoch_end(state, event, modules, **kwargs)
