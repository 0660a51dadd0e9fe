"""The synthesized calibration module for one block (experts-level rewrite).

The block keeps its own forward, router, shared experts and every other
submodule (the same objects, not copies); only the packed experts container is
swapped for a ``CalibrationExperts``. Routing is therefore exact by
construction. Parameter names stay those of the original block, with the
experts as ``experts.{i}.gate_proj.weight`` and so on.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..detect.structure import MoEStructure
from ..registry import MoECalibrationModule
from .experts import CalibrationExperts, expert_class

__all__ = ["SynthesizedMoE", "adopt", "build_calibration_module"]

# nn.Module's own bookkeeping: fresh for the new module, never shared with the original.
_MODULE_INTERNALS = ("hooks", "_parameters", "_buffers", "_modules", "_hooks_with_kwargs", "_always_called",
                     "_is_full_backward_hook", "_non_persistent_buffers_set")


def adopt(module: nn.Module, original: nn.Module) -> None:
    """Make ``module`` hold the original's attributes, parameters, buffers and children (the same objects)."""
    nn.Module.__init__(module)
    for key, item in original.__dict__.items():
        if not key.endswith(_MODULE_INTERNALS):
            module.__dict__[key] = item
    module._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
    module._parameters.update(original._parameters)
    module._buffers.update(original._buffers)
    module._modules.update(original._modules)
    module.__dict__["_original"] = original


class SynthesizedMoE(MoECalibrationModule):
    """Base of the generated calibration classes: ``Calibration<Block>(SynthesizedMoE, <Block>)``.

    Inheriting from the original block class keeps its forward and helper
    methods, and keeps ``isinstance`` checks in model code true.
    """

    is_permanent = True
    structure: MoEStructure
    source = "synthesized"

    def __init__(self, original: nn.Module, config: Any = None, calibrate_all_experts: bool = True) -> None:
        adopt(self, original)
        name = self.structure.experts.module_path
        experts = CalibrationExperts(original._modules[name], self.structure, self._expert_cls, calibrate_all_experts)
        self._modules[name] = experts

    @property
    def calibrate_all_experts(self) -> bool:
        return self._modules[self.structure.experts.module_path].calibrate_all_experts

    @calibrate_all_experts.setter
    def calibrate_all_experts(self, enabled: bool) -> None:
        self._modules[self.structure.experts.module_path].calibrate_all_experts = bool(enabled)

    @property
    def calibration_chunk_size(self) -> int | None:
        """At most this many tokens per expert call in calibration mode (None: all at once)."""
        return self._modules[self.structure.experts.module_path].calibration_chunk_size

    @calibration_chunk_size.setter
    def calibration_chunk_size(self, tokens: int | None) -> None:
        if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"calibration_chunk_size must be a positive int or None, got {tokens!r}")
        self._modules[self.structure.experts.module_path].calibration_chunk_size = tokens

    def restore(self, original: nn.Module | None = None) -> nn.Module:
        """The original block, whose packed parameters share storage with the unpacked experts."""
        return original if original is not None else self.__dict__["_original"]

    def expert_modules(self) -> list[nn.Module]:
        return self._modules[self.structure.experts.module_path].experts()

    @property
    def code(self) -> str:
        """The generated per-expert forward."""
        return self._modules[self.structure.experts.module_path].code


def build_calibration_module(structure: MoEStructure, block: nn.Module) -> type[SynthesizedMoE]:
    """The calibration class for one block class, generated once and reused for all its blocks."""
    block_cls = type(block)
    container = block.get_submodule(structure.experts.module_path)
    expert_cls = expert_class(structure.template, f"{block_cls.__name__}Expert", container)
    return type(
        f"Calibration{block_cls.__name__}",
        (SynthesizedMoE, block_cls),
        {"structure": structure, "_expert_cls": expert_cls, "__module__": __name__},
    )
