"""Calibration for a list of expert modules that dispatches tokens in its own forward.

The container keeps its forward, so the output is the original's by
construction; with calibration on, each expert then also runs on the tokens
the original did not route to it (``TokenRecipe`` recomputes which those are),
and those outputs are discarded. Nothing is unpacked: ``restore()`` gives the
original block back.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..detect.structure import MoEStructure
from ..registry import MoECalibrationModule
from ..detect.block import identical_entries
from .module import adopt
from .ops import run_unrouted

__all__ = ["ContainerCalibrationMoE", "build_container_calibration"]


class _CalibrationContainer(nn.Module):
    """Base of ``Calibration<Container>(_CalibrationContainer, <Container>)``: original forward, then the rest."""

    structure: MoEStructure
    entries: list[str]

    def __init__(self, original: nn.Module, calibrate_all_experts: bool) -> None:
        adopt(self, original)
        self.calibrate_all_experts = calibrate_all_experts
        self.__dict__["_signature"] = inspect.signature(original.forward)

    def forward(self, *args, **kwargs):
        output = self._container_forward(*args, **kwargs)
        if self.calibrate_all_experts:
            bound = self._signature.bind(*args, **kwargs).arguments
            hidden = bound[self.structure.experts.call_roles["hidden"]]
            for expert, name in enumerate(self.entries):
                routed = self.structure.tokens(bound, expert)
                run_unrouted(self._modules[name], hidden, routed, True)
        return output

    def experts(self) -> list[nn.Module]:
        return [self._modules[name] for name in self.entries]


class ContainerCalibrationMoE(MoECalibrationModule):
    """Base of ``Calibration<Block>(ContainerCalibrationMoE, <Block>)``: the block, with its container wrapped."""

    is_permanent = False
    structure: MoEStructure

    def __init__(self, original: nn.Module, config: Any = None, calibrate_all_experts: bool = True) -> None:
        adopt(self, original)
        name = self.structure.experts.module_path
        self._modules[name] = self._container_cls(original._modules[name], calibrate_all_experts)

    @property
    def calibrate_all_experts(self) -> bool:
        return self._modules[self.structure.experts.module_path].calibrate_all_experts

    @calibrate_all_experts.setter
    def calibrate_all_experts(self, enabled: bool) -> None:
        self._modules[self.structure.experts.module_path].calibrate_all_experts = bool(enabled)

    def restore(self, original: nn.Module | None = None) -> nn.Module:
        return original if original is not None else self.__dict__["_original"]

    def expert_modules(self) -> list[nn.Module]:
        return self._modules[self.structure.experts.module_path].experts()


def build_container_calibration(structure: MoEStructure, block: nn.Module) -> type[ContainerCalibrationMoE]:
    container = block.get_submodule(structure.experts.module_path)
    container_cls = type(container)
    names = {id(m): n for n, m in container.named_children()}
    entries = [names[id(m)] for m in identical_entries(container)]
    calibration_container = type(
        f"Calibration{container_cls.__name__}",
        (_CalibrationContainer, container_cls),
        {"structure": structure, "entries": entries, "_container_forward": _bound_forward(container_cls),
         "__module__": __name__},
    )
    return type(
        f"Calibration{type(block).__name__}",
        (ContainerCalibrationMoE, type(block)),
        {"structure": structure, "_container_cls": calibration_container, "__module__": __name__},
    )


def _bound_forward(container_cls: type):
    original = container_cls.forward

    def forward(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    return forward
